"""Tests for the kernel weight normalizations."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.weight_normalization import (
    L2WeightNormalization,
    SpectralWeightNormalization,
    WeightNormalization,
    apply_kernel_constraints,
    weight_norm_kernel,
)


def _kernel(*shape: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("shape", [(5, 4), (3, 2, 4)])
def test_l2_weight_normalization_unit_columns_times_scale(shape: tuple[int, ...]) -> None:
    w = _kernel(*shape)
    module = L2WeightNormalization.Config().make()
    variables = module.init(jax.random.PRNGKey(0), w, training=False)
    assert variables["params"]["scale"].shape == (4,)
    out = module.apply(variables, w, training=False)
    norms = np.linalg.norm(np.asarray(out).reshape(-1, 4), axis=0)
    testing.assert_allclose(norms, np.ones(4))
    scaled = {"params": {"scale": jnp.array([1.0, 2.0, 3.0, 4.0])}}
    scaled_out = np.asarray(module.apply(scaled, w, training=False)).reshape(-1, 4)
    norms = np.linalg.norm(scaled_out, axis=0)
    testing.assert_allclose(norms, [1.0, 2.0, 3.0, 4.0])
    # Direction is preserved.
    np.testing.assert_allclose(
        np.asarray(out).reshape(-1, 4) * np.linalg.norm(np.asarray(w).reshape(-1, 4), axis=0),
        np.asarray(w).reshape(-1, 4),
        rtol=1e-4,
        atol=1e-5,
    )


def test_l2_weight_normalization_bfloat16_kernel_keeps_dtype() -> None:
    w = _kernel(6, 3).astype(jnp.bfloat16)
    module = L2WeightNormalization.Config(reductions_in_at_least_fp32=True).make()
    out = module.apply(module.init(jax.random.PRNGKey(0), w, training=False), w, training=False)
    assert out.dtype == jnp.bfloat16


def test_spectral_normalization_unit_top_singular_value() -> None:
    w = _kernel(6, 4)
    module = SpectralWeightNormalization.Config(n_power_iteration=50).make()
    variables = module.init(jax.random.PRNGKey(0), w, training=False)
    assert variables["batch_stats"]["u"].shape == (1, 4)
    out = module.apply(variables, w, training=False)
    top = np.linalg.svd(np.asarray(out), compute_uv=False)[0]
    testing.assert_allclose(top, 1.0, rtol=1e-3, atol=1e-3)


def test_spectral_normalization_updates_only_when_training() -> None:
    w = _kernel(3, 2, 4)  # rank 3: flattened to [6, 4]
    module = SpectralWeightNormalization.Config().make()
    variables = module.init(jax.random.PRNGKey(0), w, training=False)
    _, updated = module.apply(variables, w, training=True, mutable=["batch_stats"])
    assert not np.allclose(np.asarray(updated["batch_stats"]["u"]), variables["batch_stats"]["u"])
    sigma = float(updated["batch_stats"]["sigma"])
    assert 0 < sigma <= np.linalg.svd(np.asarray(w).reshape(6, 4), compute_uv=False)[0] + 1e-4
    _, same = module.apply(variables, w, training=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(
        np.asarray(same["batch_stats"]["u"]), np.asarray(variables["batch_stats"]["u"])
    )


def test_spectral_normalization_gradient_is_finite() -> None:
    w = _kernel(5, 3)
    module = SpectralWeightNormalization.Config().make()
    variables = module.init(jax.random.PRNGKey(0), w, training=False)
    grad = jax.grad(lambda k: jnp.sum(module.apply(variables, k, training=False) ** 2))(w)
    assert grad.shape == w.shape and np.isfinite(np.asarray(grad)).all()


def test_spectral_normalization_edge_cases() -> None:
    module = SpectralWeightNormalization.Config().make()
    v = jnp.arange(3.0)
    assert module.apply({}, v, training=False) is v
    strict = SpectralWeightNormalization.Config(error_on_non_matrix=True).make()
    with pytest.raises(ValueError, match="error_on_non_matrix"):
        strict.init(jax.random.PRNGKey(0), _kernel(2, 2, 2), training=False)
    with pytest.raises(ValueError, match="n_power_iteration"):
        SpectralWeightNormalization.Config(n_power_iteration=0)
    with pytest.raises(NotImplementedError):
        WeightNormalization.Config().make()


class _Holder(nn.Module):
    """Stands in for a layer (e.g. Dense) using the kernel-constraint helpers."""

    use_weight_norm: bool = False
    constraint: WeightNormalization.Config | None = None

    @nn.compact
    def __call__(self, w: jax.Array) -> jax.Array:
        return apply_kernel_constraints(
            self,
            w,
            use_weight_norm=self.use_weight_norm,
            kernel_constraint=self.constraint,
            training=False,
        )


def test_weight_norm_kernel_starts_as_identity() -> None:
    w = _kernel(3, 5)
    holder = _Holder(use_weight_norm=True)
    variables = holder.init(jax.random.PRNGKey(0), w)
    testing.assert_allclose(
        np.asarray(variables["params"]["scale"]), np.linalg.norm(np.asarray(w), axis=0), rtol=1e-6
    )
    testing.assert_allclose(np.asarray(holder.apply(variables, w)), np.asarray(w))
    assert callable(weight_norm_kernel)


def test_apply_kernel_constraints() -> None:
    w = _kernel(4, 2)
    holder = _Holder(constraint=L2WeightNormalization.Config())
    variables = holder.init(jax.random.PRNGKey(0), w)
    assert variables["params"]["kernel_constraint"]["scale"].shape == (2,)
    identity = _Holder()
    np.testing.assert_array_equal(np.asarray(identity.apply({}, w)), np.asarray(w))
    both = _Holder(use_weight_norm=True, constraint=L2WeightNormalization.Config())
    with pytest.raises(ValueError, match="both set"):
        both.init(jax.random.PRNGKey(0), w)


@pytest.mark.parametrize(
    "config",
    [
        L2WeightNormalization.Config(epsilon=1e-6, param_dtype=jnp.bfloat16),
        SpectralWeightNormalization.Config(n_power_iteration=3, collection_name="spectral"),
    ],
    ids=lambda c: type(c).__qualname__,
)
def test_serialization_round_trip(config: WeightNormalization.Config) -> None:
    serialization = pytest.importorskip("sequence_layers.serialization")
    restored = serialization.loads(serialization.dumps(config))
    assert restored == config
    w = _kernel(4, 3)
    m1, m2 = config.make(), restored.make()
    variables = m1.init(jax.random.PRNGKey(0), w, training=False)
    np.testing.assert_array_equal(
        np.asarray(m1.apply(variables, w, training=False)),
        np.asarray(m2.apply(variables, w, training=False)),
    )
