"""Tests for the DSP layers: Delay, Lookahead, Frame, OverlapAdd, FFTs, Window."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import dsp, fft, testing, types, utils
from sequence_layers.sequence import Sequence


def _verify(config: types.SequenceLayerConfig, x: Sequence, **kwargs: Any) -> Any:
    layer = testing.init_and_bind(config, x)
    y = testing.verify_contract(layer, x, jit=True, **kwargs)
    return layer, y


# testing._measure_dependencies sizes its weights for t * output_ratio output
# frames and crashes on layers whose layer() output is longer (Delay, Frame
# with semicausal_full, OverlapAdd with valid); their receptive fields are
# checked by hand instead.
_LONGER_OUTPUT = {"test_receptive_field": False}


def _seq(values: Any, lengths: Any) -> Sequence:
    return Sequence.from_lengths(jnp.asarray(values, jnp.float32), lengths).mask_invalid()


# Delay ---------------------------------------------------------------------


@pytest.mark.parametrize("delay_layer_output", [True, False])
def test_delay_contract(delay_layer_output: bool) -> None:
    x = testing.random_sequence(2, 7, 3, seed=1)
    # _LONGER_OUTPUT: Delay's layer() output is t + length frames.
    _verify(
        dsp.Delay.Config(2, delay_layer_output=delay_layer_output),
        x,
        test_receptive_field=not delay_layer_output,
    )


def test_delay_by_hand() -> None:
    layer = dsp.Delay.Config(2).make()
    assert (layer.input_latency, layer.output_latency) == (2, 0)
    assert layer.receptive_field_per_step == {0: (-2, -2)}
    x = _seq([[[1.0], [2.0], [3.0]]], [3])
    y = layer.apply({}, x, training=False, method="layer")
    np.testing.assert_array_equal(np.asarray(y.mask), [[False, False, True, True, True]])
    np.testing.assert_array_equal(np.asarray(y.values[0, 2:, 0]), [1, 2, 3])
    # Step: the first `length` outputs come from the (invalid) buffer.
    state = layer.get_initial_state(1, x.channel_spec, training=False)
    y1, state = layer.apply({}, x[:, :2], state, training=False, method="step")
    y2, _ = layer.apply({}, x[:, 2:], state, training=False, method="step")
    np.testing.assert_array_equal(np.asarray(y1.mask), [[False, False]])
    np.testing.assert_array_equal(np.asarray(y2.values[0, :, 0]), [1])

    lazy = dsp.Delay.Config(3, delay_layer_output=False).make()
    assert (lazy.input_latency, lazy.output_latency) == (3, 3)
    assert lazy.apply({}, x, training=False, method="layer").shape == x.shape


def test_delay_rejects_negative_length() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        dsp.Delay.Config(-1)


# Lookahead -----------------------------------------------------------------


@pytest.mark.parametrize("preserve", [False, True])
def test_lookahead_contract(preserve: bool) -> None:
    x = testing.random_sequence(2, 7, 3, seed=2)
    _verify(dsp.Lookahead.Config(2, preserve_length_in_layer=preserve), x)


def test_lookahead_by_hand() -> None:
    layer = dsp.Lookahead.Config(2).make()
    assert (layer.input_latency, layer.output_latency) == (0, 2)
    assert layer.receptive_field_per_step == {0: (2, 2)}
    x = _seq([[[1.0], [2.0], [3.0], [4.0]]], [4])
    y = layer.apply({}, x, training=False, method="layer")
    np.testing.assert_array_equal(np.asarray(y.values[0, :, 0]), [3, 4])
    kept = dsp.Lookahead.Config(2, preserve_length_in_layer=True).make()
    y = kept.apply({}, x, training=False, method="layer")
    np.testing.assert_array_equal(np.asarray(y.mask), [[True, True, False, False]])


def test_lookahead_countdown_counts_valid_frames_per_row() -> None:
    layer = dsp.Lookahead.Config(2).make()
    # Row 0 starts with two invalid frames (an upstream latency); row 1 not.
    values = jnp.arange(10, dtype=jnp.float32).reshape(2, 5, 1)
    mask = jnp.asarray([[False, False, True, True, True], [True, True, True, True, True]])
    x = Sequence(values, mask)
    state = layer.get_initial_state(2, x.channel_spec, training=False)
    assert state.shape == (2,)
    y, state = layer.apply({}, x, state, training=False, method="step")
    np.testing.assert_array_equal(
        np.asarray(y.mask), [[False, False, False, False, True], [False, False, True, True, True]]
    )
    np.testing.assert_array_equal(np.asarray(state), [0, 0])


# Frame ---------------------------------------------------------------------

_FRAME_CASES = [
    (5, 2, "reverse_causal_valid"),
    (2, 3, "reverse_causal_valid"),
    (5, 2, "causal_valid"),
    (4, 2, "reverse_causal"),
    (5, 2, "semicausal"),
    (5, 2, (1, 3)),
    (4, 3, (0, 3)),
]


@pytest.mark.parametrize(("frame_length", "frame_step", "padding"), _FRAME_CASES)
def test_frame_contract(frame_length: int, frame_step: int, padding: Any) -> None:
    x = testing.random_sequence(2, 12, 2, seed=3)
    _verify(dsp.Frame.Config(frame_length, frame_step, padding=padding), x)


@pytest.mark.parametrize("padding", ["valid", "same", "semicausal_full"])
def test_frame_layer_only_paddings(padding: str) -> None:
    x = testing.random_sequence(2, 12, 2, seed=4)
    longer = _LONGER_OUTPUT if padding == "semicausal_full" else {}
    layer, y = _verify(dsp.Frame.Config(4, 2, padding=padding), x, **longer)
    assert not layer.supports_step
    expected = utils.conv_output_length(12, padding, 4, 2)
    assert y.shape[1] == expected
    state = layer.get_initial_state(2, x.channel_spec, training=False)
    with pytest.raises(ValueError, match="does not support step"):
        layer.step(x, state, training=False)


def test_frame_values_and_masks_by_hand() -> None:
    x = _seq(np.arange(1, 7, dtype=np.float32)[None, :, None], [5])
    layer = dsp.Frame.Config(3, 2).make()  # reverse_causal_valid
    assert (layer.block_size, layer.output_ratio) == (2, 0.5)
    assert (layer.input_latency, layer.output_latency) == (2, 1)
    y = layer.apply({}, x, training=False, method="layer")
    np.testing.assert_array_equal(
        np.asarray(y.values[0, :, :, 0]), [[1, 2, 3], [3, 4, 5], [5, 0, 0]]
    )
    # A frame is valid iff all its samples are (sample 6 is invalid).
    np.testing.assert_array_equal(np.asarray(y.mask), [[True, True, False]])


def test_frame_reverse_causal_valid_leading_step_outputs_are_invalid() -> None:
    # The reference marks the initial buffer valid, so the first
    # output_latency step outputs come out valid; ours are invalid.
    layer = dsp.Frame.Config(5, 2).make()
    x = testing.random_sequence(1, 8, 1, random_lengths=False)
    state = layer.get_initial_state(1, x.channel_spec, training=False)
    y, _, _ = utils.step_by_step_static(layer, x, training=False, initial_state=state)
    assert layer.output_latency == 2
    np.testing.assert_array_equal(np.asarray(y.mask[0, :2]), [False, False])
    assert bool(y.mask[0, 2])


def test_frame_config_validation() -> None:
    with pytest.raises(ValueError, match="sum"):
        dsp.Frame.Config(4, 2, padding=(1, 1))
    with pytest.raises(ValueError, match="Unknown padding"):
        dsp.Frame.Config(4, 2, padding="bogus")
    with pytest.raises(ValueError, match="positive"):
        dsp.Frame.Config(0, 2)


# OverlapAdd ----------------------------------------------------------------


@pytest.mark.parametrize(("frame_length", "frame_step"), [(5, 2), (3, 3)])
def test_overlap_add_causal_contract(frame_length: int, frame_step: int) -> None:
    x = testing.random_sequence(2, 6, frame_length, 2, seed=5)
    _verify(dsp.OverlapAdd.Config(frame_length, frame_step, padding="causal"), x)


@pytest.mark.parametrize("padding", ["valid", "semicausal_full"])
def test_overlap_add_layer_only(padding: str) -> None:
    x = testing.random_sequence(2, 6, 4, seed=6)
    longer = _LONGER_OUTPUT if padding == "valid" else {}
    layer, y = _verify(dsp.OverlapAdd.Config(4, 2, padding=padding), x, **longer)
    assert not layer.supports_step
    assert y.shape[1] == (5 * 2 + 4 if padding == "valid" else 6 * 2)


def test_overlap_add_by_hand() -> None:
    frames = np.asarray([[[1.0, 1, 1, 1], [2, 2, 2, 2], [4, 4, 4, 4]]], np.float32)
    x = _seq(frames, [2])
    y = (
        dsp.OverlapAdd.Config(4, 2, padding="valid")
        .make()
        .apply({}, x, training=False, method="layer")
    )
    np.testing.assert_array_equal(np.asarray(y.values[0]), [1, 1, 3, 3, 2, 2, 0, 0])
    # A sample is valid iff every frame over it is (frame 2 is invalid).
    np.testing.assert_array_equal(
        np.asarray(y.mask[0]), [True, True, True, True, False, False, False, False]
    )
    y = (
        dsp.OverlapAdd.Config(4, 2, padding="causal")
        .make()
        .apply({}, x, training=False, method="layer")
    )
    np.testing.assert_array_equal(np.asarray(y.values[0]), [1, 1, 3, 3, 2, 2])
    np.testing.assert_array_equal(np.asarray(y.mask[0]), [True, True, True, True, False, False])


def test_overlap_add_validation() -> None:
    with pytest.raises(ValueError, match="padding"):
        dsp.OverlapAdd.Config(4, 2, padding="reverse_causal")
    with pytest.raises(ValueError, match="frame_length >= frame_step"):
        dsp.OverlapAdd.Config(2, 4)
    layer = dsp.OverlapAdd.Config(4, 2).make()
    with pytest.raises(ValueError, match="frame_length=4"):
        layer.get_output_shape((3,))


# FFTs ----------------------------------------------------------------------


def test_fft_numerics_match_numpy() -> None:
    x = testing.random_sequence(2, 3, 6, random_lengths=False, seed=7)
    xv = np.asarray(x.values)
    cases = [
        (fft.FFT.Config(8), np.fft.fft(xv, n=8, axis=-1)),
        (fft.RFFT.Config(8), np.fft.rfft(xv, n=8, axis=-1)),
        (fft.RFFT.Config(4), np.fft.rfft(xv[..., :4], axis=-1)),
    ]
    for config, expected in cases:
        y = config.make().apply({}, x, training=False, method="layer")
        assert y.dtype == jnp.complex64
        np.testing.assert_allclose(np.asarray(y.values), expected, rtol=1e-5, atol=1e-5)
    spectrum = np.fft.fft(xv, axis=-1)
    y = fft.IFFT.Config().make().apply({}, Sequence(jnp.asarray(spectrum, jnp.complex64), x.mask))
    np.testing.assert_allclose(np.asarray(y.values).real, xv, rtol=1e-5, atol=1e-5)
    half = np.fft.rfft(xv, axis=-1)
    y = fft.IRFFT.Config(6).make().apply({}, Sequence(jnp.asarray(half, jnp.complex64), x.mask))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y.values), xv, rtol=1e-5, atol=1e-5)


def test_fft_center_padding() -> None:
    x = _seq(np.ones((1, 1, 2), np.float32), [1])
    y = fft.FFT.Config(4, padding="center").make().apply({}, x, training=False, method="layer")
    np.testing.assert_allclose(np.asarray(y.values[0, 0]), np.fft.fft([0, 1, 1, 0]), atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [
        fft.FFT.Config(8),
        fft.RFFT.Config(6, axis=2),
        fft.IFFT.Config(4, frame_length=6),
        fft.IRFFT.Config(6, frame_length=5, padding="center"),
    ],
    ids=["fft", "rfft", "ifft", "irfft"],
)
def test_fft_contract(config: types.SequenceLayerConfig) -> None:
    dtype = jnp.complex64 if isinstance(config, fft.IFFT.Config | fft.IRFFT.Config) else None
    x = testing.random_sequence(2, 4, 4, dtype=dtype or jnp.float32, seed=8)
    _verify(config, x, rtol=1e-5, atol=1e-5)


def test_fft_rejects_time_axis() -> None:
    with pytest.raises(ValueError, match="batch or time"):
        fft.FFT.Config(axis=1).make().get_output_shape((4,))


# Window --------------------------------------------------------------------


def test_window_contract_and_values() -> None:
    x = testing.random_sequence(2, 4, 4, 3, seed=9)
    _, y = _verify(fft.Window.Config(axis=2), x)
    hann = np.asarray([0.0, 0.5, 1.0, 0.5], np.float32)
    np.testing.assert_allclose(
        np.asarray(y.values), np.asarray(x.values) * hann[None, None, :, None], atol=1e-6
    )


def test_window_rejects_time_axis() -> None:
    x = testing.random_sequence(1, 2, 3)
    with pytest.raises(ValueError, match="channel axis"):
        fft.Window.Config(axis=1).make().apply({}, x, training=False, method="layer")
