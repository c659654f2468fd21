"""Tests for sequence_layers.normalization."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import normalization as norm
from sequence_layers import testing
from sequence_layers.sequence import Sequence

try:
    from sequence_layers import serialization
except ImportError:  # pragma: no cover - written by another change
    serialization = None


def _bind(config: Any, x: Sequence, training: bool = False) -> Any:
    module = config.make()
    variables = module.init(jax.random.PRNGKey(0), x, training=training, method="layer")
    return module.bind(variables)


def _randomized(config: Any, x: Sequence, seed: int = 1) -> Any:
    """Bound with random parameters (so scale and bias are not 1 and 0)."""
    variables = dict(_bind(config, x).variables)
    if "params" not in variables:
        return config.make().bind(variables)
    leaves, treedef = jax.tree.flatten(variables["params"])
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(size=a.shape), a.dtype) for a in leaves]
    variables["params"] = jax.tree.unflatten(treedef, leaves)
    return config.make().bind(variables)


def _verify(config: Any, x: Sequence, tol: float = 1e-5, **kwargs: Any) -> Sequence:
    layer = _bind(config, x)
    grad_tol = max(tol, 1e-5)
    return testing.verify_contract(
        layer,
        x,
        training=False,
        rtol=tol,
        atol=tol,
        grad_rtol=grad_tol,
        grad_atol=grad_tol,
        **kwargs,
    )


def _valid(x: Sequence) -> np.ndarray:
    return np.asarray(x.mask)


# Contract ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        norm.L2Normalize.Config(),
        norm.LayerNormalization.Config(),
        norm.RMSNormalization.Config(),
        norm.LayerNormalization.Config(axis=[-2, -1]),
        norm.RMSNormalization.Config(axis=2, use_scale=False),
        norm.BatchNormalization.Config(),
        norm.GroupNormalization.Config(num_groups=2, cumulative=True),
        norm.GroupNormalization.Config(num_groups=3, axis=2, cumulative=True),
        norm.GroupNormalization.Config(num_groups=2),
    ],
    ids=lambda c: type(c).__qualname__.split(".")[0],
)
def test_contract(config: Any) -> None:
    x = testing.random_sequence(2, 9, 3, 4, seed=1)
    y = _verify(config, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y.mask), _valid(x))


@pytest.mark.parametrize(
    "config",
    [
        norm.L2Normalize.Config(),
        norm.LayerNormalization.Config(param_dtype=jnp.bfloat16),
        norm.RMSNormalization.Config(param_dtype=jnp.bfloat16),
        norm.BatchNormalization.Config(param_dtype=jnp.bfloat16),
        norm.GroupNormalization.Config(num_groups=2, cumulative=True, param_dtype=jnp.bfloat16),
    ],
    ids=lambda c: type(c).__qualname__.split(".")[0],
)
def test_contract_bfloat16(config: Any) -> None:
    x = testing.random_sequence(2, 8, 4, dtype=jnp.bfloat16, seed=2)
    y = _verify(config, x, tol=2e-2)
    assert y.dtype == jnp.bfloat16


def test_structural_properties() -> None:
    layer = norm.LayerNormalization.Config().make()
    assert layer.supports_step and layer.receptive_field == (0, 0)
    cumulative = norm.GroupNormalization.Config(num_groups=1, cumulative=True).make()
    assert cumulative.supports_step and cumulative.receptive_field == (-math.inf, 0)
    whole = norm.GroupNormalization.Config(num_groups=1).make()
    assert not whole.supports_step and whole.receptive_field == (-math.inf, math.inf)


# Per-frame numerics -------------------------------------------------------------


def test_l2_normalize_numerics() -> None:
    x = testing.random_sequence(2, 5, 3, 4, seed=3)
    xs = np.asarray(x.values, np.float64)
    for axis, axes in ((-1, (3,)), ((2, 3), (2, 3))):
        layer = _bind(norm.L2Normalize.Config(axis=axis), x)
        y = layer.layer(x, training=False)
        expected = xs / np.sqrt(np.sum(xs**2, axis=axes, keepdims=True) + 1e-12)
        np.testing.assert_allclose(
            np.asarray(y.mask_invalid().values), expected * _valid(x)[..., None, None], atol=1e-6
        )


@pytest.mark.parametrize("axis", [-1, (-2, -1)])
def test_layer_norm_numerics(axis: Any) -> None:
    x = testing.random_sequence(2, 5, 3, 4, seed=4)
    layer = _randomized(norm.LayerNormalization.Config(axis=axis), x)
    axes = (3,) if axis == -1 else (2, 3)
    xs = np.asarray(x.values, np.float64)
    mean = xs.mean(axis=axes, keepdims=True)
    var = ((xs - mean) ** 2).mean(axis=axes, keepdims=True)
    p = layer.variables["params"]
    shape = (1, 1, 1, 4) if axis == -1 else (1, 1, 3, 4)
    scale, bias = (np.asarray(p[k]).reshape(shape) for k in ("scale", "bias"))
    expected = (xs - mean) / np.sqrt(var + 1e-6) * scale + bias
    y = layer.layer(x, training=False)
    valid = _valid(x)
    np.testing.assert_allclose(np.asarray(y.values)[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_rms_norm_numerics() -> None:
    x = testing.random_sequence(2, 5, 6, seed=5)
    layer = _randomized(norm.RMSNormalization.Config(), x)
    xs = np.asarray(x.values, np.float64)
    scale = np.asarray(layer.variables["params"]["scale"])
    expected = xs / np.sqrt((xs**2).mean(-1, keepdims=True) + 1e-6) * scale
    y = layer.layer(x, training=False)
    valid = _valid(x)
    np.testing.assert_allclose(np.asarray(y.values)[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert set(layer.variables["params"]) == {"scale"}


def test_constant_frames_have_zero_gradient() -> None:
    # Normalizing a constant frame gives 0; its gradient must not be scaled
    # up by rsqrt(epsilon).
    x = Sequence.from_values(jnp.ones((1, 2, 4)))
    for config in (norm.LayerNormalization.Config(), norm.RMSNormalization.Config()):
        layer = _bind(config, x)
        grad = jax.grad(
            lambda v, layer=layer: layer.layer(Sequence.from_values(v), training=False).values.sum()
        )(jnp.zeros((1, 2, 4)))
        np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_axis_validation() -> None:
    x = testing.random_sequence(2, 3, 4)
    with pytest.raises(ValueError, match="batch or time"):
        _bind(norm.LayerNormalization.Config(axis=1), x)
    with pytest.raises(ValueError, match="out of range"):
        _bind(norm.RMSNormalization.Config(axis=5), x)
    # Lists become tuples, so the config stays hashable.
    assert hash(norm.LayerNormalization.Config(axis=[-2, -1])) is not None


# BatchNormalization -----------------------------------------------------------


def test_batch_norm_training_uses_valid_frames_only() -> None:
    x = testing.random_sequence(3, 6, 4, seed=6)
    x = x.mask_invalid(jnp.nan)  # invalid frames must not reach the statistics
    config = norm.BatchNormalization.Config(momentum=0.5)
    module = config.make()
    variables = module.init(jax.random.PRNGKey(0), x, training=False, method="layer")
    y, updates = module.apply(variables, x, training=True, method="layer", mutable=["batch_stats"])
    valid = _valid(x)
    frames = np.asarray(x.values, np.float64)[valid]
    mean, var = frames.mean(0), frames.var(0)
    np.testing.assert_allclose(
        np.asarray(y.values)[valid], (frames - mean) / np.sqrt(var + 1e-3), rtol=1e-4, atol=1e-4
    )
    stats = updates["batch_stats"]
    (inner,) = stats.values()
    np.testing.assert_allclose(np.asarray(inner["mean"]), 0.5 * mean, rtol=1e-5, atol=1e-6)
    testing.assert_allclose(np.asarray(inner["var"]), 0.5 + 0.5 * var, rtol=1e-4, atol=1e-4)


def test_batch_norm_eval_leaves_stats_and_training_step_raises() -> None:
    x = testing.random_sequence(2, 4, 3, seed=7)
    module = norm.BatchNormalization.Config().make()
    variables = module.init(jax.random.PRNGKey(0), x, training=False, method="layer")
    _, updates = module.apply(variables, x, training=False, method="layer", mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
    layer = module.bind(variables)
    state = layer.get_initial_state(2, x.channel_spec, training=True)
    with pytest.raises(ValueError, match="training=True"):
        layer.step(x, state, training=True)


# GroupNormalization -----------------------------------------------------------


def _group_norm_numpy(
    xs: np.ndarray, valid: np.ndarray, groups: int, cumulative: bool
) -> np.ndarray:
    """Group norm over the last axis of `[b, t, c]` (scale 1, bias 0)."""
    b, t, c = xs.shape
    g = xs.reshape(b, t, groups, c // groups)
    m = valid[:, :, None, None].astype(np.float64)
    out = np.zeros_like(g)
    for bi in range(b):
        if not cumulative:
            n = max(m[bi].sum() * (c // groups), 1)
            mean = (g[bi] * m[bi]).sum((0, 2)) / n
            var = (((g[bi] - mean[None, :, None]) ** 2) * m[bi]).sum((0, 2)) / n
            out[bi] = (g[bi] - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-6)
            continue
        s = np.zeros(groups)
        cnt = 0.0
        ss = np.zeros(groups)
        for ti in range(t):
            s += (g[bi, ti] * m[bi, ti]).sum(-1)
            cnt += m[bi, ti, 0, 0] * (c // groups)
            mean = s / max(cnt, 1)
            ss += (((g[bi, ti] - mean[:, None]) ** 2) * m[bi, ti]).sum(-1)
            var = ss / max(cnt, 1)
            out[bi, ti] = (g[bi, ti] - mean[:, None]) / np.sqrt(var[:, None] + 1e-6)
    return out.reshape(b, t, c)


@pytest.mark.parametrize("cumulative", [False, True])
def test_group_norm_numerics(cumulative: bool) -> None:
    x = testing.random_sequence(3, 7, 6, seed=8)
    layer = _bind(norm.GroupNormalization.Config(num_groups=2, cumulative=cumulative), x)
    y = layer.layer(x.mask_invalid(jnp.nan), training=False)
    valid = _valid(x)
    expected = _group_norm_numpy(np.asarray(x.values, np.float64), valid, 2, cumulative)
    np.testing.assert_allclose(np.asarray(y.values)[valid], expected[valid], rtol=1e-4, atol=1e-4)


def test_group_norm_cumulative_state() -> None:
    x = testing.random_sequence(2, 5, 3, 4, random_lengths=False, seed=9)
    layer = _bind(norm.GroupNormalization.Config(num_groups=2, axis=-1, cumulative=True), x)
    state = layer.get_initial_state(2, x.channel_spec, training=False)
    # (sum, count, sum_sq_dev), batch-major: one entry per row and group.
    assert [s.shape for s in state] == [(2, 1, 1, 2, 1)] * 3
    _, state = layer.step(x, state, training=False)
    np.testing.assert_array_equal(np.asarray(state[1])[:, 0, 0, :, 0], 5 * 3 * 2)
    invalid = Sequence(jnp.full((2, 2, 3, 4), jnp.nan), jnp.zeros((2, 2), jnp.bool_))
    _, state_after = layer.step(invalid, state, training=False)
    jax.tree.map(np.testing.assert_array_equal, state_after, state)


def test_group_norm_non_cumulative_does_not_step() -> None:
    x = testing.random_sequence(2, 4, 4)
    layer = _bind(norm.GroupNormalization.Config(num_groups=2), x)
    with pytest.raises(ValueError, match="cumulative=True"):
        layer.get_initial_state(2, x.channel_spec, training=False)
    with pytest.raises(ValueError, match="does not support step"):
        layer.step(x, (), training=False)


def test_group_norm_validation() -> None:
    with pytest.raises(ValueError, match="num_groups > 0"):
        norm.GroupNormalization.Config(num_groups=0)
    x = testing.random_sequence(2, 4, 5)
    with pytest.raises(ValueError, match="does not divide"):
        _bind(norm.GroupNormalization.Config(num_groups=2), x)


# Serialization ----------------------------------------------------------------


@pytest.mark.skipif(serialization is None, reason="sequence_layers.serialization not available")
@pytest.mark.parametrize(
    "config",
    [
        norm.L2Normalize.Config(axis=(-1,)),
        norm.LayerNormalization.Config(epsilon=1e-5, param_dtype=jnp.bfloat16),
        norm.RMSNormalization.Config(use_scale=False),
        norm.BatchNormalization.Config(momentum=0.9),
        norm.GroupNormalization.Config(num_groups=2, cumulative=True, name="gn"),
    ],
    ids=lambda c: type(c).__qualname__.split(".")[0],
)
def test_serialization_round_trip(config: Any) -> None:
    restored = serialization.loads(serialization.dumps(config))
    assert restored == config
    x = testing.random_sequence(2, 5, 4, seed=10)
    layer = _randomized(config, x)
    y = layer.layer(x, training=False)
    y_restored = restored.make().apply(layer.variables, x, training=False, method="layer")
    np.testing.assert_array_equal(np.asarray(y.values), np.asarray(y_restored.values))
