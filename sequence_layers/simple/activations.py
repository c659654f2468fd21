"""Pointwise activations `[b, t, ...] -> [b, t, ...]`: each frame is mapped on
its own, so all are stateless with receptive field (0, 0).

`mask_required` is False exactly when the function maps 0 to 0: then a
`MaskedSequence` input gives a `MaskedSequence` output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import Sequence
from sequence_layers.simple._common import CheckedStep, masked

__all__ = [
    "Abs",
    "Cast",
    "Elu",
    "Exp",
    "Gelu",
    "LeakyRelu",
    "Log",
    "PRelu",
    "Power",
    "Relu",
    "Sigmoid",
    "Snake",
    "Softmax",
    "Softplus",
    "Swish",
    "Tanh",
]


class _Activation(CheckedStep, types.PreservesType, types.StatelessPointwiseFunctor):
    """A pointwise function of the values; subclasses define `_apply` and
    whether it keeps zero frames zero (`_zero_preserving`)."""

    _zero_preserving = True

    @property
    def mask_required(self) -> bool:
        return not self._zero_preserving

    @nn.nowrap
    def fn(self, values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self._apply(values), mask

    @nn.nowrap
    def _apply(self, values: jax.Array) -> jax.Array:
        raise NotImplementedError


def _simple_config(layer_cls_name: str) -> type[types.SequenceLayerConfig]:
    """A `Config` with only `name`, whose `make()` builds `layer_cls_name`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Optional layer name.
        name: str | None = None

        def make(self) -> types.SequenceLayer:
            return globals()[layer_cls_name](self, name=self.name)

    Config.__qualname__ = f"{layer_cls_name}.Config"
    return Config


class Relu(_Activation):
    """`max(x, 0)`."""

    Config = _simple_config("Relu")
    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jax.nn.relu(values)


class Tanh(_Activation):
    """`tanh(x)`."""

    Config = _simple_config("Tanh")
    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jnp.tanh(values)


class Sigmoid(_Activation):
    """`1 / (1 + exp(-x))`."""

    _zero_preserving = False
    Config = _simple_config("Sigmoid")
    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(values)


class Softplus(_Activation):
    """`log(1 + exp(x))`."""

    _zero_preserving = False
    Config = _simple_config("Softplus")
    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jax.nn.softplus(values)


class Swish(_Activation):
    """`x * sigmoid(x)` (SiLU)."""

    Config = _simple_config("Swish")
    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jax.nn.swish(values)


class Exp(_Activation):
    """`exp(x)`."""

    _zero_preserving = False
    Config = _simple_config("Exp")
    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jnp.exp(values)


class Log(_Activation):
    """`log(x)` (invalid zero frames become -inf; they stay invalid)."""

    _zero_preserving = False
    Config = _simple_config("Log")
    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jnp.log(values)


class Abs(_Activation):
    """`|x|`; complex inputs give their real magnitude."""

    Config = _simple_config("Abs")
    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jnp.abs(values)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        if jnp.issubdtype(input_dtype, jnp.complexfloating):
            return jnp.finfo(input_dtype).dtype
        return input_dtype


class Cast(_Activation):
    """Casts the values to `dtype`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The output dtype.
        dtype: Any
        # Optional layer name.
        name: str | None = None

        def make(self) -> Cast:
            return Cast(self, name=self.name)

    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return values.astype(self.config.dtype)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return jnp.dtype(self.config.dtype)


class Elu(_Activation):
    """`x` if `x > 0` else `alpha * (exp(x) - 1)`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Scale of the negative part.
        alpha: float = 1.0
        # Optional layer name.
        name: str | None = None

        def make(self) -> Elu:
            return Elu(self, name=self.name)

    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jax.nn.elu(values, self.config.alpha)


class LeakyRelu(_Activation):
    """`x` if `x >= 0` else `negative_slope * x`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Slope for negative inputs.
        negative_slope: float = 0.01
        # Optional layer name.
        name: str | None = None

        def make(self) -> LeakyRelu:
            return LeakyRelu(self, name=self.name)

    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jax.nn.leaky_relu(values, self.config.negative_slope)


class Gelu(_Activation):
    """Gaussian error linear unit."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Use the tanh approximation instead of the exact erf form.
        approximate: bool = True
        # Optional layer name.
        name: str | None = None

        def make(self) -> Gelu:
            return Gelu(self, name=self.name)

    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        return jax.nn.gelu(values, approximate=self.config.approximate)


class Power(_Activation):
    """`x ** power`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The exponent.
        power: float = 1.0
        # Optional layer name.
        name: str | None = None

        def make(self) -> Power:
            return Power(self, name=self.name)

    config: Config

    @property
    def mask_required(self) -> bool:
        # 0 ** p is 0 only for p > 0 (1 for p == 0, inf for p < 0).
        return not self.config.power > 0

    def _apply(self, values: jax.Array) -> jax.Array:
        return jnp.power(values, self.config.power)


class Softmax(_Activation):
    """Softmax over one channel axis (`axis` counts batch and time, so it must
    be >= 2 or negative)."""

    _zero_preserving = False

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The axis of `[b, t, ...]` to normalize over.
        axis: int = -1
        # Optional layer name.
        name: str | None = None

        def make(self) -> Softmax:
            return Softmax(self, name=self.name)

    config: Config

    def _apply(self, values: jax.Array) -> jax.Array:
        axis = self.config.axis
        if not 2 <= (axis if axis >= 0 else values.ndim + axis) < values.ndim:
            raise ValueError(
                f"Softmax axis must be a channel axis of the values, got {axis=} for "
                f"{values.shape=}; use an axis >= 2 or a negative one."
            )
        return jax.nn.softmax(values, axis=axis)


class PRelu(_Activation):
    """Leaky relu with a learned scalar `negative_slope` (parameter name
    `negative_slope`)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Initial value of the learned slope.
        negative_slope_init: float = 0.01
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Optional layer name.
        name: str | None = None

        def make(self) -> PRelu:
            return PRelu(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.negative_slope = self.param(
            "negative_slope",
            lambda _: jnp.asarray(self.config.negative_slope_init, self.config.param_dtype),
        )

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        return super().layer(masked(x), training=training, constants=constants)

    def _apply(self, values: jax.Array) -> jax.Array:
        slope = self.negative_slope.astype(values.dtype)
        return jnp.where(values >= 0, values, slope * values)


class Snake(_Activation):
    """`x + sin(alpha * x)**2 / beta` with per-channel learned `alpha` (and
    `beta` if `separate_beta`, else `beta = alpha`), stored in log scale as
    `alpha_log` / `beta_log` of the channel shape (BigVGAN's variant)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Learn beta separately from alpha.
        separate_beta: bool
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Optional layer name.
        name: str | None = None

        def make(self) -> Snake:
            return Snake(self, name=self.name)

    config: Config

    @types.check_layer
    @nn.compact
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        shape = x.channel_shape
        zeros = nn.initializers.zeros_init()
        alpha = jnp.exp(self.param("alpha_log", zeros, shape, self.config.param_dtype))
        beta = alpha
        if self.config.separate_beta:
            beta = jnp.exp(self.param("beta_log", zeros, shape, self.config.param_dtype))
        x = masked(x)

        def snake(v: jax.Array) -> jax.Array:
            a, b = alpha.astype(v.dtype), beta.astype(v.dtype)
            return v + jnp.square(jnp.sin(v * a)) / (b + 1e-12)

        return x.apply_values_masked(snake)
