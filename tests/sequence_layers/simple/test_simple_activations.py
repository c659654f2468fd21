"""Activations: hand-computed values, masking status, dtypes, contract."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import MaskedSequence, Sequence, simple, testing

V = np.array([-2.0, -0.5, 0.0, 1.5], np.float32)
POSITIVE = np.array([0.25, 1.0, 2.0, 4.0], np.float32)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(v)


# (config, input, expected output, masked output for a masked input)
CASES = [
    (simple.Relu.Config(), V, [0, 0, 0, 1.5], True),
    (simple.Tanh.Config(), V, np.tanh(V), True),
    (simple.Sigmoid.Config(), V, _sigmoid(V), False),
    (simple.Softplus.Config(), V, np.log1p(np.exp(V)), False),
    (simple.Swish.Config(), V, V * _sigmoid(V), True),
    (simple.Exp.Config(), V, np.exp(V), False),
    (simple.Log.Config(), POSITIVE, np.log(POSITIVE), False),
    (simple.Abs.Config(), V, [2, 0.5, 0, 1.5], True),
    (simple.Elu.Config(alpha=2.0), V, [2 * (np.exp(-2) - 1), 2 * (np.exp(-0.5) - 1), 0, 1.5], True),
    (simple.LeakyRelu.Config(negative_slope=0.1), V, [-0.2, -0.05, 0, 1.5], True),
    (simple.Gelu.Config(approximate=False), V, V * 0.5 * (1 + _erf(V / np.sqrt(2))), True),
    (
        simple.Gelu.Config(),
        V,
        0.5 * V * (1 + np.tanh(np.sqrt(2 / np.pi) * (V + 0.044715 * V**3))),
        True,
    ),
    (simple.Power.Config(power=2.0), V, V**2, True),
    (simple.Power.Config(power=0.5), POSITIVE, np.sqrt(POSITIVE), True),
    (simple.Power.Config(power=0.0), V, [1, 1, 1, 1], False),
    (simple.Softmax.Config(), V, np.exp(V) / np.exp(V).sum(), False),
    (simple.Cast.Config(jnp.int32), V, [-2, 0, 0, 1], True),
    (simple.PRelu.Config(negative_slope_init=0.25), V, [-0.5, -0.125, 0, 1.5], True),
    (simple.Snake.Config(separate_beta=False), V, V + np.sin(V) ** 2, True),
]
IDS = [f"{type(c[0]).__qualname__.split('.')[0]}{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize(("config", "values", "expected", "stays_masked"), CASES, ids=IDS)
def test_values_and_masking(config, values, expected, stays_masked) -> None:
    x = Sequence.from_values(jnp.asarray(values)[None, None])
    layer = config.make()
    y, _ = layer.init_with_output(jax.random.PRNGKey(0), x)
    np.testing.assert_allclose(
        y.values[0, 0], np.asarray(expected, np.float32), rtol=1e-5, atol=1e-6
    )
    assert isinstance(y, MaskedSequence) == stays_masked
    assert y.dtype == layer.get_output_dtype(x.dtype)


# One contract run per class (its other configs only change the formula).
_FIRST = {type(c[0]): (c[0], c[1]) for c in reversed(CASES)}


@pytest.mark.parametrize(
    ("config", "values"), list(_FIRST.values()), ids=[t.__qualname__ for t in _FIRST]
)
def test_contract(verify, config, values) -> None:
    x = testing.random_sequence(2, 6, 3, seed=3)
    if values is POSITIVE:
        # Defined for positive inputs only: keep the valid frames positive.
        x = Sequence(jnp.abs(x.values) + 0.1, x.mask).mask_invalid()
    learned = isinstance(config, simple.PRelu.Config | simple.Snake.Config)
    verify(config, x, rf=learned or isinstance(config, simple.Relu.Config))


def test_snake_separate_beta_params() -> None:
    x = testing.random_sequence(2, 4, 3)
    layer = simple.Snake.Config(separate_beta=True).make()
    params = {"params": {"alpha_log": jnp.zeros(3), "beta_log": jnp.full(3, np.log(2.0))}}
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, params)
    y = layer.apply(params, x)
    v = np.asarray(x.values)
    np.testing.assert_allclose(y.values, v + np.sin(v) ** 2 / 2, rtol=1e-5, atol=1e-6)


def test_prelu_param_and_dtype() -> None:
    x = testing.random_sequence(2, 4, 3, dtype=jnp.bfloat16)
    layer = simple.PRelu.Config(param_dtype=jnp.float32).make()
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert variables["params"]["negative_slope"].shape == ()
    assert layer.apply(variables, x).dtype == jnp.bfloat16


def test_abs_of_complex_is_real() -> None:
    x = Sequence.from_values(jnp.array([[[3 + 4j]]], jnp.complex64))
    layer = simple.Abs.Config().make()
    y = layer.apply({}, x)
    assert y.dtype == jnp.float32 == layer.get_output_dtype(jnp.complex64)
    np.testing.assert_allclose(y.values, [[[5.0]]])


def test_softmax_over_inner_axis() -> None:
    x = Sequence.from_values(jnp.log(jnp.array([[[[1.0, 1.0], [1.0, 3.0]]]])))
    y = simple.Softmax.Config(axis=2).make().apply({}, x)
    testing.assert_allclose(y.values, [[[[0.5, 0.25], [0.5, 0.75]]]])


def test_softmax_rejects_batch_and_time_axes() -> None:
    x = testing.random_sequence(1, 2, 3)
    with pytest.raises(ValueError, match="channel axis"):
        simple.Softmax.Config(axis=1).make().apply({}, x)
