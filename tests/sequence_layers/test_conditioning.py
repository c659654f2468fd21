"""Tests for Conditioning: every projection/combination, and the three ways
the conditioning arrives (per-row array, streamed Sequence, indexed Sequence)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import conditioning, testing, utils
from sequence_layers.conditioning import Combination, Conditioning, Projection
from sequence_layers.sequence import Sequence

_MODES = [
    (Projection.IDENTITY, Combination.ADD),
    (Projection.IDENTITY, Combination.CONCAT),
    (Projection.LINEAR, Combination.CONCAT_BEFORE),
    (Projection.IDENTITY, Combination.MUL),
    (Projection.LINEAR_AFFINE, Combination.AFFINE),
    (Projection.LINEAR, Combination.AFFINE_SHIFT),
    (Projection.LINEAR, Combination.AFFINE_SCALE),
]


def _verify(config: Conditioning.Config, x: Sequence, constants: Any, **kwargs: Any) -> Any:
    layer = testing.init_and_bind(config, x, constants=constants, randomize=True)
    y = testing.verify_contract(layer, x, constants=constants, jit=True, **kwargs)
    return layer, y


@pytest.mark.parametrize(("projection", "combination"), _MODES, ids=lambda m: m.name.lower())
def test_conditioning_modes_indexed_sequence(
    projection: Projection, combination: Combination
) -> None:
    x = testing.random_sequence(2, 5, 3, seed=1)
    c = testing.random_sequence(2, 5, 3, seed=2)
    config = Conditioning.Config("c", projection, combination)
    layer, y = _verify(config, x, {"c": c}, pad_constants=True)
    assert layer.get_initial_state(2, x.channel_spec, training=False, constants={"c": c}).shape == (
        2,
    )
    # A frame is valid iff both x and c are.
    np.testing.assert_array_equal(np.asarray(y.mask), np.asarray(x.mask & c.mask))


def test_conditioning_streamed_sequence() -> None:
    x = testing.random_sequence(2, 6, 3, seed=3)
    c = testing.random_sequence(2, 6, 4, seed=4)
    config = Conditioning.Config("c", "linear", "add", streaming=True)
    layer, _ = _verify(config, x, {"c": c}, stream_constants=True, pad_constants=True)
    assert layer.get_initial_state(2, x.channel_spec, training=False, constants={"c": c}) == ()


def test_conditioning_array_broadcast_over_time() -> None:
    x = testing.random_sequence(2, 5, 3, seed=5)
    c = jnp.asarray(np.random.default_rng(6).normal(size=(2, 2)), jnp.float32)
    _, y = _verify(Conditioning.Config("c", "identity", "concat"), x, {"c": c})
    assert y.channel_shape == (5,)
    np.testing.assert_allclose(
        np.asarray(y.values[:, :, 3:]) * np.asarray(x.mask)[..., None],
        np.broadcast_to(np.asarray(c)[:, None], (2, 5, 2)) * np.asarray(x.mask)[..., None],
    )


def test_conditioning_values_by_hand() -> None:
    x = Sequence.from_values(jnp.asarray([[[1.0, 2.0]]]))
    c = Sequence.from_values(jnp.asarray([[[3.0, 5.0]]]))
    consts = {"c": c}

    def run(combination: str) -> np.ndarray:
        layer = Conditioning.Config("c", "identity", combination).make()
        y = layer.apply({}, x, training=False, constants=consts, method="layer")
        return np.asarray(y.values[0, 0])

    np.testing.assert_array_equal(run("add"), [4, 7])
    np.testing.assert_array_equal(run("mul"), [3, 10])
    np.testing.assert_array_equal(run("concat"), [1, 2, 3, 5])
    np.testing.assert_array_equal(run("concat_before"), [3, 5, 1, 2])


def test_conditioning_broadcasts_channel_shapes() -> None:
    x = testing.random_sequence(1, 2, 3, 1, 5, random_lengths=False)
    c = testing.random_sequence(1, 2, 2, 5, random_lengths=False)
    layer = Conditioning.Config("c", "identity", "add").make()
    y = layer.apply({}, x, training=False, constants={"c": c}, method="layer")
    assert y.channel_shape == (3, 2, 5)
    concat = Conditioning.Config("c", "identity", "concat").make()
    assert concat.get_output_shape((3, 1, 5), constants={"c": c}) == (3, 2, 10)


def test_indexed_rows_reset_independently() -> None:
    x = testing.random_sequence(2, 4, 3, random_lengths=False, seed=7)
    c = testing.random_sequence(2, 4, 3, random_lengths=False, seed=8)
    consts = {"c": c}
    layer = testing.init_and_bind(Conditioning.Config("c", "linear", "add"), x, constants=consts)
    initial = layer.get_initial_state(2, x.channel_spec, training=False, constants=consts)
    state = initial
    ys = []
    for i in range(4):
        if i == 2:  # row 1 starts a new stream: it reads c from its frame 0 again
            state = utils.batch_where(jnp.asarray([False, True]), initial, state)
        y, state = layer.step(x[:, i : i + 1], state, training=False, constants=consts)
        ys.append(y)
    y = Sequence.concatenate_sequences(ys)
    np.testing.assert_array_equal(np.asarray(state), [4, 2])
    full = layer.layer(x, training=False, constants=consts)
    np.testing.assert_allclose(np.asarray(y.values[0]), np.asarray(full.values[0]), atol=1e-6)
    restarted = layer.layer(x[1:2, 2:], training=False, constants={"c": c[1:2, :2]})
    np.testing.assert_allclose(
        np.asarray(y.values[1, 2:]), np.asarray(restarted.values[0]), atol=1e-6
    )


def test_conditioning_validation() -> None:
    with pytest.raises(ValueError, match="needs projection LINEAR_AFFINE"):
        Conditioning.Config("c", "linear", "affine")
    with pytest.raises(ValueError, match="needs combination AFFINE"):
        Conditioning.Config("c", "linear_affine", "add")
    with pytest.raises(ValueError, match="Unknown Combination"):
        Conditioning.Config("c", "linear", "subtract")
    x = testing.random_sequence(1, 2, 3)
    layer = Conditioning.Config("c", "identity", "add").make()
    with pytest.raises(ValueError, match="needs constants"):
        layer.apply({}, x, training=False, constants={}, method="layer")
    c = testing.random_sequence(1, 3, 3)
    with pytest.raises(ValueError, match="time-aligned"):
        layer.apply({}, x, training=False, constants={"c": c}, method="layer")
    assert conditioning.Conditioning.Projection is Projection


def test_serialization_round_trip() -> None:
    from sequence_layers import serialization

    config = Conditioning.Config(
        "c", Projection.LINEAR_AFFINE, Combination.AFFINE, projection_channel_shape=(3,)
    )
    restored = serialization.loads(serialization.dumps(config))
    assert restored == config
    x = testing.random_sequence(2, 4, 3, seed=10)
    consts = {"c": testing.random_sequence(2, 4, 2, seed=11)}
    layer = testing.init_and_bind(config, x, constants=consts, randomize=True)
    y = layer.layer(x, training=False, constants=consts)
    y2 = restored.make().apply(layer.variables, x, training=False, constants=consts, method="layer")
    np.testing.assert_array_equal(np.asarray(y.values), np.asarray(y2.values))
