"""FFT layers (FFT, IFFT, RFFT, IRFFT) and Window: stateless transforms over
a channel axis, used by STFT and InverseSTFT."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import signal, types
from sequence_layers.sequence import MaskedSequence, Sequence
from sequence_layers.types import Constants

__all__ = ["FFT", "IFFT", "IRFFT", "RFFT", "Window"]

FFTPaddingString = Literal["center", "right"]
# FFTs ----------------------------------------------------------------------


def _normalize_fft_axis(axis: int, ndim: int) -> int:
    """`axis` of a `[b, t, ...]` array of rank `ndim`, refusing batch and time."""
    normalized = axis + ndim if axis < 0 else axis
    if not 0 <= normalized < ndim:
        raise ValueError(f"FFT axis {axis} is out of range for rank {ndim} inputs.")
    if normalized in (0, 1):
        raise ValueError(
            f"FFT axis {axis} refers to the batch or time dimension; use a channel axis (>= 2)."
        )
    return normalized


def _pad_or_trim(x: jax.Array, axis: int, length: int, padding: str) -> jax.Array:
    """Zero-pads or trims `axis` to `length`, at the right or centered."""
    size = x.shape[axis]
    if size == length:
        return x
    if size < length:
        amount = length - size
        left = amount // 2 if padding == "center" else 0
        widths = [(0, 0)] * x.ndim
        widths[axis] = (left, amount - left)
        return jnp.pad(x, widths)
    start = (size - length) // 2 if padding == "center" else 0
    return jax.lax.slice_in_dim(x, start, start + length, axis=axis)


def _check_fft_config(fft_length: int | None, padding: str) -> None:
    if fft_length is not None and fft_length <= 0:
        raise ValueError(f"fft_length must be positive, got {fft_length}.")
    if padding not in ("center", "right"):
        raise ValueError(f"FFT padding must be 'center' or 'right', got {padding!r}.")


def _complex_dtype_for(dtype: Any) -> Any:
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.float64, jnp.complex128):
        return jnp.complex128
    if dtype in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.complex64):
        return jnp.complex64
    raise ValueError(f"Unsupported FFT input dtype {dtype}; use a float or complex dtype.")


def _real_dtype_for(dtype: Any) -> Any:
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.float64, jnp.complex128):
        return jnp.float64
    if dtype in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.complex64):
        return jnp.float32
    raise ValueError(f"Unsupported FFT input dtype {dtype}; use a float or complex dtype.")


# Field blocks shared by the forward (FFT, RFFT) and inverse (IFFT, IRFFT)
# configs. They stay abstract (no `make`), so serialization never lists them;
# each concrete Config adds only `name`, keeping the original field order.
@dataclasses.dataclass(frozen=True)
class _ForwardFFTFields(types.SequenceLayerConfig):
    # FFT size; None means the input size.
    fft_length: int | None = None
    # Channel axis to transform (batch and time are refused).
    axis: int = -1
    # Pad/trim to fft_length at the 'right' or 'center'.
    padding: FFTPaddingString = "right"

    def __post_init__(self) -> None:
        _check_fft_config(self.fft_length, self.padding)


@dataclasses.dataclass(frozen=True)
class _InverseFFTFields(types.SequenceLayerConfig):
    # FFT size; None means the input size (IRFFT: 2 * (input size - 1)).
    fft_length: int | None = None
    # Output size after padding/trimming; None means the FFT size.
    frame_length: int | None = None
    # Channel axis to transform (batch and time are refused).
    axis: int = -1
    # Pad/trim to frame_length at the 'right' or 'center'.
    padding: FFTPaddingString = "right"

    def __post_init__(self) -> None:
        _check_fft_config(self.fft_length, self.padding)


class _FFTBase(types.Stateless):
    """Shared FFT logic: a transform over one channel axis, frame by frame."""

    config: Any

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        # Complex output by default; RFFT and IRFFT override.
        return _complex_dtype_for(input_dtype)

    @nn.nowrap
    def _output_length(self, input_length: int) -> int:
        raise NotImplementedError

    @nn.nowrap
    def _transform(self, values: jax.Array, axis: int) -> jax.Array:
        raise NotImplementedError

    @nn.nowrap
    def get_output_shape(
        self, input_shape: tuple[int, ...] | list[int], *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        shape = list(input_shape)
        axis = _normalize_fft_axis(self.config.axis, len(shape) + 2) - 2
        shape[axis] = self._output_length(shape[axis])
        return tuple(shape)

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        if x.ndim < 3:
            raise ValueError(f"{type(self).__name__} needs [b, t, ...] inputs, got {x.shape=}.")
        axis = _normalize_fft_axis(self.config.axis, x.ndim)
        return Sequence(self._transform(x.values, axis), x.mask)


class FFT(_FFTBase):
    """FFT over a channel axis: `[..., n, ...]` -> complex `[..., fft_length, ...]`
    (inputs zero-padded or trimmed to `fft_length` first)."""

    @dataclasses.dataclass(frozen=True)
    class Config(_ForwardFFTFields):
        # Optional module name.
        name: str | None = None

        def make(self) -> FFT:
            return FFT(self, name=self.name)

    config: Config

    @nn.nowrap
    def _output_length(self, input_length: int) -> int:
        return self.config.fft_length or input_length

    @nn.nowrap
    def _transform(self, values: jax.Array, axis: int) -> jax.Array:
        values = _pad_or_trim(
            values, axis, self._output_length(values.shape[axis]), self.config.padding
        )
        return jnp.fft.fft(values, axis=axis).astype(_complex_dtype_for(values.dtype))


class IFFT(_FFTBase):
    """Inverse FFT over a channel axis; the result is padded or trimmed to
    `frame_length` (default: the FFT size)."""

    @dataclasses.dataclass(frozen=True)
    class Config(_InverseFFTFields):
        # Optional module name.
        name: str | None = None

        def make(self) -> IFFT:
            return IFFT(self, name=self.name)

    config: Config

    @nn.nowrap
    def _output_length(self, input_length: int) -> int:
        return self.config.frame_length or self.config.fft_length or input_length

    @nn.nowrap
    def _transform(self, values: jax.Array, axis: int) -> jax.Array:
        out = jnp.fft.ifft(values, n=self.config.fft_length, axis=axis)
        out = out.astype(_complex_dtype_for(values.dtype))
        return _pad_or_trim(out, axis, self._output_length(values.shape[axis]), self.config.padding)


class RFFT(_FFTBase):
    """Real FFT over a channel axis: `[..., n, ...]` -> complex
    `[..., fft_length // 2 + 1, ...]` (inputs padded or trimmed to `fft_length`)."""

    @dataclasses.dataclass(frozen=True)
    class Config(_ForwardFFTFields):
        # Optional module name.
        name: str | None = None

        def make(self) -> RFFT:
            return RFFT(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        if jnp.issubdtype(jnp.dtype(input_dtype), jnp.complexfloating):
            raise ValueError(f"RFFT needs real inputs, got {input_dtype}; use FFT.")
        return _complex_dtype_for(input_dtype)

    @nn.nowrap
    def _output_length(self, input_length: int) -> int:
        return (self.config.fft_length or input_length) // 2 + 1

    @nn.nowrap
    def _transform(self, values: jax.Array, axis: int) -> jax.Array:
        n = self.config.fft_length or values.shape[axis]
        out_dtype = _complex_dtype_for(values.dtype)
        values = _pad_or_trim(values, axis, n, self.config.padding)
        # bf16/f16 have no FFT kernels; compute in f32.
        if values.dtype in (jnp.bfloat16, jnp.float16):
            values = values.astype(jnp.float32)
        return jnp.fft.rfft(values, n=n, axis=axis).astype(out_dtype)


class IRFFT(_FFTBase):
    """Inverse real FFT over a channel axis: `[..., m, ...]` -> real
    `[..., fft_length, ...]` (default `fft_length = 2 (m - 1)`), then padded or
    trimmed to `frame_length`."""

    @dataclasses.dataclass(frozen=True)
    class Config(_InverseFFTFields):
        # Optional module name.
        name: str | None = None

        def make(self) -> IRFFT:
            return IRFFT(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return _real_dtype_for(input_dtype)

    @nn.nowrap
    def _fft_length(self, input_length: int) -> int:
        return self.config.fft_length or 2 * (input_length - 1)

    @nn.nowrap
    def _output_length(self, input_length: int) -> int:
        return self.config.frame_length or self._fft_length(input_length)

    @nn.nowrap
    def _transform(self, values: jax.Array, axis: int) -> jax.Array:
        out_dtype = _real_dtype_for(values.dtype)
        out = jnp.fft.irfft(values, n=self._fft_length(values.shape[axis]), axis=axis)
        out = out.astype(out_dtype)
        return _pad_or_trim(out, axis, self._output_length(values.shape[axis]), self.config.padding)


# Window --------------------------------------------------------------------


class Window(types.PreservesShape, types.PreservesType, types.Stateless):
    """Multiplies a channel axis by a window: `v * window_fn(n)` along `axis`
    (as the STFT does to each frame)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Channel axis the window runs along (batch and time are refused).
        axis: int
        # `fn(length, dtype=...) -> [length]`; None applies no window.
        window_fn: Callable[..., Any] | None = signal.hann_window
        # Optional module name.
        name: str | None = None

        def make(self) -> Window:
            return Window(self, name=self.name)

    config: Config

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        axis = self.config.axis + x.ndim if self.config.axis < 0 else self.config.axis
        if axis in (0, 1) or not 0 <= axis < x.ndim:
            raise ValueError(
                f"Window axis {self.config.axis} must be a channel axis of {x.shape=} "
                "(not batch or time)."
            )
        if self.config.window_fn is None:
            return x
        real_dtype = jnp.finfo(x.dtype).dtype if jnp.issubdtype(x.dtype, jnp.inexact) else x.dtype
        window = jnp.asarray(self.config.window_fn(x.shape[axis], dtype=np.float64), real_dtype)
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        window = window.reshape(shape)
        y = x.values * window
        return MaskedSequence(y, x.mask) if isinstance(x, MaskedSequence) else Sequence(y, x.mask)
