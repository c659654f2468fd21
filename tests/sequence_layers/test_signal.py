"""Tests for sequence_layers.signal: windows, framing, overlap-add, mel matrix."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import signal, utils


def test_hann_window() -> None:
    np.testing.assert_allclose(signal.hann_window(8, periodic=False), np.hanning(8), atol=1e-7)
    # Periodic: the symmetric window one longer, without its last sample.
    np.testing.assert_allclose(signal.hann_window(8), np.hanning(9)[:-1], atol=1e-7)
    assert signal.hann_window(8)[0] == 0.0
    np.testing.assert_array_equal(signal.hann_window(1), [1.0])
    assert signal.hann_window(4, dtype=np.float64).dtype == np.float64
    np.testing.assert_allclose(signal.hamming_window(7, periodic=False), np.hamming(7), atol=1e-7)


def test_inverse_stft_window_undoes_overlap_gain() -> None:
    length, step = 16, 4
    forward = signal.hann_window(length, dtype=np.float64)
    inverse = signal.inverse_stft_window_fn(step)(length, dtype=np.float64)
    # forward * inverse overlap-adds to exactly 1 at every hop offset.
    gain = (forward * inverse).reshape(length // step, step).sum(axis=0)
    np.testing.assert_allclose(gain, np.ones(step), atol=1e-12)
    assert hash(signal.inverse_stft_window_fn(step)) == hash(signal.InverseSTFTWindow(step))


def _frames_by_hand(x: np.ndarray, length: int, step: int, left: int, right: int) -> np.ndarray:
    padded = np.pad(x, (left, right))
    n = max(0, (padded.size - length) // step + 1)
    return (
        np.stack([padded[i * step : i * step + length] for i in range(n)])
        if n
        else np.zeros((0, length))
    )


@pytest.mark.parametrize(
    ("length", "step", "padding"),
    [
        (4, 2, "reverse_causal_valid"),
        (6, 4, "causal"),
        (5, 3, "same"),
        (3, 3, "valid"),
        (2, 5, "semicausal"),
        (4, 2, (1, 2)),
    ],
)
def test_frame_matches_slicing(length: int, step: int, padding: object) -> None:
    x = np.arange(1, 12, dtype=np.float32)
    if isinstance(padding, tuple):
        left, right = padding
    else:
        left, right = utils.convolution_explicit_padding(padding, length, step)
    expected = _frames_by_hand(x, length, step, left, right)
    got = signal.frame(jnp.asarray(x), length, step, pad_mode=padding)  # type: ignore[arg-type]
    np.testing.assert_array_equal(np.asarray(got), expected)


def test_frame_inner_axis_and_channels() -> None:
    x = np.random.default_rng(0).normal(size=(2, 9, 3)).astype(np.float32)
    got = signal.frame(jnp.asarray(x), 4, 2, axis=1, pad_mode="valid")
    assert got.shape == (2, 3, 4, 3)
    np.testing.assert_array_equal(np.asarray(got[:, 1]), x[:, 2:6])


def test_overlap_and_add_matches_loop() -> None:
    rng = np.random.default_rng(1)
    for length, step in [(5, 2), (4, 4), (6, 4), (3, 1)]:
        frames = rng.normal(size=(2, 4, length))
        expected = np.zeros((2, 3 * step + length))
        for i in range(4):
            expected[:, i * step : i * step + length] += frames[:, i]
        got = signal.overlap_and_add(jnp.asarray(frames, jnp.float32), step)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_mel_matrix_against_direct_formula() -> None:
    bins, mels, rate, lo, hi = 33, 6, 16000.0, 125.0, 7600.0
    matrix = signal.linear_to_mel_weight_matrix(mels, bins, rate, lo, hi, dtype=np.float64)
    assert matrix.shape == (bins, mels)

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    assert abs(mel(700.0) - 1127.0 * math.log(2.0)) < 1e-9
    step = (mel(hi) - mel(lo)) / (mels + 1)
    for i in range(bins):
        f = i * (rate / 2) / (bins - 1)
        for m in range(mels):
            left, center, right = (mel(lo) + (m + j) * step for j in range(3))
            if i == 0:
                expected = 0.0  # the DC bin never contributes
            else:
                m_f = mel(f)
                expected = max(
                    0.0, min((m_f - left) / (center - left), (right - m_f) / (right - center))
                )
            assert abs(matrix[i, m] - expected) < 1e-9, (i, m, matrix[i, m], expected)
    assert matrix.max() <= 1.0


def test_mel_matrix_validation() -> None:
    with pytest.raises(ValueError, match="Nyquist"):
        signal.linear_to_mel_weight_matrix(10, 65, 8000, 100.0, 5000.0)
    with pytest.raises(ValueError, match="lower_edge_hertz < upper_edge_hertz"):
        signal.linear_to_mel_weight_matrix(10, 65, 8000, 300.0, 200.0)
    with pytest.raises(ValueError, match="num_mel_bins"):
        signal.linear_to_mel_weight_matrix(0, 65, 8000, 100.0, 200.0)
