"""Arithmetic against constants and learned scalars."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import MaskedSequence, Sequence, simple, testing

V = np.array([[-2.0, 0.5, 3.0], [1.0, -1.5, 0.0]], np.float32)  # frames of [3]

# (config, expected for V, stays masked)
CASES = [
    (simple.Scale.Config(2.0), V * 2, True),
    (simple.Scale.Config([1.0, 0.0, -1.0]), V * [1, 0, -1], True),
    (simple.Add.Config(0.5), V + 0.5, False),
    (simple.Maximum.Config(0.0), np.maximum(V, 0), False),
    (simple.Minimum.Config([0.0, 1.0, 2.0]), np.minimum(V, [0, 1, 2]), False),
    (simple.Mod.Config(2.0), [[0.0, 0.5, 1.0], [1.0, 0.5, 0.0]], True),
]
IDS = [type(c[0]).__qualname__.split(".")[0] + str(i) for i, c in enumerate(CASES)]


@pytest.mark.parametrize(("config", "expected", "stays_masked"), CASES, ids=IDS)
def test_values(config, expected, stays_masked) -> None:
    y = config.make().apply({}, Sequence.from_values(jnp.asarray(V)[None]))
    testing.assert_allclose(y.values[0], np.asarray(expected))
    assert isinstance(y, MaskedSequence) == stays_masked
    assert y.dtype == jnp.float32


@pytest.mark.parametrize("config", list({type(c[0]): c[0] for c in reversed(CASES)}.values()))
def test_contract(verify, config) -> None:
    verify(
        config, testing.random_sequence(2, 5, 3, seed=4), rf=isinstance(config, simple.Add.Config)
    )


def test_constant_is_cast_to_the_input_dtype() -> None:
    x = Sequence.from_values(jnp.array([[[3, 4]]], jnp.int32))
    y = simple.Scale.Config(2.7).make().apply({}, x)
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(y.values, [[[6, 8]]])


def test_constant_broadcasts_over_channels() -> None:
    layer = simple.Add.Config(np.array([[1.0], [2.0]])).make()
    assert layer.get_output_shape((1, 3)) == (2, 3)
    y = layer.apply({}, Sequence.from_values(jnp.zeros((1, 1, 1, 3))))
    np.testing.assert_array_equal(y.values, [[[[1, 1, 1], [2, 2, 2]]]])


def test_constant_may_not_broadcast_over_batch_or_time() -> None:
    layer = simple.Scale.Config(np.ones((1, 1, 3))).make()
    with pytest.raises(ValueError, match="more dimensions"):
        layer.get_output_shape((3,))
    with pytest.raises(ValueError, match="does not broadcast"):
        simple.Scale.Config(np.ones(2)).make().get_output_shape((3,))


def test_configs_with_arrays_are_hashable() -> None:
    a = simple.Scale.Config(np.arange(3.0))
    assert hash(a) == hash(simple.Scale.Config([0.0, 1.0, 2.0])) and a == a.copy()
    np.testing.assert_array_equal(a.scale.to_array(), [0, 1, 2])


def test_affine_params_and_values(verify) -> None:
    x = testing.random_sequence(2, 5, 3, seed=5)
    layer, _ = verify(simple.Affine.Config(shape=(3,)), x, rf=True)
    assert jax.tree.map(jnp.shape, layer.variables) == {"params": {"scale": (3,), "bias": (3,)}}
    params = {"params": {"scale": jnp.array([1.0, 2.0, 3.0]), "bias": jnp.array([0.5, 0.0, -1.0])}}
    y = layer.clone().apply(params, x)
    expected = np.asarray(x.values) * [1, 2, 3] + [0.5, 0, -1]
    testing.assert_allclose(
        np.where(x.mask[..., None], y.values, 0),
        np.where(x.mask[..., None], expected, 0),
        rtol=1e-6,
    )


def test_affine_scale_only_keeps_masking() -> None:
    x = testing.random_sequence(2, 5, 3)
    layer = simple.Affine.Config(use_bias=False).make()
    variables = layer.init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, variables) == {"params": {"scale": ()}}
    assert isinstance(layer.apply(variables, x), MaskedSequence)
    with pytest.raises(ValueError, match="more dimensions"):
        simple.Affine.Config(shape=(1, 3)).make().get_output_shape((3,))
