"""STFT layers: `STFT`, `InverseSTFT` and `LinearToMelSpectrogram`.

`STFT` is `Frame` -> window -> `RFFT` (optionally magnitude); `InverseSTFT` is
`IRFFT` -> window -> `OverlapAdd`. Each steps exactly when its inner `Frame` /
`OverlapAdd` does and inherits its latency and block size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import signal, types
from sequence_layers.dsp import Frame, OverlapAdd, overlap_add_receptive_field
from sequence_layers.fft import IRFFT, RFFT, FFTPaddingString
from sequence_layers.sequence import ChannelSpec, Sequence
from sequence_layers.types import Constants, ReceptiveField, State

__all__ = ["STFT", "InverseSTFT", "LinearToMelSpectrogram"]


def _fft_position_mask(frame_length: int, fft_length: int, fft_padding: str) -> np.ndarray:
    """Which of a frame's `frame_length` samples survive padding/trimming to
    `fft_length` (trimmed samples cannot reach the output)."""
    keep = np.ones(frame_length, bool)
    if fft_length < frame_length:
        excess = frame_length - fft_length
        left = excess // 2 if fft_padding == "center" else 0
        keep[:] = False
        keep[left : left + fft_length] = True
    return keep


def _window_array(window_fn: Callable[..., Any] | None, length: int) -> np.ndarray:
    if window_fn is None:
        return np.ones(length, np.float64)
    return np.asarray(window_fn(length, dtype=np.float64), np.float64)


def _apply_window(x: Sequence, window_fn: Callable[..., Any] | None, length: int) -> Sequence:
    """Multiplies axis 2 (the frame axis) of `x` by the window."""
    if window_fn is None:
        return x
    window = jnp.asarray(_window_array(window_fn, length), x.dtype)
    window = window.reshape((1, 1, length) + (1,) * (x.ndim - 3))
    return x.apply_values_masked(lambda v: v * window)


class _TimingFromInner(types.SequenceLayer):
    """STFT and InverseSTFT step exactly when their inner Frame / OverlapAdd
    does, so they take its step support, block size, ratio and latencies."""

    @property
    def _timing_layer(self) -> types.SequenceLayer:
        raise NotImplementedError

    @property
    def supports_step(self) -> bool:
        return self._timing_layer.supports_step

    @property
    def block_size(self) -> int:
        return self._timing_layer.block_size

    @property
    def output_ratio(self) -> Fraction:
        return self._timing_layer.output_ratio

    @property
    def input_latency(self) -> int:
        return self._timing_layer.input_latency

    @property
    def output_latency(self) -> int:
        return self._timing_layer.output_latency


class STFT(_TimingFromInner):
    """Short-time Fourier transform: `[b, t, ...]` ->
    `[b, t / frame_step, fft_length // 2 + 1, ...]` (complex, or real with
    `output_magnitude`), each trailing channel transformed independently.

    Equals `tf.signal.stft` with `fft_padding='right'`. Steppable for the
    `time_padding` modes `Frame` steps with; the default
    `reverse_causal_valid` has input latency `frame_length - 1`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Samples per frame.
        frame_length: int
        # Hop between frames.
        frame_step: int
        # FFT size; frames are zero-padded or trimmed to it.
        fft_length: int
        # `fn(length, dtype=...) -> [length]` window; None for no window.
        window_fn: Callable[..., Any] | None = signal.hann_window
        # Time padding of the framing (see Frame).
        time_padding: types.PaddingModeString = "reverse_causal_valid"
        # Pad/trim frames to fft_length at the 'right' or 'center'.
        fft_padding: FFTPaddingString = "right"
        # Output |STFT| (a spectrogram) instead of complex values.
        output_magnitude: bool = False
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "time_padding", types.validate_padding(self.time_padding))
            # Validates the sizes and paddings early.
            self.frame_config()
            self.fft_config()

        def frame_config(self) -> Frame.Config:
            return Frame.Config(self.frame_length, self.frame_step, padding=self.time_padding)

        def fft_config(self) -> RFFT.Config:
            return RFFT.Config(self.fft_length, axis=2, padding=self.fft_padding)

        def make(self) -> STFT:
            return STFT(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.framer = self.config.frame_config().make()
        self.fft = self.config.fft_config().make()

    @property
    def _frame(self) -> Frame:
        return types.detached(self.config.frame_config())  # type: ignore[return-value]

    # The framing sets the time structure (see _TimingFromInner).
    _timing_layer = _frame

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        cfg = self.config
        # Samples with a zero window weight (or trimmed before the FFT) do not
        # reach the output.
        reaches = (_window_array(cfg.window_fn, cfg.frame_length) != 0) & _fft_position_mask(
            cfg.frame_length, cfg.fft_length, cfg.fft_padding
        )
        rf = self._frame.receptive_field_per_step[0]
        assert rf is not None
        positions = np.nonzero(reaches)[0]
        if positions.size == 0:
            return {0: None}
        return {0: (rf[0] + int(positions.min()), rf[0] + int(positions.max()))}

    @nn.nowrap
    def get_output_shape(
        self, input_shape: tuple[int, ...] | list[int], *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        framed = types.detached(self.config.frame_config()).get_output_shape(input_shape)
        return types.detached(self.config.fft_config()).get_output_shape(framed)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        out = types.detached(self.config.fft_config()).get_output_dtype(input_dtype)
        if self.config.output_magnitude:
            return jnp.float64 if out == jnp.complex128 else jnp.float32
        return out

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        return self.framer.get_initial_state(
            batch_size, input_spec, training=training, constants=constants
        )

    @nn.nowrap
    def _spectrum(self, framed: Sequence, training: bool) -> Sequence:
        framed = _apply_window(framed, self.config.window_fn, self.config.frame_length)
        spectrum = self.fft.layer(framed, training=training)
        if self.config.output_magnitude:
            spectrum = Sequence(jnp.abs(spectrum.values), spectrum.mask)
        return spectrum

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        framed, state = self.framer.step(x, state, training=training, constants=constants)
        return self._spectrum(framed, training), state

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        framed = self.framer.layer(x, training=training, constants=constants)
        return self._spectrum(framed, training)


class InverseSTFT(_TimingFromInner):
    """Inverse STFT: `[b, t, fft_length // 2 + 1, ...]` (complex) ->
    `[b, t * frame_step, ...]` (real).

    Equals `tf.signal.inverse_stft` with `fft_padding='right'`. Use
    `signal.inverse_stft_window_fn(frame_step)` as `window_fn` to invert an
    `STFT` with a Hann window. Steppable with `time_padding='causal'`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Samples per frame.
        frame_length: int
        # Hop between frames.
        frame_step: int
        # FFT size of the input spectra.
        fft_length: int
        # `fn(length, dtype=...) -> [length]` synthesis window; None for none.
        window_fn: Callable[..., Any] | None = signal.hann_window
        # OverlapAdd padding: 'causal' (steppable), 'valid' or 'semicausal_full'.
        time_padding: types.PaddingModeString = "causal"
        # Pad/trim the IRFFT output to frame_length at the 'right' or 'center'.
        fft_padding: FFTPaddingString = "right"
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "time_padding", types.validate_padding(self.time_padding))
            self.overlap_add_config()
            self.irfft_config()

        def overlap_add_config(self) -> OverlapAdd.Config:
            return OverlapAdd.Config(self.frame_length, self.frame_step, padding=self.time_padding)

        def irfft_config(self) -> IRFFT.Config:
            return IRFFT.Config(
                self.fft_length, self.frame_length, axis=2, padding=self.fft_padding
            )

        def make(self) -> InverseSTFT:
            return InverseSTFT(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.overlap_add = self.config.overlap_add_config().make()
        self.irfft = self.config.irfft_config().make()

    @property
    def _overlap_add(self) -> OverlapAdd:
        return types.detached(self.config.overlap_add_config())  # type: ignore[return-value]

    # The overlap-add sets the time structure (see _TimingFromInner).
    _timing_layer = _overlap_add

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        cfg = self.config
        # Frame samples outside the IRFFT output (zero padding) or under a zero
        # window weight contribute nothing.
        reaches = _window_array(cfg.window_fn, cfg.frame_length) != 0
        reaches &= _fft_position_mask(cfg.frame_length, cfg.fft_length, cfg.fft_padding)
        offset = cfg.frame_length - cfg.frame_step if cfg.time_padding == "semicausal_full" else 0
        return overlap_add_receptive_field(cfg.frame_length, cfg.frame_step, offset, reaches)

    @nn.nowrap
    def _frames_spec(self, input_spec: ChannelSpec) -> ChannelSpec:
        irfft = types.detached(self.config.irfft_config())
        return ChannelSpec(
            tuple(irfft.get_output_shape(tuple(input_spec.shape))),
            irfft.get_output_dtype(input_spec.dtype),
        )

    @nn.nowrap
    def get_output_shape(
        self, input_shape: tuple[int, ...] | list[int], *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        frames = types.detached(self.config.irfft_config()).get_output_shape(input_shape)
        return types.detached(self.config.overlap_add_config()).get_output_shape(frames)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return types.detached(self.config.irfft_config()).get_output_dtype(input_dtype)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        return self.overlap_add.get_initial_state(
            batch_size, self._frames_spec(input_spec), training=training, constants=constants
        )

    @nn.nowrap
    def _frames(self, x: Sequence, training: bool) -> Sequence:
        if x.ndim < 3:
            raise ValueError(f"InverseSTFT needs [b, t, bins, ...] inputs, got {x.shape=}.")
        frames = self.irfft.layer(x, training=training)
        return _apply_window(frames, self.config.window_fn, self.config.frame_length)

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        return self.overlap_add.step(
            self._frames(x, training), state, training=training, constants=constants
        )

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        return self.overlap_add.layer(
            self._frames(x, training), training=training, constants=constants
        )


class LinearToMelSpectrogram(types.PreservesType, types.Stateless):
    """Linear-frequency magnitudes `[..., bins]` -> mel bands `[..., num_mel_bins]`
    with `signal.linear_to_mel_weight_matrix` (HTK mel scale, triangular bands).

    Feed uncompressed magnitudes (not log): bands are sums over bins.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Number of mel bands.
        num_mel_bins: int
        # Sample rate of the analysed signal, in Hz.
        sample_rate: float
        # Lower edge of the lowest band, in Hz.
        lower_edge_hertz: float
        # Upper edge of the highest band, in Hz (at most sample_rate / 2).
        upper_edge_hertz: float
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            # Raises for bad edges now rather than at the first call.
            signal.linear_to_mel_weight_matrix(
                self.num_mel_bins,
                2,
                self.sample_rate,
                self.lower_edge_hertz,
                self.upper_edge_hertz,
            )

        def make(self) -> LinearToMelSpectrogram:
            return LinearToMelSpectrogram(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: tuple[int, ...] | list[int], *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        if not input_shape:
            raise ValueError("LinearToMelSpectrogram needs a frequency channel axis, got ().")
        return (*tuple(input_shape)[:-1], self.config.num_mel_bins)

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        matrix = signal.linear_to_mel_weight_matrix(
            self.config.num_mel_bins,
            x.shape[-1],
            self.config.sample_rate,
            self.config.lower_edge_hertz,
            self.config.upper_edge_hertz,
            dtype=np.float64,
        )
        weights = jnp.asarray(matrix, x.dtype)
        project: Callable[[jax.Array], jax.Array] = lambda v: jnp.einsum(
            "...a,ab->...b", v, weights
        )
        # A zero frame maps to zero, so a masked input stays masked.
        return x.apply_values_masked(project)
