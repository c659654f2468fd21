"""Dense layers: learned linear maps of each frame's channels.

`Dense` maps the last channel axis, `DenseShaped` the whole channel shape,
`EinsumDense` whatever an einsum equation says. All are stateless (receptive
field (0, 0)) and create their kernel from the input shape on first use.

dtypes: parameters are stored in `param_dtype`; inputs and parameters are
promoted together (or cast to `compute_dtype` when set), which is also the
output dtype.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable
from collections.abc import Sequence as PySequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import Sequence
from sequence_layers.simple._common import (
    CheckedStep,
    Sharding,
    as_tuple,
    get_promoted_dtype,
    masked,
)

__all__ = ["Dense", "DenseShaped", "EinsumDense", "get_promoted_dtype"]

Activation = Callable[[jax.Array], jax.Array] | None
Initializer = Callable[..., jax.Array]
# Returns an einsum-compatible function to use instead of `jnp.einsum`
# (e.g. for quantization-aware training).
EinsumFactory = Callable[[], Callable[..., jax.Array]]


def _with_sharding(init: Initializer, sharding: Sharding) -> Initializer:
    return init if sharding is None else nn.with_partitioning(init, sharding)


def _check_config(cfg: Any) -> None:
    """Shared `__post_init__` of the dense configs."""
    object.__setattr__(cfg, "kernel_sharding", as_tuple(cfg.kernel_sharding))
    object.__setattr__(cfg, "bias_sharding", as_tuple(cfg.bias_sharding))
    if cfg.quantization_provider is not None:
        raise NotImplementedError(
            f"{type(cfg).__qualname__}: quantization_provider is not supported; use "
            "einsum_factory to substitute a quantized einsum."
        )


class _EinsumLayer(CheckedStep, types.Stateless):
    """`activation(einsum(equation, x, kernel) + bias)` on the values."""

    config: Any

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return get_promoted_dtype(
            input_dtype, self.config.param_dtype, dtype=self.config.compute_dtype
        )

    def _einsum(
        self,
        x: Sequence,
        equation: str,
        kernel_shape: tuple[int, ...],
        bias_shape: tuple[int, ...] | None,
    ) -> Sequence:
        """Call from an `nn.compact` method: creates `kernel` (and `bias`)."""
        cfg = self.config
        kernel_init = _with_sharding(cfg.kernel_init, cfg.kernel_sharding)
        kernel = self.param("kernel", kernel_init, kernel_shape, cfg.param_dtype)
        bias = None
        if bias_shape is not None:
            bias_init = _with_sharding(cfg.bias_init, cfg.bias_sharding)
            bias = self.param("bias", bias_init, bias_shape, cfg.param_dtype)
        # Zero the padding first: a NaN there would turn the kernel gradient
        # (a sum over frames) into NaN.
        x = masked(x)
        values, kernel, bias = nn.dtypes.promote_dtype(
            x.values, kernel, bias, dtype=cfg.compute_dtype
        )
        if cfg.einsum_factory is None:
            y = jnp.einsum(equation, values, kernel, precision=cfg.precision)
        else:
            y = cfg.einsum_factory()(equation, values, kernel)
        if bias is not None:
            y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        if cfg.activation is not None:
            y = cfg.activation(y)
        if bias is None and cfg.activation is None:
            return type(x)(y, x.mask)
        return Sequence(y, x.mask)


class Dense(_EinsumLayer):
    """`[b, t, ..., d_in] -> [b, t, ..., features]` with `kernel [d_in,
    features]` and `bias [features]`.

    Example:
        >>> layer = Dense.Config(4).make()
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Output size of the last channel axis.
        features: int
        # Learn an additive bias.
        use_bias: bool = True
        # Applied to the output (None: linear).
        activation: Activation = None
        # Dtype of the computation (None: promote input and parameter dtypes).
        compute_dtype: Any = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Precision of the einsum (None: JAX default).
        precision: Any = None
        # Initializer of the kernel.
        kernel_init: Initializer = nn.linear.default_kernel_init
        # Optional sharding of the kernel (mesh axis names per kernel axis).
        kernel_sharding: Sharding = None
        # Initializer of the bias.
        bias_init: Initializer = nn.initializers.zeros
        # Optional sharding of the bias.
        bias_sharding: Sharding = None
        # Optional replacement for `jnp.einsum`.
        einsum_factory: EinsumFactory | None = None
        # Optional layer name.
        name: str | None = None
        # Accepted for compatibility with the reference (sharding metadata).
        projectable: bool = True
        # Not supported (must be None); kept so reference configs port.
        quantization_provider: Any = None

        def __post_init__(self) -> None:
            _check_config(self)
            if self.features <= 0:
                raise ValueError(f"Dense needs features > 0, got {self.features=}.")

        def make(self) -> Dense:
            return Dense(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        if not input_shape:
            raise ValueError(
                "Dense needs at least one channel axis ([b, t, d]); got a [b, t] input. "
                "Add one with ExpandDims.Config(-1)."
            )
        return (*input_shape[:-1], self.config.features)

    @types.check_layer
    @nn.compact
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self.get_output_shape(x.channel_shape)
        features = self.config.features
        bias_shape = (features,) if self.config.use_bias else None
        return self._einsum(x, "...a,ab->...b", (x.shape[-1], features), bias_shape)


class DenseShaped(_EinsumLayer):
    """`[b, t, *in_shape] -> [b, t, *output_shape]` with `kernel [*in_shape,
    *output_shape]` and `bias [*output_shape]` (an empty shape on either side
    uses a size-1 kernel axis)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The output channel shape.
        output_shape: PySequence[int]
        # Learn an additive bias of shape `output_shape`.
        use_bias: bool = True
        # Applied to the output (None: linear).
        activation: Activation = None
        # Dtype of the computation (None: promote input and parameter dtypes).
        compute_dtype: Any = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Precision of the einsum (None: JAX default).
        precision: Any = None
        # Initializer of the kernel.
        kernel_init: Initializer = nn.linear.default_kernel_init
        # Optional sharding of the kernel (mesh axis names per kernel axis).
        kernel_sharding: Sharding = None
        # Initializer of the bias.
        bias_init: Initializer = nn.initializers.zeros
        # Optional sharding of the bias.
        bias_sharding: Sharding = None
        # Optional layer name.
        name: str | None = None
        # Accepted for compatibility with the reference (sharding metadata).
        projectable: bool = True
        # Optional replacement for `jnp.einsum`.
        einsum_factory: EinsumFactory | None = None
        # Not supported (must be None); kept so reference configs port.
        quantization_provider: Any = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "output_shape", tuple(self.output_shape))
            _check_config(self)

        def make(self) -> DenseShaped:
            return DenseShaped(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return self.config.output_shape

    @types.check_layer
    @nn.compact
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        in_shape, out_shape = x.channel_shape, self.config.output_shape
        letters = string.ascii_lowercase
        if len(in_shape) + len(out_shape) > len(letters):
            raise ValueError(
                f"DenseShaped supports at most 26 channel axes in total, got {x.shape=}."
            )
        in_dims = letters[: len(in_shape)]
        out_dims = letters[len(in_shape) : len(in_shape) + len(out_shape)]
        # A missing side still needs a (size-1) kernel axis to contract with.
        kernel_in, kernel_in_shape = (in_dims, in_shape) if in_dims else ("I", (1,))
        kernel_out, kernel_out_shape = (out_dims, out_shape) if out_dims else ("O", (1,))
        equation = f"BT{in_dims},{kernel_in}{kernel_out}->BT{out_dims}"
        bias_shape = tuple(kernel_out_shape) if self.config.use_bias else None
        return self._einsum(x, equation, (*kernel_in_shape, *kernel_out_shape), bias_shape)


def _einsum_shapes(
    equation: str,
    input_shape: tuple[int, ...],
    output_shape: tuple[int | None, ...],
    bias_axes: str,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]:
    """Parses `...X,K->...Y` and returns (output channel shape, kernel shape,
    bias shape or None) for an input channel shape."""
    if "->" not in equation or "," not in equation.split("->")[0]:
        raise ValueError(
            f"EinsumDense equation must look like '...ab,bc->...ac', got {equation!r}."
        )
    left, out_spec = equation.replace(" ", "").split("->")
    in_spec, kernel_spec = left.split(",")
    if not (in_spec.startswith("...") and out_spec.startswith("...")):
        raise ValueError(
            f"EinsumDense equation must start both input and output with '...' (batch and "
            f"time), got {equation!r}."
        )
    in_spec, out_spec = in_spec[3:], out_spec[3:]
    for spec in (in_spec, out_spec, kernel_spec):
        if len(set(spec)) != len(spec) or (spec and not spec.isalpha()):
            raise ValueError(
                f"EinsumDense equation {equation!r}: {spec!r} repeats or misuses axes."
            )
    if len(in_spec) != len(input_shape):
        raise ValueError(
            f"EinsumDense equation input {in_spec!r} does not match the input channel shape "
            f"{input_shape}."
        )
    if len(out_spec) != len(output_shape):
        raise ValueError(
            f"EinsumDense equation output {out_spec!r} does not match {output_shape=}."
        )
    sizes = dict(zip(in_spec, input_shape, strict=True))
    out = []
    for axis, size in zip(out_spec, output_shape, strict=True):
        if size is None:
            if axis not in sizes:
                raise ValueError(
                    f"EinsumDense output axis {axis!r} has size None but is not an input axis."
                )
            size = sizes[axis]
        elif axis in sizes and sizes[axis] != size:
            raise ValueError(
                f"EinsumDense axis {axis!r} is {sizes[axis]} in the input but {size} in "
                f"{output_shape=}."
            )
        out.append(size)
    sizes.update(zip(out_spec, out, strict=True))
    missing = [a for a in kernel_spec if a not in sizes]
    if missing:
        raise ValueError(f"EinsumDense kernel axes {missing} appear in neither input nor output.")
    bias_shape = None
    if bias_axes:
        if any(a not in out_spec for a in bias_axes):
            raise ValueError(f"EinsumDense {bias_axes=} must be output axes of {out_spec!r}.")
        first = min(out_spec.index(a) for a in bias_axes)
        bias_shape = tuple(sizes[a] if a in bias_axes else 1 for a in out_spec[first:])
    return tuple(out), tuple(sizes[a] for a in kernel_spec), bias_shape


class EinsumDense(_EinsumLayer):
    """A dense map given by an einsum equation over the channel axes.

    Example: input `[b, t, c1, c2, c3]`, equation `'...abc,bd->...bd'`,
    output_shape `(None, c4)`, bias_axes `'d'` gives `[b, t, c2, c4]` with
    `kernel [c2, c4]` and `bias [c4]`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Einsum equation of the form '...X,K->...Y' ('...' is batch and time).
        equation: str
        # Output channel shape; None entries are taken from the input.
        output_shape: PySequence[int | None]
        # Output axes (letters of Y) that get a learned bias.
        bias_axes: str = ""
        # Applied to the output (None: linear).
        activation: Activation = None
        # Dtype of the computation (None: promote input and parameter dtypes).
        compute_dtype: Any = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Precision of the einsum (None: JAX default).
        precision: Any = None
        # Initializer of the kernel.
        kernel_init: Initializer = nn.linear.default_kernel_init
        # Optional sharding of the kernel (mesh axis names per kernel axis).
        kernel_sharding: Sharding = None
        # Initializer of the bias.
        bias_init: Initializer = nn.initializers.zeros
        # Optional sharding of the bias.
        bias_sharding: Sharding = None
        # Optional layer name.
        name: str | None = None
        # Optional replacement for `jnp.einsum`.
        einsum_factory: EinsumFactory | None = None
        # Not supported (must be None); kept so reference configs port.
        quantization_provider: Any = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "output_shape", tuple(self.output_shape))
            _check_config(self)

        def make(self) -> EinsumDense:
            return EinsumDense(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        cfg = self.config
        return _einsum_shapes(cfg.equation, tuple(input_shape), cfg.output_shape, cfg.bias_axes)[0]

    @types.check_layer
    @nn.compact
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        cfg = self.config
        _, kernel_shape, bias_shape = _einsum_shapes(
            cfg.equation, x.channel_shape, cfg.output_shape, cfg.bias_axes
        )
        return self._einsum(x, cfg.equation, kernel_shape, bias_shape)
