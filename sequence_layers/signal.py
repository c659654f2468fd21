"""Signal-processing functions used by the DSP layers (pure, no Flax state).

Ports of the `tf.signal` conventions the reference follows: `frame` (framing
with convolution-style padding), `overlap_and_add`, the periodic Hann window,
the inverse-STFT window correction and the HTK mel filterbank.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import utils

__all__ = [
    "InverseSTFTWindow",
    "frame",
    "hamming_window",
    "hann_window",
    "hertz_to_mel",
    "inverse_stft_window_fn",
    "linear_to_mel_weight_matrix",
    "overlap_and_add",
]

# A window function: `fn(window_length, dtype=...) -> [window_length]` samples.
WindowFn = Callable[..., Any]


def _raised_cosine_window(
    window_length: int, periodic: bool, dtype: Any, a: float, b: float
) -> np.ndarray:
    """`a - b * cos(2 pi n / N)`, with N = length (periodic, even length) or length - 1."""
    if window_length == 1:
        return np.ones([1], dtype=dtype)
    even = 1 - window_length % 2
    denominator = window_length + int(periodic) * even - 1
    n = np.arange(window_length, dtype=np.float64)
    return (a - b * np.cos(2.0 * np.pi * n / denominator)).astype(dtype)


def hann_window(window_length: int, periodic: bool = True, dtype: Any = np.float32) -> np.ndarray:
    """The Hann window as `tf.signal.hann_window` defines it: `[window_length]`.

    `periodic=True` (the STFT default) drops the repeated end point for even
    lengths, so sample 0 is exactly zero and the window overlap-adds to a
    constant at hops of `window_length / 2`.
    """
    return _raised_cosine_window(window_length, periodic, dtype, 0.5, 0.5)


def hamming_window(
    window_length: int, periodic: bool = True, dtype: Any = np.float32
) -> np.ndarray:
    """The Hamming window (`a0 = 0.54`, as scipy): `[window_length]`."""
    return _raised_cosine_window(window_length, periodic, dtype, 0.54, 0.46)


@dataclasses.dataclass(frozen=True)
class InverseSTFTWindow:
    """A window for `InverseSTFT` that undoes the forward window's overlap
    gain (Griffin & Lim, eq. 7): `forward / sum_k forward[n + k * step]^2`.

    A frozen dataclass rather than a closure, so configs holding it stay
    hashable and serializable.
    """

    # Hop of the STFT this window inverts.
    frame_step: int
    # The window used by the forward STFT.
    forward_window_fn: WindowFn = hann_window

    def __call__(self, frame_length: int, dtype: Any = np.float32) -> np.ndarray:
        forward = np.asarray(self.forward_window_fn(frame_length, dtype=np.float64), np.float64)
        overlaps = -(-frame_length // self.frame_step)
        squared = np.pad(np.square(forward), (0, overlaps * self.frame_step - frame_length))
        denominator = squared.reshape(overlaps, self.frame_step).sum(axis=0)
        denominator = np.tile(denominator, overlaps)[:frame_length]
        return (forward / denominator).astype(dtype)


def inverse_stft_window_fn(
    frame_step: int, forward_window_fn: WindowFn = hann_window
) -> InverseSTFTWindow:
    """The window that makes `InverseSTFT` invert an STFT using `forward_window_fn`."""
    return InverseSTFTWindow(frame_step, forward_window_fn)


def frame_padding(
    padding: str | tuple[int, int], frame_length: int, frame_step: int
) -> tuple[int, int]:
    """(left, right) time padding for a padding mode or an explicit pair."""
    if isinstance(padding, str):
        return utils.convolution_explicit_padding(padding, frame_length, frame_step)
    left, right = padding
    return int(left), int(right)


def frame(
    x: jax.Array,
    frame_length: int,
    frame_step: int,
    axis: int = -1,
    pad_mode: str | tuple[int, int] = "reverse_causal_valid",
    pad_value: complex = 0,
) -> jax.Array:
    """Splits `axis` of `x` into overlapping frames: `[..., n, ...]` ->
    `[..., num_frames, frame_length, ...]`.

    The number of frames equals that of a convolution with kernel
    `frame_length`, stride `frame_step` and padding `pad_mode` (a mode name or
    an explicit `(left, right)`).
    """
    if frame_length <= 0 or frame_step <= 0:
        raise ValueError(f"frame needs positive sizes, got {frame_length=} {frame_step=}.")
    axis = axis % x.ndim
    left, right = frame_padding(pad_mode, frame_length, frame_step)
    length = x.shape[axis] + left + right
    num_frames = max(0, (length - frame_length) // frame_step + 1)
    outer, inner = x.shape[:axis], x.shape[axis + 1 :]
    if num_frames == 0:
        return jnp.zeros((*outer, 0, frame_length, *inner), x.dtype)
    # Frames start on multiples of g = gcd(frame_length, frame_step):
    # gathering blocks of g samples instead of single samples makes the index
    # array g^2 times smaller.
    g = math.gcd(frame_length, frame_step)
    needed = (num_frames - 1) * frame_step + frame_length  # a multiple of g
    widths = [(0, 0)] * x.ndim
    widths[axis] = (left, right)
    x = jnp.pad(x, widths, constant_values=jnp.asarray(pad_value, x.dtype))
    x = jax.lax.slice_in_dim(x, 0, needed, axis=axis)
    x = x.reshape((*outer, needed // g, g, *inner))
    starts = np.arange(num_frames)[:, None] * (frame_step // g)
    offsets = np.arange(frame_length // g)[None, :]
    framed = jnp.take(x, starts + offsets, axis=axis)  # [..., n, k/g, g, ...]
    return framed.reshape((*outer, num_frames, frame_length, *inner))


def overlap_and_add(signal: jax.Array, frame_step: int) -> jax.Array:
    """Sums frames `[..., frames, frame_length]` placed `frame_step` apart:
    `[..., (frames - 1) * frame_step + frame_length]`.
    """
    if signal.ndim < 2:
        raise ValueError(f"overlap_and_add needs rank >= 2, got {signal.shape=}.")
    *outer, frames, frame_length = signal.shape
    out_length = (frames - 1) * frame_step + frame_length if frames else 0
    if frames == 0:
        return jnp.zeros((*outer, 0), signal.dtype)
    if frame_length == frame_step:
        return signal.reshape((*outer, out_length))
    # Cut every frame into `segments` chunks of `frame_step` samples; chunk j
    # of frame i lands on output block i + j, so summing the chunks after
    # shifting chunk j by j blocks gives the overlap-add.
    segments = -(-frame_length // frame_step)
    widths = [(0, 0)] * len(outer) + [(0, segments), (0, segments * frame_step - frame_length)]
    padded = jnp.pad(signal, widths)
    chunks = padded.reshape((*outer, frames + segments, segments, frame_step))
    total = None
    for j in range(segments):
        shifted = jax.lax.slice_in_dim(chunks[..., j, :], 0, frames + segments - 1, axis=-2)
        shifted = jnp.roll(shifted, j, axis=-2) if j else shifted
        total = shifted if total is None else total + shifted
    assert total is not None
    flat = total.reshape((*outer, (frames + segments - 1) * frame_step))
    return flat[..., :out_length]


# Mel scale (HTK): mel = 1127 ln(1 + f / 700).
_MEL_BREAK_FREQUENCY_HERTZ = 700.0
_MEL_HIGH_FREQUENCY_Q = 1127.0


def hertz_to_mel(frequencies_hertz: Any) -> np.ndarray:
    """HTK mel scale: `1127 * ln(1 + f / 700)`."""
    return _MEL_HIGH_FREQUENCY_Q * np.log(
        1.0 + np.asarray(frequencies_hertz, np.float64) / _MEL_BREAK_FREQUENCY_HERTZ
    )


def linear_to_mel_weight_matrix(
    num_mel_bins: int = 20,
    num_spectrogram_bins: int = 129,
    sample_rate: float = 8000,
    lower_edge_hertz: float = 125.0,
    upper_edge_hertz: float = 3800.0,
    dtype: Any = np.float32,
) -> np.ndarray:
    """`[num_spectrogram_bins, num_mel_bins]` triangular filterbank, as
    `tf.signal.linear_to_mel_weight_matrix`.

    Bin i sits at `i * (sample_rate / 2) / (num_spectrogram_bins - 1)` Hz; the
    DC bin gets no weight. Band m rises linearly in mel from edge m to edge
    m + 1 and falls to edge m + 2, the `num_mel_bins + 2` edges spaced evenly in
    mel over `[lower_edge_hertz, upper_edge_hertz]`.
    """
    if num_mel_bins <= 0:
        raise ValueError(f"num_mel_bins must be positive, got {num_mel_bins}.")
    if num_spectrogram_bins <= 1:
        raise ValueError(f"num_spectrogram_bins must be > 1, got {num_spectrogram_bins}.")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}.")
    if lower_edge_hertz < 0:
        raise ValueError(f"lower_edge_hertz must be non-negative, got {lower_edge_hertz}.")
    if lower_edge_hertz >= upper_edge_hertz:
        raise ValueError(
            "Need lower_edge_hertz < upper_edge_hertz, got "
            f"{lower_edge_hertz=} {upper_edge_hertz=}."
        )
    if upper_edge_hertz > sample_rate / 2:
        raise ValueError(
            f"upper_edge_hertz={upper_edge_hertz} is above the Nyquist frequency "
            f"sample_rate / 2 = {sample_rate / 2}."
        )
    bin_hertz = np.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins, dtype=np.float64)[1:]
    bin_mel = hertz_to_mel(bin_hertz)[:, None]
    edges = np.linspace(
        hertz_to_mel(lower_edge_hertz), hertz_to_mel(upper_edge_hertz), num_mel_bins + 2
    )
    lower, center, upper = edges[None, :-2], edges[None, 1:-1], edges[None, 2:]
    rising = (bin_mel - lower) / (center - lower)
    falling = (upper - bin_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return np.pad(weights, [(1, 0), (0, 0)]).astype(dtype)
