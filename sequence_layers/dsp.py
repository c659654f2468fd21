"""DSP layers: Delay, Lookahead, Frame, OverlapAdd, the FFTs and Window.

The STFT family (`STFT`, `InverseSTFT`, `LinearToMelSpectrogram`) lives in
`sequence_layers.stft`; the pure signal functions in `sequence_layers.signal`.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import signal, types, utils
from sequence_layers.sequence import MASK_DTYPE, ChannelSpec, Sequence
from sequence_layers.types import Constants, ReceptiveField, State

__all__ = ["Delay", "Frame", "Lookahead", "OverlapAdd"]

_FRAME_STEPPABLE = (
    "causal_valid",
    "reverse_causal_valid",
    "causal",
    "reverse_causal",
    "semicausal",
)


def _check_nonnegative(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}.")


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}.")


# Delay and Lookahead -------------------------------------------------------


class Delay(types.PreservesShape, types.PreservesType, types.SequenceLayer):
    """Delays its input by `length` frames: `[b, t, ...]` -> `[b, t + length, ...]`
    in `layer` (the first `length` frames invalid).

    Unlike `Lookahead`, which drops leading frames, `Delay` inserts invalid
    ones. With `delay_layer_output=False` the delay happens in `step` only: use
    it to give a shortcut the step-wise latency of a parallel branch whose
    `layer` has none (e.g. a `reverse_causal` conv in a `Residual`).
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Frames of delay; 0 is a no-op.
        length: int
        # Delay `layer` outputs too; if False only `step` is delayed.
        delay_layer_output: bool = True
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _check_nonnegative("Delay length", self.length)

        def make(self) -> Delay:
            return Delay(self, name=self.name)

    config: Config

    @property
    def input_latency(self) -> int:
        return self.config.length

    @property
    def output_latency(self) -> int:
        # With a delayed `layer` output, step and layer outputs line up at once.
        return 0 if self.config.delay_layer_output else self.config.length

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        if self.config.delay_layer_output:
            return {0: (-self.config.length, -self.config.length)}
        return {0: (0, 0)}

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        if not self.config.length:
            return ()
        # Invalid frames: the first `length` step outputs are never valid.
        return types.zeros_state(batch_size, self.config.length, input_spec, valid=False)

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        if not self.config.length:
            return x, state
        joined = Sequence.concatenate_sequences([state, x])
        time = x.shape[1]
        y = Sequence(joined.values[:, :time], joined.mask[:, :time])
        new_state = Sequence(joined.values[:, time:], joined.mask[:, time:])
        return y, new_state

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        if self.config.delay_layer_output and self.config.length:
            return x.pad_time(self.config.length, 0, valid=False)
        return x


class Lookahead(types.PreservesShape, types.PreservesType, types.SequenceLayer):
    """Drops the first `length` frames: `[b, t, ...]` -> `[b, t - length, ...]`
    (or `[b, t, ...]` with `preserve_length_in_layer`, padding invalid frames
    at the end).

    `step` cannot drop frames, so it marks the first `length` valid frames of
    each row invalid instead (a per-row countdown `[b]`) and declares an output
    latency of `length`. Counting valid frames, not physical ones, keeps leading
    invalid frames from an upstream layer's latency from using up the
    countdown, so every dropped output is invalid.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Frames to drop from the start; 0 is a no-op.
        length: int
        # In `layer`, pad `length` invalid frames at the end to keep the length.
        preserve_length_in_layer: bool = False
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _check_nonnegative("Lookahead length", self.length)

        def make(self) -> Lookahead:
            return Lookahead(self, name=self.name)

    config: Config

    @property
    def output_latency(self) -> int:
        return self.config.length

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return {0: (self.config.length, self.config.length)}

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        if not self.config.length:
            return ()
        # Valid frames still to drop, per row.
        return jnp.full((batch_size,), self.config.length, jnp.int32)

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        if not self.config.length:
            return x, state
        seen = jnp.cumsum(x.mask.astype(jnp.int32), axis=1)
        mask = jnp.logical_and(x.mask, seen > state[:, None])
        remaining = jnp.maximum(state - seen[:, -1], 0)
        return Sequence(x.values, mask), remaining

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        if not self.config.length:
            return x
        y = x[:, self.config.length :]
        if self.config.preserve_length_in_layer:
            return y.pad_time(0, min(self.config.length, x.shape[1]), valid=False)
        return y


# Frame ---------------------------------------------------------------------


class Frame(types.PreservesType, types.SequenceLayer):
    """Overlapping frames of the input: `[b, t, ...]` -> `[b, t', frame_length, ...]`,
    with `t'` the output length of a conv with kernel `frame_length`, stride
    `frame_step` and the same padding.

    Masks follow the convolution rules (`utils.compute_conv_mask`). Steppable
    for `causal_valid`, `reverse_causal_valid`, `causal`, `reverse_causal`,
    `semicausal` and explicit `(left, right)` padding (which must sum to
    `frame_length - 1`); explicit padding masks like `same` (frame j takes the
    validity of sample `j * frame_step`). Unlike the reference, the step buffer
    of `reverse_causal_valid` and of explicit padding starts invalid, so the
    leading `output_latency` step outputs are invalid.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Samples per frame.
        frame_length: int
        # Hop between frames (the stride).
        frame_step: int
        # A padding mode or explicit (left, right) summing to frame_length - 1.
        padding: tuple[int, int] | types.PaddingModeString = "reverse_causal_valid"
        # Kept for reference compatibility; explicit padding always masks like
        # `same` here (see the class docstring).
        explicit_padding_is_same_like: bool = False
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _check_positive("frame_length", self.frame_length)
            _check_positive("frame_step", self.frame_step)
            if isinstance(self.padding, str | types.PaddingMode):
                object.__setattr__(self, "padding", types.validate_padding(self.padding))
                return
            left, right = (int(p) for p in self.padding)
            if left < 0 or right < 0 or left + right != self.frame_length - 1:
                raise ValueError(
                    f"Explicit Frame padding {self.padding} must be two non-negative ints "
                    f"summing to frame_length - 1 = {self.frame_length - 1}."
                )
            object.__setattr__(self, "padding", (left, right))

        def make(self) -> Frame:
            return Frame(self, name=self.name)

    config: Config

    @property
    def _explicit(self) -> bool:
        return not isinstance(self.config.padding, str)

    @property
    def supports_step(self) -> bool:
        return self._explicit or self.config.padding in _FRAME_STEPPABLE

    @property
    def block_size(self) -> int:
        return self.config.frame_step

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(1, self.config.frame_step)

    @property
    def input_latency(self) -> int:
        k, s, padding = self.config.frame_length, self.config.frame_step, self.config.padding
        if not isinstance(padding, str):
            return k - 1 - padding[0]
        if padding in ("reverse_causal_valid", "reverse_causal"):
            return k - 1
        if padding == "semicausal_full":
            return s - 1
        return 0

    @property
    def output_latency(self) -> int:
        if self.config.padding == "semicausal_full":
            return 0
        return self.input_latency // self.config.frame_step

    @property
    def _padding(self) -> tuple[int, int]:
        return signal.frame_padding(
            self.config.padding, self.config.frame_length, self.config.frame_step
        )

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        left = self._padding[0]
        return {0: (-left, -left + self.config.frame_length - 1)}

    @property
    def _buffer_width(self) -> int:
        k, s, padding = self.config.frame_length, self.config.frame_step, self.config.padding
        if not isinstance(padding, str):
            # Lines step windows up with layer windows: left + latency frames.
            return k - 1 - padding[1] % s
        return utils.conv_buffer_width(padding, k, s)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: tuple[int, ...] | list[int], *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        return (self.config.frame_length, *input_shape)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        if not self.supports_step or not self._buffer_width:
            return ()
        valid = not self._explicit and utils.conv_initial_buffer_valid(self.config.padding)
        return types.zeros_state(batch_size, self._buffer_width, input_spec, valid=valid)

    @nn.nowrap
    def _frame_mask(self, mask: jax.Array, is_step: bool) -> jax.Array:
        k, s, padding = self.config.frame_length, self.config.frame_step, self.config.padding
        if isinstance(padding, str):
            return utils.compute_conv_mask(mask, k, s, 1, padding, is_step=is_step)
        if not is_step:
            return mask[:, ::s]
        frames = (mask.shape[1] - self._buffer_width) // s
        return mask[:, padding[0] : padding[0] + frames * s : s]

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        if self.config.frame_length > 1:
            x = x.mask_invalid()
        width = self._buffer_width
        joined = Sequence.concatenate_sequences([state, x]) if width else x
        values = signal.frame(
            joined.values, self.config.frame_length, self.config.frame_step, 1, "valid"
        )
        mask = self._frame_mask(joined.mask, is_step=True)
        new_state = joined[:, joined.shape[1] - width :].unmask() if width else ()
        return Sequence(values, mask), new_state

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        if self.config.frame_length > 1:
            x = x.mask_invalid()
        values = signal.frame(
            x.values, self.config.frame_length, self.config.frame_step, 1, self.config.padding
        )
        mask = self._frame_mask(x.mask, is_step=False)
        if self.config.frame_length == 1:
            return type(x)(values, mask)
        return Sequence(values, mask)


# OverlapAdd ----------------------------------------------------------------


def overlap_add_receptive_field(
    frame_length: int, frame_step: int, offset: int, position_mask: np.ndarray | None = None
) -> dict[int, ReceptiveField]:
    """Receptive field of an overlap-add with ratio `frame_step`.

    Output sample `n = base * frame_step + j` (`base` = the input frame it is
    measured from) gets position `j + offset + d * frame_step` of input frame
    `base - d`; positions where `position_mask` is False add nothing (a zero
    window sample). `offset` is the number of samples trimmed from the front.
    """
    k, s = frame_length, frame_step
    rf: dict[int, ReceptiveField] = {}
    for j in range(s):
        ds = [
            (p - j - offset) // s
            for p in range(k)
            if (p - j - offset) % s == 0 and (position_mask is None or position_mask[p])
        ]
        rf[j] = (-max(ds), -min(ds)) if ds else None
    return rf


def _overlap_add_sequence_values(x: jax.Array, frame_step: int) -> jax.Array:
    """`[b, t, k, *c]` -> `[b, (t - 1) * step + k, *c]`."""
    moved = jnp.moveaxis(x, (1, 2), (-2, -1))
    summed = signal.overlap_and_add(moved, frame_step)
    return jnp.moveaxis(summed, -1, 1)


class OverlapAdd(types.PreservesType, types.SequenceLayer):
    """Overlap-adds frames `[b, t, frame_length, ...]` placed `frame_step`
    apart: `[b, t * frame_step, ...]` for `causal`.

    Padding:
    - `causal` (steppable): `layer` drops the last `frame_length - frame_step`
      samples, which `step` cannot produce yet; sample n has the mask of frame
      `n // frame_step`.
    - `valid`: all `(t - 1) * frame_step + frame_length` samples; a sample is
      valid iff every frame overlapping it is.
    - `semicausal_full`: drops the first `frame_length - frame_step` samples
      (undoing a `semicausal_full` Frame), `t * frame_step` samples; a sample is
      valid iff any frame overlapping it is.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Samples per frame (the input's first channel dim).
        frame_length: int
        # Hop between frames.
        frame_step: int
        # One of 'causal' (steppable), 'valid', 'semicausal_full'.
        padding: types.PaddingModeString = "valid"
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _check_positive("frame_length", self.frame_length)
            _check_positive("frame_step", self.frame_step)
            padding = types.validate_padding(self.padding)
            if padding not in ("causal", "valid", "semicausal_full"):
                raise ValueError(
                    f"OverlapAdd supports padding 'causal', 'valid' or 'semicausal_full', "
                    f"got {padding!r}."
                )
            if self.frame_length < self.frame_step:
                raise ValueError(
                    f"OverlapAdd needs frame_length >= frame_step, got "
                    f"{self.frame_length=} {self.frame_step=}."
                )
            object.__setattr__(self, "padding", padding)

        def make(self) -> OverlapAdd:
            return OverlapAdd(self, name=self.name)

    config: Config

    @property
    def supports_step(self) -> bool:
        return self.config.padding == "causal"

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(self.config.frame_step)

    @property
    def _trim(self) -> int:
        return self.config.frame_length - self.config.frame_step

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        offset = self._trim if self.config.padding == "semicausal_full" else 0
        return overlap_add_receptive_field(self.config.frame_length, self.config.frame_step, offset)

    @nn.nowrap
    def _validate_input_shape(self, input_shape: tuple[int, ...] | list[int]) -> None:
        if not input_shape or input_shape[0] != self.config.frame_length:
            raise ValueError(
                f"OverlapAdd expects channels (frame_length={self.config.frame_length}, ...), "
                f"got {tuple(input_shape)}."
            )

    @nn.nowrap
    def get_output_shape(
        self, input_shape: tuple[int, ...] | list[int], *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        self._validate_input_shape(input_shape)
        return tuple(input_shape[1:])

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        self._validate_input_shape(input_spec.shape)
        if not self._trim:
            return ()
        # The partial sums of samples later frames still add to.
        return jnp.zeros((batch_size, self._trim, *input_spec.shape[1:]), input_spec.dtype)

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        if self.config.frame_length > 1:
            x = x.mask_invalid()
        values = _overlap_add_sequence_values(x.values, self.config.frame_step)
        mask = jnp.repeat(x.mask, self.config.frame_step, axis=1)
        if not self._trim:
            return Sequence(values, mask), state
        widths = [(0, 0), (0, values.shape[1] - self._trim)] + [(0, 0)] * (values.ndim - 2)
        values = values + jnp.pad(state, widths)
        ready = x.shape[1] * self.config.frame_step
        return Sequence(values[:, :ready], mask), values[:, ready:]

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        self._validate_input_shape(x.channel_shape)
        if self.config.frame_length > 1:
            x = x.mask_invalid()
        k, s = self.config.frame_length, self.config.frame_step
        time = x.shape[1]
        values = _overlap_add_sequence_values(x.values, s)
        if self.config.padding == "causal":
            return Sequence(values[:, : time * s], jnp.repeat(x.mask, s, axis=1))
        # A sample's overlapping frames: overlap-add an indicator per frame.
        if self.config.padding == "valid":
            invalid = jnp.broadcast_to((~x.mask)[:, :, None], (x.shape[0], time, k))
            hits = signal.overlap_and_add(invalid.astype(jnp.int32), s)
            return Sequence(values, (hits == 0).astype(MASK_DTYPE))
        valid = jnp.broadcast_to(x.mask[:, :, None], (x.shape[0], time, k))
        hits = signal.overlap_and_add(valid.astype(jnp.int32), s)
        return Sequence(values[:, self._trim :], (hits > 0)[:, self._trim :])
