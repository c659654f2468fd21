"""Pointwise arithmetic against a constant (`Scale`, `Add`, `Maximum`,
`Minimum`, `Mod`) or learned scalars (`Affine`). The constant broadcasts
against the channel shape `[...]` of `[b, t, ...]` and is cast to the input
dtype, so the dtype is preserved."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import types
from sequence_layers.sequence import Sequence
from sequence_layers.simple._common import CheckedStep, HashableArray, Sharding, as_tuple, masked

__all__ = ["Add", "Affine", "HashableArray", "Maximum", "Minimum", "Mod", "Scale"]


def _broadcast_channel_shape(
    layer: types.SequenceLayer, input_shape: tuple[int, ...], operand_shape: tuple[int, ...]
) -> tuple[int, ...]:
    if len(operand_shape) > len(input_shape):
        raise ValueError(
            f"{type(layer).__name__}: the constant of shape {operand_shape} has more "
            f"dimensions than the input channel shape {tuple(input_shape)}; it may only "
            "broadcast over channels, never over batch or time."
        )
    try:
        return tuple(np.broadcast_shapes(tuple(input_shape), operand_shape))
    except ValueError as e:
        raise ValueError(
            f"{type(layer).__name__}: the constant of shape {operand_shape} does not "
            f"broadcast with the input channel shape {tuple(input_shape)}."
        ) from e


class _BroadcastOp(CheckedStep, types.PreservesType, types.Stateless):
    """`op(x, constant)` where the constant is the config field `_field`."""

    _field = ""
    # Whether op(0, c) == 0, so that masked inputs stay masked.
    _zero_preserving = False

    @property
    def _operand(self) -> np.ndarray:
        return getattr(self.config, self._field).to_array()

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return _broadcast_channel_shape(self, tuple(input_shape), self._operand.shape)

    @nn.nowrap
    def _op(self, values: jax.Array, operand: jax.Array) -> jax.Array:
        raise NotImplementedError

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        operand = self._operand
        self.get_output_shape(x.channel_shape)

        def fn(v: jax.Array) -> jax.Array:
            return self._op(v, jnp.asarray(operand).astype(v.dtype))

        if self._zero_preserving:
            return x.apply_values_masked(fn)
        return x.apply_values(fn)


def _operand_config(layer_name: str, field: str, doc: str) -> type[types.SequenceLayerConfig]:
    """A Config with one constant-array field `field` (stored hashable)."""

    def post_init(self: Any) -> None:
        object.__setattr__(self, field, HashableArray.from_array(getattr(self, field)))

    def make(self: Any) -> types.SequenceLayer:
        return globals()[layer_name](self, name=self.name)

    cls = dataclasses.make_dataclass(
        "Config",
        [(field, Any), ("name", str | None, dataclasses.field(default=None))],
        bases=(types.SequenceLayerConfig,),
        frozen=True,
        namespace={"__post_init__": post_init, "make": make, "__doc__": doc},
    )
    cls.__qualname__ = f"{layer_name}.Config"
    cls.__module__ = __name__
    return cls


class Scale(_BroadcastOp):
    """`x * scale`."""

    _field = "scale"
    _zero_preserving = True
    Config = _operand_config("Scale", "scale", "scale: the multiplier (scalar or array).")
    config: Config

    def _op(self, values: jax.Array, operand: jax.Array) -> jax.Array:
        return values * operand


class Add(_BroadcastOp):
    """`x + shift`."""

    _field = "shift"
    Config = _operand_config("Add", "shift", "shift: the addend (scalar or array).")
    config: Config

    def _op(self, values: jax.Array, operand: jax.Array) -> jax.Array:
        return values + operand


class Maximum(_BroadcastOp):
    """`max(x, maximum)`: clips from below."""

    _field = "maximum"
    Config = _operand_config("Maximum", "maximum", "maximum: the lower bound (scalar or array).")
    config: Config

    def _op(self, values: jax.Array, operand: jax.Array) -> jax.Array:
        return jnp.maximum(values, operand)


class Minimum(_BroadcastOp):
    """`min(x, minimum)`: clips from above."""

    _field = "minimum"
    Config = _operand_config("Minimum", "minimum", "minimum: the upper bound (scalar or array).")
    config: Config

    def _op(self, values: jax.Array, operand: jax.Array) -> jax.Array:
        return jnp.minimum(values, operand)


class Mod(_BroadcastOp):
    """`x mod divisor` (sign of the divisor, as `jnp.mod`)."""

    _field = "divisor"
    _zero_preserving = True
    Config = _operand_config("Mod", "divisor", "divisor: the modulus (scalar or array).")
    config: Config

    def _op(self, values: jax.Array, operand: jax.Array) -> jax.Array:
        return jnp.mod(values, operand)


class Affine(CheckedStep, types.PreservesType, types.Stateless):
    """`x * scale + bias` with learned `scale` and `bias` of shape `shape`
    (scalars by default), broadcast against the channel shape."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Learn an additive bias.
        use_bias: bool = True
        # Learn a multiplicative scale.
        use_scale: bool = True
        # Parameter shape; must broadcast with the channel shape. None: scalar.
        shape: tuple[int, ...] | None = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Initializer of the scale.
        scale_init: Callable[..., jax.Array] = nn.initializers.ones
        # Initializer of the bias.
        bias_init: Callable[..., jax.Array] = nn.initializers.zeros
        # Optional sharding of the scale parameter.
        scale_sharding: Sharding = None
        # Optional sharding of the bias parameter.
        bias_sharding: Sharding = None
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            shape = () if self.shape is None else tuple(self.shape)
            object.__setattr__(self, "shape", shape)
            object.__setattr__(self, "scale_sharding", as_tuple(self.scale_sharding))
            object.__setattr__(self, "bias_sharding", as_tuple(self.bias_sharding))

        def make(self) -> Affine:
            return Affine(self, name=self.name)

    config: Config

    def setup(self) -> None:
        cfg = self.config
        if cfg.use_scale:
            init = _with_sharding(cfg.scale_init, cfg.scale_sharding)
            self.scale = self.param("scale", init, cfg.shape, cfg.param_dtype)
        if cfg.use_bias:
            init = _with_sharding(cfg.bias_init, cfg.bias_sharding)
            self.bias = self.param("bias", init, cfg.shape, cfg.param_dtype)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return _broadcast_channel_shape(self, tuple(input_shape), tuple(self.config.shape))

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self.get_output_shape(x.channel_shape)
        x = masked(x)
        values = x.values
        if self.config.use_scale:
            values = values * self.scale.astype(values.dtype)
        if self.config.use_bias:
            return Sequence(values + self.bias.astype(values.dtype), x.mask)
        return type(x)(values, x.mask)


def _with_sharding(init: Callable[..., jax.Array], sharding: Sharding) -> Callable[..., jax.Array]:
    """Boxes the parameter as `nn.Partitioned` when a sharding is given."""
    if sharding is None:
        return init
    return nn.with_partitioning(init, sharding)
