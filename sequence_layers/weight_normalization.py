"""Kernel weight normalizations: reparameterize a layer's kernel before use.

These are not sequence layers: they map a kernel array to a normalized kernel
of the same shape. Convolutions (and Dense) take one through their
`kernel_constraint` config field, or use the built-in `use_weight_norm`
option (`weight_norm_kernel`). Every module here treats the last kernel axis
as the output axis, so any kernel layout `[..., out]` works:

    constraint = L2WeightNormalization.Config()
    conv = Conv1D.Config(8, 3, padding="causal", kernel_constraint=constraint)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types

__all__ = [
    "L2WeightNormalization",
    "SpectralWeightNormalization",
    "WeightNormalization",
    "apply_kernel_constraints",
    "weight_norm_kernel",
]


# Reference default for the power-iteration vector (stddev 0.01).
_DEFAULT_U_INIT = nn.initializers.normal()


def _at_least_fp32(x: jax.Array, enabled: bool) -> jax.Array:
    # Sums of squares lose most of their bits in bf16.
    if enabled and jnp.finfo(x.dtype).bits < 32:
        return x.astype(jnp.float32)
    return x


def _l2_normalize(x: jax.Array, axis: Any, epsilon: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + epsilon)


class WeightNormalization(nn.Module):
    """Base of kernel normalizations: `__call__(w [..., out], training) -> w'`
    with the same shape and dtype."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        """Base config; subclasses define the fields and `make`."""

        def make(self) -> WeightNormalization:  # type: ignore[override]
            raise NotImplementedError(f"{type(self).__qualname__} must define make().")

    def __call__(self, w: jax.Array, training: bool) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} must define __call__.")


class L2WeightNormalization(WeightNormalization):
    """Weight normalization (Salimans & Kingma, arXiv:1602.07868): each output
    column `w[..., o]` is L2-normalized over all other axes and multiplied by a
    learned `scale [out]`.

    Parameters: `scale [out]` (initialized by `scale_init`, ones by default).
    """

    @dataclasses.dataclass(frozen=True)
    class Config(WeightNormalization.Config):
        """Config for L2WeightNormalization."""

        # Added to the sum of squares before the reciprocal square root.
        epsilon: float = 1e-12
        # Initializer of the per-output `scale` parameter.
        scale_init: nn.initializers.Initializer = nn.initializers.ones
        # Optional partitioning names for `scale`.
        sharding: Any = None
        # Whether to compute the norm in at least float32.
        reductions_in_at_least_fp32: bool = False
        # Dtype of the `scale` parameter.
        param_dtype: Any = jnp.float32
        # Module name.
        name: str | None = None

        def make(self) -> L2WeightNormalization:  # type: ignore[override]
            return L2WeightNormalization(self, name=self.name)

    config: Config

    @nn.compact
    def __call__(self, w: jax.Array, training: bool) -> jax.Array:
        del training
        init = self.config.scale_init
        if self.config.sharding is not None:
            init = nn.with_partitioning(init, self.config.sharding)
        scale = self.param("scale", init, (w.shape[-1],), self.config.param_dtype)
        axes = tuple(range(w.ndim - 1))
        normed = _l2_normalize(
            _at_least_fp32(w, self.config.reductions_in_at_least_fp32), axes, self.config.epsilon
        )
        return (normed * jnp.asarray(scale, normed.dtype)).astype(w.dtype)


class SpectralWeightNormalization(WeightNormalization):
    """Spectral normalization (Miyato et al., arXiv:1802.05957): divides the
    kernel, viewed as a matrix `[prod(...), out]`, by its largest singular
    value, estimated by power iteration.

    Variables (in `collection_name`, `batch_stats` by default): `u [1, out]`,
    the power-iteration vector, and `sigma []`, the last estimate. They are
    updated only when `training=True` (pass `mutable=[collection_name]`).
    Vectors and scalars are returned unchanged.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(WeightNormalization.Config):
        """Config for SpectralWeightNormalization."""

        # Power iterations per call (>= 1).
        n_power_iteration: int = 1
        # Optional partitioning names for `u` and `sigma`.
        sharding: Any = None
        # Initializer of the power-iteration vector `u`.
        u_init: nn.initializers.Initializer = _DEFAULT_U_INIT
        # Added to sums of squares before reciprocal square roots.
        epsilon: float = 1e-12
        # Whether to run the power iteration in at least float32.
        reductions_in_at_least_fp32: bool = False
        # Dtype of `u` and `sigma`.
        param_dtype: Any = jnp.float32
        # Raise for kernels of rank > 2 instead of flattening them to a matrix.
        error_on_non_matrix: bool = False
        # Variable collection holding `u` and `sigma`.
        collection_name: str = "batch_stats"
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            if self.n_power_iteration < 1:
                raise ValueError(f"n_power_iteration must be >= 1, got {self.n_power_iteration}.")

        def make(self) -> SpectralWeightNormalization:  # type: ignore[override]
            return SpectralWeightNormalization(self, name=self.name)

    config: Config

    @nn.compact
    def __call__(self, w: jax.Array, training: bool) -> jax.Array:
        cfg = self.config
        if w.ndim <= 1:
            return w
        if w.ndim > 2 and cfg.error_on_non_matrix:
            raise ValueError(
                f"SpectralWeightNormalization got a rank-{w.ndim} kernel {w.shape} but "
                "error_on_non_matrix=True; set it to False to flatten to [-1, out]."
            )
        matrix = _at_least_fp32(w.reshape(-1, w.shape[-1]), cfg.reductions_in_at_least_fp32)
        u_init = cfg.u_init
        if cfg.sharding is not None:
            u_init = nn.with_partitioning(u_init, cfg.sharding)
        u_var = self.variable(
            cfg.collection_name,
            "u",
            lambda: u_init(self.make_rng("params"), (1, w.shape[-1]), cfg.param_dtype),
        )
        sigma_var = self.variable(
            cfg.collection_name, "sigma", lambda: jnp.ones((), cfg.param_dtype)
        )
        u = jnp.asarray(u_var.value, matrix.dtype)
        v = u
        for _ in range(cfg.n_power_iteration):
            v = _l2_normalize(u @ matrix.T, -1, cfg.epsilon)
            u = _l2_normalize(v @ matrix, -1, cfg.epsilon)
        # The singular vectors are estimates, not part of the function being
        # differentiated: gradients flow only through the kernel.
        u = jax.lax.stop_gradient(u)
        v = jax.lax.stop_gradient(v)
        sigma = (v @ matrix @ u.T)[0, 0]
        normed = matrix / jnp.where(sigma != 0, sigma, jnp.ones_like(sigma))
        if training and not self.is_initializing():
            u_var.value = u.astype(cfg.param_dtype)
            sigma_var.value = sigma.astype(cfg.param_dtype)
        return normed.reshape(w.shape).astype(w.dtype)


def weight_norm_kernel(module: nn.Module, kernel: jax.Array, name: str = "scale") -> jax.Array:
    """The `use_weight_norm=True` option of convolutions: `kernel [..., out]`
    normalized per output column and multiplied by a parameter `name [out]`
    created on `module`, initialized to the kernel's initial column norms (so
    the initial function is unchanged). Call from inside a compact method."""
    axes = tuple(range(kernel.ndim - 1))
    flat = kernel.reshape(-1, kernel.shape[-1])
    scale = module.param(name, lambda _: jnp.linalg.norm(flat, axis=0))
    return jnp.expand_dims(scale, axes).astype(kernel.dtype) * _l2_normalize(kernel, axes, 1e-12)


def apply_kernel_constraints(
    module: nn.Module,
    kernel: jax.Array,
    *,
    use_weight_norm: bool,
    kernel_constraint: WeightNormalization.Config | None,
    training: bool,
) -> jax.Array:
    """Applies a layer's `use_weight_norm` / `kernel_constraint` options to its
    kernel. Call from inside the layer's compact method; the constraint module
    is created as the child `kernel_constraint`."""
    if use_weight_norm and kernel_constraint is not None:
        raise ValueError(
            "use_weight_norm=True and kernel_constraint are both set; choose one "
            "(use_weight_norm is L2WeightNormalization with a data-dependent init)."
        )
    if use_weight_norm:
        return weight_norm_kernel(module, kernel)
    if kernel_constraint is not None:
        constraint = dataclasses.replace(kernel_constraint, name="kernel_constraint").make()
        return constraint(kernel, training=training)
    return kernel
