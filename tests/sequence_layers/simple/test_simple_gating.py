"""Gated units."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import Sequence, simple, testing

FEATURE = np.array([-1.0, 0.5], np.float32)
GATE = np.array([2.0, -3.0], np.float32)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-v))


CASES = [
    (simple.GatedLinearUnit.Config(), FEATURE * _sigmoid(GATE)),
    (simple.GatedTanhUnit.Config(), np.tanh(FEATURE) * _sigmoid(GATE)),
    (simple.GatedUnit.Config(None, None), FEATURE * GATE),
    (simple.GatedUnit.Config(jax.nn.relu, jnp.tanh), np.maximum(FEATURE, 0) * np.tanh(GATE)),
]


@pytest.mark.parametrize(("config", "expected"), CASES)
def test_values(config, expected) -> None:
    x = Sequence.from_values(jnp.concatenate([FEATURE, GATE])[None, None])
    y = config.make().apply({}, x)
    testing.assert_allclose(y.values[0, 0], expected)


@pytest.mark.parametrize("config", [c for c, _ in CASES[:3]], ids=lambda c: type(c).__qualname__)
def test_contract(verify, config) -> None:
    _, y = verify(config, testing.random_sequence(2, 5, 3, 4, seed=7))
    assert y.channel_shape == (3, 2)


def test_odd_channels_raise() -> None:
    with pytest.raises(ValueError, match="even last channel"):
        simple.GatedLinearUnit.Config().make().get_output_shape((3,))
