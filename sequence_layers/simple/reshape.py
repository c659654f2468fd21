"""Channel-shape operations on `[b, t, *c]` (slicing, reshaping, permuting),
all stateless and frame by frame, plus two global reshapes that move data
between time and channels and therefore cannot step.

Axis conventions follow the reference: `Transpose`, `SwapAxes`, `MoveAxis`
and `Squeeze` count axes of the whole `[b, t, ...]` array (channel axes are
>= 2 or negative); `ExpandDims` and `Slice` address the channel shape only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from collections.abc import Sequence as PySequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import Sequence
from sequence_layers.simple._common import CheckedStep, normalize_axes

__all__ = [
    "EinopsRearrange",
    "ExpandDims",
    "Flatten",
    "GlobalEinopsRearrange",
    "GlobalReshape",
    "MoveAxis",
    "Reshape",
    "Slice",
    "Squeeze",
    "SwapAxes",
    "Transpose",
]

SliceSpec = tuple[int | None, int | None, int | None] | int | None


class _ChannelOp(CheckedStep, types.PreservesType, types.Stateless):
    """A frame-by-frame values-only op; zero frames stay zero, so a masked
    input stays masked."""

    @nn.nowrap
    def _fn(self, values: jax.Array) -> jax.Array:
        raise NotImplementedError

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self.get_output_shape(x.channel_shape)
        return x.apply_values_masked(self._fn)


class Slice(_ChannelOp):
    """Indexes the channel axes numpy-style: per channel axis a
    `(start, stop, step)` tuple (a slice), an int (drops the axis), or None
    (inserts a size-1 axis)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # One entry per channel axis (None entries add axes); `slice` objects
        # are accepted and stored as (start, stop, step).
        slices: PySequence[SliceSpec]
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            slices = tuple(
                (s.start, s.stop, s.step) if isinstance(s, slice) else s for s in self.slices
            )
            slices = tuple(tuple(s) if isinstance(s, list) else s for s in slices)
            object.__setattr__(self, "slices", slices)

        def as_slices(self) -> tuple[slice | int | None, ...]:
            return tuple(slice(*s) if isinstance(s, tuple) else s for s in self.slices)

        def make(self) -> Slice:
            return Slice(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        used = sum(s is not None for s in self.config.slices)
        if used != len(input_shape):
            raise ValueError(
                f"Slice needs one non-None entry per channel axis: got {self.config.slices=} "
                f"for input channel shape {tuple(input_shape)}."
            )
        dims, i = [], 0
        for s in self.config.as_slices():
            if s is None:
                dims.append(1)
                continue
            if isinstance(s, slice):
                dims.append(len(range(*s.indices(input_shape[i]))))
            elif not -input_shape[i] <= s < input_shape[i]:
                raise ValueError(
                    f"Slice index {s} is out of range for axis of size {input_shape[i]}."
                )
            i += 1
        return tuple(dims)

    def _fn(self, values: jax.Array) -> jax.Array:
        return values[(slice(None), slice(None), *self.config.as_slices())]


class Flatten(_ChannelOp):
    """`[b, t, *c] -> [b, t, prod(c)]`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Optional layer name.
        name: str | None = None

        def make(self) -> Flatten:
            return Flatten(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return (math.prod(input_shape),)

    def _fn(self, values: jax.Array) -> jax.Array:
        return values.reshape((*values.shape[:2], math.prod(values.shape[2:])))


class ExpandDims(_ChannelOp):
    """Inserts size-1 channel axes; e.g. axis `(0, -2)` maps `[b, t, c, d]` to
    `[b, t, 1, c, 1, d]` (axes index the output channel shape, as
    `np.expand_dims`)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Channel axis or axes at which size-1 axes appear.
        axis: int | PySequence[int]
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            if not isinstance(self.axis, int):
                object.__setattr__(self, "axis", normalize_axes(self.axis))

        def make(self) -> ExpandDims:
            return ExpandDims(self, name=self.name)

    config: Config

    @nn.nowrap
    def _dims(self, input_shape: types.ShapeLike) -> list[int]:
        # numpy semantics: axes (also negative ones) index the output shape.
        axes = normalize_axes(self.config.axis)
        out_rank = len(input_shape) + len(axes)
        dims = sorted(a + out_rank if a < 0 else a for a in axes)
        if len(set(dims)) != len(dims) or any(not 0 <= d < out_rank for d in dims):
            raise ValueError(
                f"ExpandDims axis={self.config.axis} is out of range or repeated for input "
                f"channel shape {tuple(input_shape)}: axes index the output channel shape, "
                f"in [-{out_rank}, {out_rank})."
            )
        return dims

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        shape = list(input_shape)
        for d in self._dims(input_shape):
            shape.insert(d, 1)
        return tuple(shape)

    def _fn(self, values: jax.Array) -> jax.Array:
        return jnp.expand_dims(values, [2 + d for d in self._dims(values.shape[2:])])


class Reshape(_ChannelOp):
    """Reshapes the channel shape to `output_shape` (same element count, no -1)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The new channel shape.
        output_shape: PySequence[int]
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "output_shape", tuple(self.output_shape))

        def make(self) -> Reshape:
            return Reshape(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        if math.prod(input_shape) != math.prod(self.config.output_shape):
            raise ValueError(
                f"Reshape output_shape={self.config.output_shape} must have as many elements "
                f"as the input channel shape {tuple(input_shape)}."
            )
        return self.config.output_shape

    def _fn(self, values: jax.Array) -> jax.Array:
        return values.reshape(values.shape[:2] + self.config.output_shape)


def _reject_batch_time(layer_name: str, axes: PySequence[int]) -> None:
    if 0 in axes or 1 in axes:
        raise ValueError(
            f"{layer_name} cannot move the batch or time axis (0 or 1), got axes {tuple(axes)}; "
            "channel axes are >= 2 or negative."
        )


class Transpose(_ChannelOp):
    """Permutes the channel axes: `axes` is a permutation of `range(2, ndim)`;
    None reverses them."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # New order of the axes 2..ndim-1 of `[b, t, ...]`; None: reversed.
        axes: PySequence[int] | None = None
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            if self.axes is not None:
                object.__setattr__(self, "axes", tuple(self.axes))
                _reject_batch_time("Transpose", self.axes)

        def make(self) -> Transpose:
            return Transpose(self, name=self.name)

    config: Config

    @nn.nowrap
    def _permutation(self, input_shape: types.ShapeLike) -> tuple[int, ...]:
        channel_axes = tuple(range(2, 2 + len(input_shape)))
        if self.config.axes is None:
            return channel_axes[::-1]
        if tuple(sorted(self.config.axes)) != channel_axes:
            raise ValueError(
                f"Transpose axes={self.config.axes} must be a permutation of {channel_axes} "
                f"for input channel shape {tuple(input_shape)}."
            )
        return tuple(self.config.axes)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return tuple(input_shape[a - 2] for a in self._permutation(input_shape))

    def _fn(self, values: jax.Array) -> jax.Array:
        return jnp.transpose(values, (0, 1, *self._permutation(values.shape[2:])))


def _canonical_axes(layer_name: str, axes: PySequence[int], ndim: int) -> list[int]:
    result = [a + ndim if a < 0 else a for a in axes]
    if any(not 2 <= a < ndim for a in result):
        raise ValueError(
            f"{layer_name} axes {tuple(axes)} are out of the channel axes [2, {ndim}) of a "
            f"rank-{ndim} input."
        )
    return result


class SwapAxes(Transpose):
    """Swaps two channel axes (`axis1`, `axis2` count batch and time)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # First axis of `[b, t, ...]` to swap.
        axis1: int
        # Second axis of `[b, t, ...]` to swap.
        axis2: int
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            _reject_batch_time("SwapAxes", (self.axis1, self.axis2))

        def make(self) -> SwapAxes:
            return SwapAxes(self, name=self.name)

    config: Config  # type: ignore[assignment]

    @nn.nowrap
    def _permutation(self, input_shape: types.ShapeLike) -> tuple[int, ...]:
        ndim = len(input_shape) + 2
        a, b = _canonical_axes("SwapAxes", (self.config.axis1, self.config.axis2), ndim)
        perm = list(range(ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return tuple(perm[2:])


class MoveAxis(Transpose):
    """Moves channel axes `source` to positions `destination` (as
    `jnp.moveaxis`; axes count batch and time)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Axis or axes of `[b, t, ...]` to move.
        source: int | PySequence[int]
        # Where each source axis ends up.
        destination: int | PySequence[int]
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "source", normalize_axes(self.source))
            object.__setattr__(self, "destination", normalize_axes(self.destination))
            _reject_batch_time("MoveAxis", (*self.source, *self.destination))
            if len(self.source) != len(self.destination):
                raise ValueError(
                    f"MoveAxis needs as many destinations as sources, got {self.source=} "
                    f"{self.destination=}."
                )

        def make(self) -> MoveAxis:
            return MoveAxis(self, name=self.name)

    config: Config  # type: ignore[assignment]

    @nn.nowrap
    def _permutation(self, input_shape: types.ShapeLike) -> tuple[int, ...]:
        ndim = len(input_shape) + 2
        source = _canonical_axes("MoveAxis", self.config.source, ndim)
        destination = _canonical_axes("MoveAxis", self.config.destination, ndim)
        perm = [i for i in range(ndim) if i not in source]
        for dest, src in sorted(zip(destination, source, strict=True)):
            perm.insert(dest, src)
        return tuple(perm[2:])


class Squeeze(_ChannelOp):
    """Removes size-1 channel axes: those in `axis` (counting batch and time),
    or all of them when `axis` is None."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Axis or axes of `[b, t, ...]` to remove; None: every size-1 channel axis.
        axis: int | PySequence[int] | None = None
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            if self.axis is not None and not isinstance(self.axis, int):
                object.__setattr__(self, "axis", normalize_axes(self.axis))
            if self.axis is not None:
                _reject_batch_time("Squeeze", normalize_axes(self.axis))

        def make(self) -> Squeeze:
            return Squeeze(self, name=self.name)

    config: Config

    @nn.nowrap
    def _axes(self, input_shape: types.ShapeLike) -> tuple[int, ...]:
        if self.config.axis is None:
            return tuple(i + 2 for i, d in enumerate(input_shape) if d == 1)
        axes = _canonical_axes("Squeeze", normalize_axes(self.config.axis), len(input_shape) + 2)
        if any(input_shape[a - 2] != 1 for a in axes):
            raise ValueError(
                f"Squeeze axis={self.config.axis} must select size-1 axes of the input "
                f"[b, t, *{tuple(input_shape)}]."
            )
        return tuple(axes)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        axes = self._axes(input_shape)
        return tuple(d for i, d in enumerate(input_shape) if i + 2 not in axes)

    def _fn(self, values: jax.Array) -> jax.Array:
        return jnp.squeeze(values, self._axes(values.shape[2:]))


def _parse_pattern(
    pattern: str, reserved: tuple[str, ...], axes_lengths: Any
) -> tuple[str, str, tuple[tuple[str, int], ...] | None]:
    if "->" not in pattern:
        raise ValueError(f"The einops pattern needs '->', got {pattern!r}.")
    labels = set(pattern.replace("(", " ").replace(")", " ").replace("->", " ").split())
    if clash := labels.intersection(reserved):
        raise ValueError(f"{sorted(clash)} are reserved axis names, got pattern {pattern!r}.")
    if isinstance(axes_lengths, Mapping):
        axes_lengths = tuple(sorted(axes_lengths.items()))
    elif axes_lengths is not None:
        axes_lengths = tuple(tuple(kv) for kv in axes_lengths)
    before, after = pattern.split("->")
    return before, after, axes_lengths


class EinopsRearrange(_ChannelOp):
    """`einops.rearrange` of the channel axes; e.g. pattern `'h d -> (h d)'`
    maps `[b, t, h, d]` to `[b, t, h*d]`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Rearrangement of the channel axes (batch and time are implicit).
        pattern: str
        # Sizes of axes the pattern cannot infer, e.g. {'h': 4}; stored as
        # sorted (name, size) pairs.
        axes_lengths: Mapping[str, int] | tuple[tuple[str, int], ...] | None = None
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            _, _, lengths = _parse_pattern(self.pattern, ("batch", "time"), self.axes_lengths)
            object.__setattr__(self, "axes_lengths", lengths)

        def make(self) -> EinopsRearrange:
            return EinopsRearrange(self, name=self.name)

    config: Config

    @nn.nowrap
    def _rearrange(self) -> Callable[[jax.Array], jax.Array]:
        before, after = self.config.pattern.split("->")
        pattern = f"batch time {before} -> batch time {after}"
        return functools.partial(
            einops.rearrange, pattern=pattern, **dict(self.config.axes_lengths or ())
        )

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        spec = jax.ShapeDtypeStruct((1, 1, *input_shape), jnp.float32)
        return tuple(jax.eval_shape(self._rearrange(), spec).shape[2:])

    def _fn(self, values: jax.Array) -> jax.Array:
        return self._rearrange()(values)


def _global_mask(x: Sequence, reshape: Callable[[jax.Array], jax.Array], ceil: bool) -> jax.Array:
    """An output frame is valid iff all (or, with `ceil`, any) of the input
    elements moved into it are valid."""
    mask = jnp.broadcast_to(x.expanded_mask(), x.shape)
    mask = reshape(mask)
    reduce = jnp.any if ceil else jnp.all
    return reduce(mask, axis=tuple(range(2, mask.ndim)))


class _GlobalOp(CheckedStep, types.PreservesType, types.Stateless):
    """Mixes time and channels: depends on the whole sequence, not steppable."""

    @property
    def supports_step(self) -> bool:
        return False

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return {0: (-math.inf, math.inf)}


class GlobalReshape(_GlobalOp):
    """Reshapes `[b, t, *c]` to `[b, *output_shape]` (time and channels
    together). An output frame is valid iff every input element in it is."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The new `[time, *channels]` shape (no -1; same element count).
        output_shape: PySequence[int]
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "output_shape", tuple(self.output_shape))

        def make(self) -> GlobalReshape:
            return GlobalReshape(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return tuple(self.config.output_shape[1:])

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        if math.prod(x.shape[1:]) != math.prod(self.config.output_shape):
            raise ValueError(
                f"GlobalReshape output_shape={self.config.output_shape} must have as many "
                f"elements as the input [time, *channels] = {x.shape[1:]}."
            )

        def reshape(v: jax.Array) -> jax.Array:
            return v.reshape((v.shape[0], *self.config.output_shape))

        return Sequence(reshape(x.values), _global_mask(x, reshape, ceil=False))


class GlobalEinopsRearrange(_GlobalOp):
    """`einops.rearrange` over time and channels; e.g. `'(t k) c -> t (k c)'`
    with `axes_lengths={'k': 2}` stacks pairs of frames."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Rearrangement of `[time, *channels]` (batch is implicit).
        pattern: str
        # Sizes of axes the pattern cannot infer; stored as (name, size) pairs.
        axes_lengths: Mapping[str, int] | tuple[tuple[str, int], ...] | None = None
        # An output frame is valid if any (True) or all (False) of the input
        # elements moved into it are valid.
        ceil_mode: bool = False
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            _, _, lengths = _parse_pattern(self.pattern, ("batch",), self.axes_lengths)
            object.__setattr__(self, "axes_lengths", lengths)

        def make(self) -> GlobalEinopsRearrange:
            return GlobalEinopsRearrange(self, name=self.name)

    config: Config

    @nn.nowrap
    def _rearrange(self) -> Callable[[jax.Array], jax.Array]:
        before, after = self.config.pattern.split("->")
        pattern = f"batch {before} -> batch {after}"
        return functools.partial(
            einops.rearrange, pattern=pattern, **dict(self.config.axes_lengths or ())
        )

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        # The channel shape must not depend on the input length; probe with a
        # length every given axis size divides.
        time = math.prod(size for _, size in self.config.axes_lengths or ())
        spec = jax.ShapeDtypeStruct((1, time, *input_shape), jnp.float32)
        return tuple(jax.eval_shape(self._rearrange(), spec).shape[2:])

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        rearrange = self._rearrange()
        values = rearrange(x.mask_invalid().values)
        return Sequence(values, _global_mask(x, rearrange, ceil=self.config.ceil_mode))
