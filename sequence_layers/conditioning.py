"""Conditioning: combine the input with a (projected) conditioning input.

`y = combine(x, project(c))`, with `c = constants[conditioning_name]`:
- an array `[b, ...]`: one vector per row, broadcast over time;
- a `Sequence [b, t, ...]` with `streaming=True`: time-aligned with `x`; when
  stepping, the caller passes the block's slice;
- a `Sequence [b, t, ...]` with `streaming=False`: the whole sequence is in the
  constants; `step` reads the block at a per-row index `[b]`, so rows reset
  independently.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import MASK_DTYPE, ChannelSpec, Sequence
from sequence_layers.types import Constants, ReceptiveField, State

__all__ = ["Combination", "Conditioning", "Projection"]


@enum.unique
class Projection(enum.Enum):
    """How the conditioning is projected before combining."""

    # No projection.
    IDENTITY = 1
    # Dense from all conditioning channels to `projection_channel_shape`.
    LINEAR = 2
    # Dense to `(2, *projection_channel_shape)`: a scale and a shift.
    LINEAR_AFFINE = 3


@enum.unique
class Combination(enum.Enum):
    """How the projected conditioning is combined with the input."""

    # x + c (broadcast).
    ADD = 1
    # [x, c] on the last channel axis (other channel axes broadcast).
    CONCAT = 2
    # x * (scale + offset) + shift; needs LINEAR_AFFINE.
    AFFINE = 3
    # x + c; needs LINEAR.
    AFFINE_SHIFT = 4
    # x * (c + offset); needs LINEAR.
    AFFINE_SCALE = 5
    # x * c (broadcast).
    MUL = 6
    # [c, x] on the last channel axis.
    CONCAT_BEFORE = 7


def _as_enum(enum_type: type[enum.Enum], value: Any) -> Any:
    if isinstance(value, enum_type):
        return value
    if isinstance(value, str) and value.upper() in enum_type.__members__:
        return enum_type[value.upper()]
    raise ValueError(
        f"Unknown {enum_type.__name__} {value!r}; expected one of "
        f"{[m.name.lower() for m in enum_type]}."
    )


class _DenseShaped(nn.Module):
    """Dense from every conditioning channel to `output_shape`: kernel
    `[*c_in, *out]`, bias `[*out]` (the reference's DenseShaped layout)."""

    param_dtype: Any
    compute_dtype: Any
    kernel_init: Callable[..., Any]
    bias_init: Callable[..., Any]

    @nn.compact
    def __call__(self, values: jax.Array, output_shape: tuple[int, ...]) -> jax.Array:
        in_shape = tuple(values.shape[2:]) or (1,)
        out_shape = tuple(output_shape) or (1,)
        fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)

        # Initialize as a [fan_in, fan_out] matrix so fan-in scaling is right.
        def kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
            return self.kernel_init(key, (fan_in, fan_out), dtype).reshape(shape)

        kernel = self.param("kernel", kernel_init, in_shape + out_shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, out_shape, self.param_dtype)
        v, kernel, bias = nn.dtypes.promote_dtype(values, kernel, bias, dtype=self.compute_dtype)
        v = v.reshape((*v.shape[:2], fan_in))
        y = jnp.einsum("bti,io->bto", v, kernel.reshape(fan_in, fan_out)) + bias.reshape(-1)
        return y.reshape(y.shape[:2] + tuple(output_shape))


def _expand_channels(values: jax.Array, rank: int) -> jax.Array:
    """Inserts unit channel axes after time so the channel rank is `rank`."""
    extra = rank - (values.ndim - 2)
    return values.reshape(values.shape[:2] + (1,) * extra + values.shape[2:])


def _combine_masks(x: Sequence, c: Sequence) -> jax.Array:
    return jnp.logical_and(x.mask, c.mask).astype(MASK_DTYPE)


class Conditioning(types.PreservesType, types.SequenceLayer):
    """Conditions `x [b, t, ...]` on `constants[conditioning_name]`.

    Example shapes (IDENTITY/ADD): x `[b, t, 3, 1, 5]` + c `[b, t, 2, 5]` ->
    `[b, t, 3, 2, 5]`; LINEAR/CONCAT: x `[b, t, 3]`, c `[b, t, 7]` -> `[b, t, 6]`.
    An output frame is valid iff both the input and the conditioning frame are.
    """

    Projection = Projection
    Combination = Combination

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Key of the conditioning array or Sequence in the constants.
        conditioning_name: str
        # Projection of the conditioning (enum or its name).
        projection: Projection
        # Combination with the input (enum or its name).
        combination: Combination
        # Channel shape to project to; None means x's channel shape.
        projection_channel_shape: tuple[int, ...] | None = None
        # The conditioning Sequence is streamed block by block with x.
        streaming: bool = False
        # Dtype of the projection compute; None promotes input and params.
        compute_dtype: Any = None
        # Dtype of the projection parameters.
        param_dtype: Any = jnp.float32
        # Projection kernel initializer.
        kernel_init: Callable[..., Any] = nn.linear.default_kernel_init
        # Accepted for reference compatibility; unused.
        kernel_sharding: Any = None
        # Projection bias initializer.
        bias_init: Callable[..., Any] = nn.initializers.zeros
        # Accepted for reference compatibility; unused.
        bias_sharding: Any = None
        # Added to the scale for AFFINE / AFFINE_SCALE (1 starts near identity).
        affine_scale_offset: complex = 1.0
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            projection = _as_enum(Projection, self.projection)
            combination = _as_enum(Combination, self.combination)
            object.__setattr__(self, "projection", projection)
            object.__setattr__(self, "combination", combination)
            if self.projection_channel_shape is not None:
                object.__setattr__(
                    self, "projection_channel_shape", tuple(self.projection_channel_shape)
                )
            needs = {
                Combination.AFFINE: Projection.LINEAR_AFFINE,
                Combination.AFFINE_SHIFT: Projection.LINEAR,
                Combination.AFFINE_SCALE: Projection.LINEAR,
            }
            if combination in needs and projection != needs[combination]:
                raise ValueError(
                    f"Combination {combination.name} needs projection "
                    f"{needs[combination].name}, got {projection.name}."
                )
            if projection == Projection.LINEAR_AFFINE and combination != Combination.AFFINE:
                raise ValueError(
                    f"Projection LINEAR_AFFINE needs combination AFFINE, got {combination.name}."
                )

        def make(self) -> Conditioning:
            return Conditioning(self, name=self.name)

    config: Config

    def setup(self) -> None:
        if self.config.projection != Projection.IDENTITY:
            self.dense = _DenseShaped(
                param_dtype=self.config.param_dtype,
                compute_dtype=self.config.compute_dtype,
                kernel_init=self.config.kernel_init,
                bias_init=self.config.bias_init,
            )

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return {0: (0, 0)}

    # Shapes ------------------------------------------------------------------

    @nn.nowrap
    def _conditioning(self, constants: Constants | None) -> Any:
        name = self.config.conditioning_name
        value = (constants or {}).get(name)
        if value is None:
            raise ValueError(
                f"Conditioning needs constants[{name!r}] (an array [b, ...] or a Sequence "
                f"[b, t, ...]); constants has keys {sorted(constants or {})}."
            )
        if not isinstance(value, Sequence) and not hasattr(value, "shape"):
            raise ValueError(
                f"constants[{name!r}] must be an array or a Sequence, got {type(value)}."
            )
        return value

    @nn.nowrap
    def _projected_shape(
        self, input_shape: tuple[int, ...], conditioning_shape: tuple[int, ...]
    ) -> tuple[int, ...]:
        target = self.config.projection_channel_shape
        target = tuple(input_shape) if target is None else target
        match self.config.projection:
            case Projection.IDENTITY:
                return tuple(conditioning_shape)
            case Projection.LINEAR:
                return target
            case Projection.LINEAR_AFFINE:
                return (2, *target)
        raise AssertionError(self.config.projection)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: tuple[int, ...] | list[int], *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        c = self._conditioning(constants)
        c_shape = tuple(c.channel_shape if isinstance(c, Sequence) else c.shape[1:])
        input_shape = tuple(input_shape)
        projected = self._projected_shape(input_shape, c_shape)
        try:
            match self.config.combination:
                case Combination.CONCAT | Combination.CONCAT_BEFORE:
                    rank = max(len(input_shape), len(projected), 1)
                    x_full = (1,) * (rank - len(input_shape)) + (input_shape or (1,))
                    c_full = (1,) * (rank - len(projected)) + (projected or (1,))
                    outer = jnp.broadcast_shapes(x_full[:-1], c_full[:-1])
                    return (*outer, x_full[-1] + c_full[-1])
                case Combination.AFFINE:
                    return tuple(jnp.broadcast_shapes(input_shape, projected[1:]))
                case _:
                    return tuple(jnp.broadcast_shapes(input_shape, projected))
        except ValueError as e:
            raise ValueError(
                f"Conditioning {self.config.combination.name} cannot broadcast input channels "
                f"{input_shape} with projected conditioning channels {projected}."
            ) from e

    # Running -----------------------------------------------------------------

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        c = self._conditioning(constants)
        if isinstance(c, Sequence) and not self.config.streaming:
            # Per-row read position in the conditioning sequence.
            return jnp.zeros((batch_size,), jnp.int32)
        return ()

    @nn.nowrap
    def _project(self, x: Sequence, c: Sequence) -> Sequence:
        if self.config.projection == Projection.IDENTITY:
            return c
        shape = self._projected_shape(x.channel_shape, c.channel_shape)
        return Sequence(self.dense(c.values, shape), c.mask)

    @nn.nowrap
    def _combine(self, x: Sequence, c: Sequence) -> Sequence:
        offset = self.config.affine_scale_offset
        mask = _combine_masks(x, c)
        combination = self.config.combination
        if combination == Combination.AFFINE:
            scale, shift = c.values[:, :, 0], c.values[:, :, 1]
            rank = max(x.ndim, scale.ndim) - 2
            xv = _expand_channels(x.values, rank)
            scale, shift = _expand_channels(scale, rank), _expand_channels(shift, rank)
            return Sequence(xv * (scale + offset) + shift, mask)
        if combination in (Combination.CONCAT, Combination.CONCAT_BEFORE):
            rank = max(x.ndim - 2, c.ndim - 2, 1)
            xv = x.values if x.ndim > 2 else x.values[..., None]
            cv = c.values if c.ndim > 2 else c.values[..., None]
            xv, cv = _expand_channels(xv, rank), _expand_channels(cv, rank)
            batch, time = max(xv.shape[0], cv.shape[0]), max(xv.shape[1], cv.shape[1])
            outer = jnp.broadcast_shapes(xv.shape[2:-1], cv.shape[2:-1])
            xv = jnp.broadcast_to(xv, (batch, time, *outer, xv.shape[-1]))
            cv = jnp.broadcast_to(cv, (batch, time, *outer, cv.shape[-1]))
            parts = [xv, cv] if combination == Combination.CONCAT else [cv, xv]
            return Sequence(jnp.concatenate(parts, axis=-1), mask)
        rank = max(x.ndim, c.ndim) - 2
        xv, cv = _expand_channels(x.values, rank), _expand_channels(c.values, rank)
        if combination == Combination.AFFINE_SCALE:
            return Sequence(xv * (cv + offset), mask)
        if combination == Combination.MUL:
            return Sequence(xv * cv, mask)
        return Sequence(xv + cv, mask)  # ADD, AFFINE_SHIFT

    @nn.nowrap
    def _check_output(self, x: Sequence, y: Sequence, constants: Constants | None) -> None:
        # types.check_layer/check_step cannot be used: they compute the output
        # shape without the constants, which this layer's shape depends on.
        expected = self.get_output_shape(x.channel_shape, constants=constants)
        if y.channel_shape != expected:
            raise ValueError(
                f"Conditioning produced channels {y.channel_shape}, expected {expected}."
            )

    @nn.nowrap
    def _as_sequence(self, c: Any, x: Sequence) -> Sequence:
        if isinstance(c, Sequence):
            if c.shape[1] not in (1, x.shape[1]):
                raise ValueError(
                    f"The conditioning Sequence {self.config.conditioning_name!r} has "
                    f"{c.shape[1]} frames but the input has {x.shape[1]}; they must be "
                    "time-aligned (streaming=True: pass the block's slice when stepping)."
                )
            return c
        c = jnp.asarray(c)
        return Sequence(c[:, None], jnp.ones((c.shape[0], 1), MASK_DTYPE))

    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        c = self._as_sequence(self._conditioning(constants), x)
        y = self._combine(x, self._project(x, c))
        self._check_output(x, y, constants)
        return y

    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        c = self._conditioning(constants)
        if isinstance(c, Sequence) and not self.config.streaming:
            c = _batched_time_slice(c, state, x.shape[1])
            state = state + x.shape[1]
        c = self._as_sequence(c, x)
        y = self._combine(x, self._project(x, c))
        self._check_output(x, y, constants)
        return y, state


def _batched_time_slice(c: Sequence, start: jax.Array, size: int) -> Sequence:
    """Row b's frames `[start[b], start[b] + size)`; frames past the end are invalid."""
    if c.shape[1] == 0:
        return c.pad_time(0, size, valid=False)
    index = start[:, None] + jnp.arange(size)[None, :]
    inside = index < c.shape[1]
    index = jnp.clip(index, 0, c.shape[1] - 1)
    mask = jnp.take_along_axis(c.mask, index, axis=1) & inside
    expanded = index.reshape(index.shape + (1,) * (c.ndim - 2))
    values = jnp.take_along_axis(c.values, expanded, axis=1)
    return Sequence(values, mask)
