"""Dropout and AddNoise: identity when not training, random when training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import MaskedSequence, simple, testing

X = testing.random_sequence(2, 6, 4, random_lengths=False, seed=12)


@pytest.mark.parametrize(
    "config",
    [
        simple.Dropout.Config(rate=0.5),
        simple.AddNoise.Config(simple.AddNoise.Normal(0.0, 1.0), training_only=True),
    ],
    ids=["Dropout", "AddNoise"],
)
def test_identity_and_contract_when_not_training(verify, config) -> None:
    _, y = verify(config, X)
    np.testing.assert_array_equal(y.values, X.values)


def _train(config, seed: int = 0):
    layer = config.make()
    collection = config.rng_collection
    return layer.apply({}, X, training=True, rngs={collection: jax.random.PRNGKey(seed)})


def test_dropout_when_training() -> None:
    y = _train(simple.Dropout.Config(rate=0.5))
    v, out = np.asarray(X.values), np.asarray(y.values)
    kept = out != 0
    testing.assert_allclose(out[kept], 2 * v[kept])
    assert 0.2 < kept.mean() < 0.8
    assert isinstance(y, MaskedSequence)
    np.testing.assert_array_equal(out, _train(simple.Dropout.Config(rate=0.5)).values)
    assert not np.array_equal(out, _train(simple.Dropout.Config(rate=0.5), seed=1).values)


def test_dropout_broadcast_dims_and_edge_rates() -> None:
    y = np.asarray(_train(simple.Dropout.Config(rate=0.5, broadcast_dims=(1,))).values)
    dropped = y == 0
    # One draw per (batch, channel), shared across time.
    assert np.all(dropped == dropped[:, :1])
    np.testing.assert_array_equal(_train(simple.Dropout.Config(rate=1.0)).values, 0)
    np.testing.assert_array_equal(_train(simple.Dropout.Config(rate=0.0)).values, X.values)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        simple.Dropout.Config(rate=1.5)


def test_dropout_refuses_to_step_in_training() -> None:
    layer = simple.Dropout.Config(rate=0.1).make()
    with pytest.raises(ValueError, match="training=True"):
        layer.apply(
            {}, X, (), training=True, method="step", rngs={"dropout": jax.random.PRNGKey(0)}
        )


@pytest.mark.parametrize(
    ("sampler", "low", "high"),
    [
        (simple.AddNoise.Uniform(0.5, 1.0), 0.5, 1.0),
        (simple.AddNoise.TruncatedNormal(3.0, 0.5), 2.0, 4.0),
        (simple.AddNoise.Normal(0.0, 1e-3), -0.01, 0.01),
    ],
)
def test_add_noise_when_training(sampler, low: float, high: float) -> None:
    config = simple.AddNoise.Config(sampler, training_only=True)
    noise = np.asarray(_train(config).values - X.values)
    assert np.all((noise >= low) & (noise <= high)) and np.ptp(noise) > 0


def test_add_noise_outside_training() -> None:
    layer = simple.AddNoise.Config(simple.AddNoise.Uniform(1.0, 2.0), training_only=False).make()
    y = layer.apply({}, X, rngs={"params": jax.random.PRNGKey(0)})
    assert np.all(np.asarray(y.values - X.values) >= 1.0)
    assert y.dtype == jnp.float32
