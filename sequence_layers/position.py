"""Position layers: sinusoidal timing signals and rotary position encodings.

Both keep the position per batch row (`[b, 1]` state) and by default advance
it on valid frames only, so a row's leading invalid frames (an upstream
latency, or a stream that has not started yet) do not shift its positions,
and rows reset independently.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import types
from sequence_layers.sequence import ChannelSpec, Sequence
from sequence_layers.types import Constants, ReceptiveField, State

__all__ = ["AddTimingSignal", "ApplyRotaryPositionalEncoding"]

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _check_float(layer: types.SequenceLayer, dtype: Any) -> None:
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise ValueError(f"{type(layer).__name__} needs floating point inputs, got {dtype}.")


def match_shape_along_axes(
    channel_shape: tuple[int, ...], axes: int | tuple[int, ...] | None
) -> tuple[int, ...]:
    """`channel_shape` on `axes` (channel axes, negative allowed), 1 elsewhere;
    all of it when `axes` is None."""
    if axes is None:
        return tuple(channel_shape)
    target = [1] * len(channel_shape)
    for axis in (axes,) if isinstance(axes, int) else axes:
        if not -len(channel_shape) <= axis < len(channel_shape):
            raise ValueError(f"Axis {axis} is out of range for channel shape {channel_shape}.")
        target[axis] = channel_shape[axis]
    return tuple(target)


def timing_signal(
    position: jax.Array,
    channels: int,
    min_timescale: float = 1.0,
    max_timescale: float = 1.0e4,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """Sinusoids of positions `[b, t]` -> `[b, t, channels]` (tensor2tensor):
    `channels // 2` timescales spaced geometrically from `min_timescale` to
    `max_timescale`; sines first, then cosines, zero-padded if odd."""
    position = position.astype(jnp.float32)
    num_timescales = channels // 2
    log_increment = math.log(float(max_timescale) / float(min_timescale)) / max(
        num_timescales - 1, 1
    )
    inv_timescales = min_timescale * np.exp(
        np.arange(num_timescales, dtype=np.float32) * -log_increment
    )
    scaled = position[:, :, None] * inv_timescales[None, None, :]
    signal = jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=2)
    signal = jnp.pad(signal, [(0, 0), (0, 0), (0, channels % 2)])
    return signal.astype(dtype)


def _initial_position(batch_size: int, valid_only: bool) -> jax.Array:
    # Valid-only: the last position used (-1 before the first valid frame).
    # Physical: the next position.
    return jnp.full((batch_size, 1), -1 if valid_only else 0, jnp.int32)


def _step_positions(x: Sequence, state: jax.Array, valid_only: bool) -> tuple[jax.Array, jax.Array]:
    """Positions `[b, t]` of a block and the next state `[b, 1]`."""
    if valid_only:
        positions = state + jnp.cumsum(x.mask.astype(jnp.int32), axis=1)
        return positions, positions[:, -1:]
    positions = state + jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
    return positions, state + x.shape[1]


def _layer_positions(x: Sequence, valid_only: bool) -> jax.Array:
    if valid_only:
        return jnp.maximum(jnp.cumsum(x.mask.astype(jnp.int32), axis=1) - 1, 0)
    return jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32)[None, :], x.mask.shape)


class AddTimingSignal(types.PreservesType, types.PreservesShape, types.SequenceLayer):
    """Adds sinusoidal timing signals: `[b, t, ...]` -> `[b, t, ...]`.

    The signal varies over the channel `axes` (default: all channels) and is
    broadcast over the others. Position state is per row, `[b, 1]`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Shortest sinusoid timescale.
        min_timescale: float = 1.0
        # Longest sinusoid timescale.
        max_timescale: float = 1.0e4
        # Learn a scalar scale of the signal (initialized to 1).
        trainable_scale: bool = False
        # Channel axes the signal varies over; None means all.
        axes: int | tuple[int, ...] | None = None
        # Accepted for reference compatibility; unused (no sharding here).
        sharding: Any = None
        # Dtype of the scale parameter and the signal.
        param_dtype: Any = jnp.float32
        # Advance positions on valid frames only (else on every frame).
        only_advance_position_for_valid_timesteps: bool = True
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            if isinstance(self.axes, list):
                object.__setattr__(self, "axes", tuple(self.axes))

        def make(self) -> AddTimingSignal:
            return AddTimingSignal(self, name=self.name)

    config: Config

    def setup(self) -> None:
        if self.config.trainable_scale:
            self.scale = self.param(
                "scale", nn.initializers.ones_init(), (), self.config.param_dtype
            )
        else:
            self.scale = None

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        # Valid-only positions count the valid frames before this one.
        if self.config.only_advance_position_for_valid_timesteps:
            return {0: (-math.inf, 0)}
        return {0: (0, 0)}

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        _check_float(self, input_spec.dtype)
        return _initial_position(batch_size, self.config.only_advance_position_for_valid_timesteps)

    @nn.nowrap
    def _add(self, x: Sequence, positions: jax.Array) -> Sequence:
        target = match_shape_along_axes(x.channel_shape, self.config.axes)
        signal = timing_signal(
            positions,
            int(np.prod(target)),
            self.config.min_timescale,
            self.config.max_timescale,
            self.config.param_dtype,
        ).reshape(positions.shape + target)
        if self.scale is not None:
            signal = signal * self.scale
        return x.apply_values(lambda v: v + signal.astype(v.dtype))

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        _check_float(self, x.dtype)
        positions, state = _step_positions(
            x, state, self.config.only_advance_position_for_valid_timesteps
        )
        return self._add(x, positions), state

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        _check_float(self, x.dtype)
        positions = _layer_positions(x, self.config.only_advance_position_for_valid_timesteps)
        return self._add(x, positions)


class ApplyRotaryPositionalEncoding(types.PreservesType, types.PreservesShape, types.SequenceLayer):
    """Rotary position encoding (RoPE, arXiv:2104.09864) along a channel axis:
    `[b, t, ...]` -> `[b, t, ...]`.

    The two halves `(x1, x2)` of `axis` rotate by angle `position / timescale_i`
    with `timescale_i = max_wavelength ** (2 i / dim)`. Positions come from a
    per-row `[b, 1]` state, or from `constants[positions_name]` (`[b, t]`
    ints, aligned with the input block when stepping).
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Longest wavelength of the rotations.
        max_wavelength: float
        # Channel axis to rotate; its size must be even.
        axis: int = -1
        # Advance positions on valid frames only (else on every frame).
        only_advance_position_for_valid_timesteps: bool = True
        # Compute the angles in at least float32.
        positions_in_at_least_fp32: bool = True
        # Read `[b, t]` positions from constants under this name instead.
        positions_name: str | None = None
        # Optional module name.
        name: str | None = None

        def make(self) -> ApplyRotaryPositionalEncoding:
            return ApplyRotaryPositionalEncoding(self, name=self.name)

    config: Config

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        if (
            self.config.positions_name is None
            and self.config.only_advance_position_for_valid_timesteps
        ):
            return {0: (-math.inf, 0)}
        return {0: (0, 0)}

    @nn.nowrap
    def _axis(self, rank: int) -> int:
        return self.config.axis + rank if self.config.axis < 0 else self.config.axis

    @nn.nowrap
    def _check_inputs(self, spec: ChannelSpec) -> None:
        _check_float(self, spec.dtype)
        rank = len(spec.shape) + 2
        axis = self._axis(rank)
        if not 2 <= axis < rank:
            raise ValueError(
                f"{type(self).__name__} axis={self.config.axis} must be a channel axis of "
                f"channel shape {tuple(spec.shape)}."
            )
        if spec.shape[axis - 2] % 2:
            raise ValueError(
                f"{type(self).__name__} needs an even size on axis {self.config.axis}, got "
                f"channel shape {tuple(spec.shape)}."
            )

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        self._check_inputs(input_spec)
        if self.config.positions_name:
            return ()
        return _initial_position(batch_size, self.config.only_advance_position_for_valid_timesteps)

    @nn.nowrap
    def _constant_positions(self, x: Sequence, constants: Constants | None) -> jax.Array:
        name = self.config.positions_name
        value = (constants or {}).get(name)
        if value is None:
            raise ValueError(
                f"{type(self).__name__} reads positions from constants[{name!r}], which is "
                f"missing (constants keys: {sorted(constants or {})})."
            )
        if isinstance(value, Sequence):
            value = value.values
        try:
            return jnp.broadcast_to(value, x.shape[:2])
        except ValueError as e:
            raise ValueError(
                f"constants[{name!r}] has shape {value.shape}; positions must broadcast to "
                f"[batch, time] = {x.shape[:2]} (when stepping, pass the block's positions)."
            ) from e

    @nn.nowrap
    def _rotate(self, x: Sequence, positions: jax.Array) -> Sequence:
        axis = self._axis(x.ndim)
        dim = x.shape[axis]
        exponents = 2.0 * np.arange(dim // 2) / dim
        timescale = self.config.max_wavelength**exponents
        shape = [1] * x.ndim
        shape[axis] = dim // 2
        compute = x.dtype
        if self.config.positions_in_at_least_fp32:
            compute = jnp.promote_types(x.dtype, jnp.float32)
        radians = positions.astype(compute).reshape(positions.shape + (1,) * (x.ndim - 2))
        radians = radians / jnp.asarray(timescale, compute).reshape(shape)
        sin, cos = jnp.sin(radians), jnp.cos(radians)

        def rotate(v: jax.Array) -> jax.Array:
            x1, x2 = jnp.split(v.astype(compute), 2, axis=axis)
            out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis)
            return out.astype(v.dtype)

        # A rotation maps zero frames to zero frames.
        return x.apply_values_masked(rotate)

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        self._check_inputs(x.channel_spec)
        if self.config.positions_name:
            return self._rotate(x, self._constant_positions(x, constants)), state
        positions, state = _step_positions(
            x, state, self.config.only_advance_position_for_valid_timesteps
        )
        return self._rotate(x, positions), state

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        self._check_inputs(x.channel_spec)
        if self.config.positions_name:
            positions = self._constant_positions(x, constants)
        else:
            positions = _layer_positions(x, self.config.only_advance_position_for_valid_timesteps)
        return self._rotate(x, positions)
