"""Reductions over channel axes: `Mean`, `Min`, `Max`, `Sum`.

`axis` counts the batch and time axes of `[b, t, ...]` (so channel axes are
>= 2, or negative); None reduces every channel axis.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Sequence as PySequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import Sequence
from sequence_layers.simple._common import CheckedStep, normalize_axes

__all__ = ["Max", "Mean", "Min", "Sum"]


@dataclasses.dataclass(frozen=True)
class _ReduceConfig(types.SequenceLayerConfig):
    # Axis or axes of `[b, t, ...]` to reduce; None: all channel axes.
    axis: int | PySequence[int] | None = -1
    # Keep reduced axes with size 1.
    keepdims: bool = False
    # Optional layer name.
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", normalize_axes(self.axis))

    def make(self) -> types.SequenceLayer:
        raise NotImplementedError


class _Reduce(CheckedStep, types.PreservesType, types.Stateless):
    config: _ReduceConfig

    @property
    def _reduce(self) -> Callable[..., jax.Array]:
        raise NotImplementedError

    @nn.nowrap
    def _axes(self, channel_shape: types.ShapeLike) -> tuple[int, ...]:
        rank = len(channel_shape) + 2
        if self.config.axis is None:
            return tuple(range(2, rank))
        axes = tuple(a + rank if a < 0 else a for a in self.config.axis)
        for a in axes:
            if not 2 <= a < rank:
                raise ValueError(
                    f"{type(self).__name__} axis={self.config.axis} is out of the channel "
                    f"axes of input [b, t, *{tuple(channel_shape)}]: batch and time (0, 1) "
                    f"cannot be reduced; use axes in [2, {rank}) or negative ones."
                )
        return axes

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        axes = self._axes(input_shape)
        if self.config.keepdims:
            return tuple(1 if i + 2 in axes else d for i, d in enumerate(input_shape))
        return tuple(d for i, d in enumerate(input_shape) if i + 2 not in axes)

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        axes = self._axes(x.channel_shape)
        # A reduction of zeros is zero, so masked inputs stay masked.
        return x.apply_values_masked(self._reduce, axis=axes, keepdims=self.config.keepdims)


class Mean(_Reduce):
    """Mean over channel axes."""

    @dataclasses.dataclass(frozen=True)
    class Config(_ReduceConfig):
        def make(self) -> Mean:
            return Mean(self, name=self.name)

    config: Config

    @property
    def _reduce(self) -> Callable[..., jax.Array]:
        return jnp.mean


class Min(_Reduce):
    """Minimum over channel axes."""

    @dataclasses.dataclass(frozen=True)
    class Config(_ReduceConfig):
        def make(self) -> Min:
            return Min(self, name=self.name)

    config: Config

    @property
    def _reduce(self) -> Callable[..., jax.Array]:
        return jnp.min


class Max(_Reduce):
    """Maximum over channel axes."""

    @dataclasses.dataclass(frozen=True)
    class Config(_ReduceConfig):
        def make(self) -> Max:
            return Max(self, name=self.name)

    config: Config

    @property
    def _reduce(self) -> Callable[..., jax.Array]:
        return jnp.max


class Sum(_Reduce):
    """Sum over channel axes."""

    @dataclasses.dataclass(frozen=True)
    class Config(_ReduceConfig):
        def make(self) -> Sum:
            return Sum(self, name=self.name)

    config: Config

    @property
    def _reduce(self) -> Callable[..., jax.Array]:
        return jnp.sum
