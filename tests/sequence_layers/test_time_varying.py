"""Tests for SequenceEmbedding, SequenceDense and MaskedDense (per-row steps)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing, time_varying, types, utils
from sequence_layers.sequence import Sequence


def _verify(config: types.SequenceLayerConfig, x: Sequence, **kwargs: Any) -> Any:
    layer = testing.init_and_bind(config, x, randomize=True)
    y = testing.verify_contract(layer, x, jit=True, **kwargs)
    return layer, y


def _assert_rows_independent(config: types.SequenceLayerConfig, x: Sequence) -> None:
    """Steps one frame at a time; row 0 restarts before frame 1 and row 1
    before frame 2. Each row's outputs after its restart equal layer() on
    that row's remaining input alone."""
    layer = testing.init_and_bind(config, x, randomize=True)
    initial = layer.get_initial_state(x.shape[0], x.channel_spec, training=False)
    state, outputs = initial, []
    resets = {1: [True, False], 2: [False, True]}
    for i in range(x.shape[1]):
        if i in resets:
            state = utils.batch_where(jnp.asarray(resets[i]), initial, state)
        y, state = layer.step(x[:, i : i + 1], state, training=False)
        outputs.append(y)
    y = Sequence.concatenate_sequences(outputs)
    for row, start in ((0, 1), (1, 2)):
        alone = layer.layer(x[row : row + 1, start:], training=False)
        np.testing.assert_allclose(
            np.asarray(y[row : row + 1, start:].mask_invalid().values),
            np.asarray(alone.mask_invalid().values),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("per_step", [3, (2, 3, 4, 2, 3, 5, 4, 2)], ids=["uniform", "per_step"])
def test_sequence_embedding_contract(per_step: Any) -> None:
    x = testing.random_sequence(2, 6, 2, dtype=jnp.int32, high=2, seed=1)
    _verify(
        time_varying.SequenceEmbedding.Config(4, per_step, num_steps=8),
        x,
        test_receptive_field=False,  # integer inputs have no gradient
    )


def test_sequence_embedding_values() -> None:
    config = time_varying.SequenceEmbedding.Config(2, (2, 3), num_steps=2)
    x = Sequence.from_values(jnp.asarray([[[1], [2]]], jnp.int32))
    layer = testing.init_and_bind(config, x)
    table = np.asarray(layer.variables["params"]["embedding"])
    y = layer.layer(x, training=False)
    # Step 0 uses rows [0, 2), step 1 rows [2, 5).
    np.testing.assert_array_equal(np.asarray(y.values[0, 0, 0]), table[1])
    np.testing.assert_array_equal(np.asarray(y.values[0, 1, 0]), table[2 + 2])
    # Codes out of their step's range give NaN.
    bad = Sequence.from_values(jnp.asarray([[[2], [3]]], jnp.int32))
    assert np.isnan(np.asarray(layer.layer(bad, training=False).values[0, 0])).all()
    with pytest.raises(ValueError, match="num_steps=3"):
        time_varying.SequenceEmbedding.Config(2, (2, 3), num_steps=3)


@pytest.mark.parametrize(
    "config",
    [
        time_varying.SequenceDense.Config(3, num_steps=8),
        time_varying.MaskedDense.Config(3, num_steps=8, activation=jnp.tanh),
    ],
    ids=["sequence_dense", "masked_dense"],
)
def test_dense_contract(config: types.SequenceLayerConfig) -> None:
    x = testing.random_sequence(2, 6, 4, seed=2)
    _verify(config, x, rtol=1e-5, atol=1e-5)


def test_sequence_dense_by_hand() -> None:
    config = time_varying.SequenceDense.Config(2, num_steps=3)
    x = testing.random_sequence(1, 3, 4, random_lengths=False, seed=3)
    layer = testing.init_and_bind(config, x, randomize=True)
    p = layer.variables["params"]
    y = layer.layer(x, training=False)
    xv = np.asarray(x.values[0])
    expected = np.einsum("ti,tio->to", xv, np.asarray(p["kernel"])) + np.asarray(p["bias"])
    np.testing.assert_allclose(np.asarray(y.values[0]), expected, rtol=1e-5, atol=1e-5)
    # Steps past num_steps have no weights.
    longer = testing.random_sequence(1, 4, 4, random_lengths=False)
    assert np.isnan(np.asarray(layer.layer(longer, training=False).values[0, 3])).all()


def test_masked_dense_by_hand() -> None:
    config = time_varying.MaskedDense.Config(2, num_steps=3, use_bias=False)
    x = testing.random_sequence(1, 3, 4, random_lengths=False, seed=4)
    layer = testing.init_and_bind(config, x, randomize=True)
    kernel = np.asarray(layer.variables["params"]["kernel"])
    assert layer.receptive_field_per_step == {0: (-2, 0)}
    xv = np.asarray(x.values[0])
    y = np.asarray(layer.layer(x, training=False).values[0])
    for t in range(3):
        expected = sum(xv[s] @ kernel[s, t] for s in range(t + 1))
        np.testing.assert_allclose(y[t], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [
        time_varying.SequenceEmbedding.Config(3, 4, num_steps=6),
        time_varying.SequenceDense.Config(3, num_steps=6),
        time_varying.MaskedDense.Config(3, num_steps=6),
    ],
    ids=["embedding", "sequence_dense", "masked_dense"],
)
def test_rows_reset_independently(config: types.SequenceLayerConfig) -> None:
    integer = isinstance(config, time_varying.SequenceEmbedding.Config)
    dtype = jnp.int32 if integer else jnp.float32
    x = testing.random_sequence(2, 5, 2, dtype=dtype, high=4, random_lengths=False, seed=5)
    _assert_rows_independent(config, x)


def test_counter_is_per_row() -> None:
    layer = time_varying.MaskedDense.Config(3, num_steps=4).make()
    x = testing.random_sequence(3, 2, 2)
    step, inputs = layer.get_initial_state(3, x.channel_spec, training=False)
    assert step.shape == (3,) and inputs.shape == (3, 4, 2)
    with pytest.raises(ValueError, match="features"):
        time_varying.SequenceDense.Config(3, num_steps=4).make().get_output_shape((2, 2))


@pytest.mark.parametrize(
    "config",
    [
        time_varying.SequenceDense.Config(3, num_steps=4, activation=jnp.tanh),
        time_varying.MaskedDense.Config(3, num_steps=4, use_bias=False),
    ],
    ids=["sequence_dense", "masked_dense"],
)
def test_serialization_round_trip(config: types.SequenceLayerConfig) -> None:
    from sequence_layers import serialization

    restored = serialization.loads(serialization.dumps(config))
    assert restored == config
    x = testing.random_sequence(2, 4, 2, seed=12)
    layer = testing.init_and_bind(config, x, randomize=True)
    y = layer.layer(x, training=False)
    y2 = restored.make().apply(layer.variables, x, training=False, method="layer")
    np.testing.assert_array_equal(np.asarray(y.values), np.asarray(y2.values))
