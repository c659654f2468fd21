"""Channel reductions."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import MaskedSequence, Sequence, simple, testing

V = np.arange(6.0, dtype=np.float32).reshape(2, 3) - 2.0  # one frame: [[-2, -1, 0], [1, 2, 3]]

CASES = [
    (simple.Mean.Config(), [-1.0, 2.0]),
    (simple.Sum.Config(axis=2), [-1.0, 1.0, 3.0]),
    (simple.Max.Config(axis=None), 3.0),
    (simple.Min.Config(axis=(2, 3), keepdims=True), [[-2.0]]),
    (simple.Mean.Config(axis=-2, keepdims=True), [[-0.5, 0.5, 1.5]]),
]


@pytest.mark.parametrize(("config", "expected"), CASES)
def test_values_and_shapes(config, expected) -> None:
    layer = config.make()
    y = layer.apply({}, Sequence.from_values(jnp.asarray(V)[None, None]))
    np.testing.assert_allclose(y.values[0, 0], np.asarray(expected))
    assert y.channel_shape == layer.get_output_shape((2, 3))
    assert isinstance(y, MaskedSequence)


@pytest.mark.parametrize("config", [c for c, _ in CASES[:4]], ids=lambda c: type(c).__qualname__)
def test_contract(verify, config) -> None:
    verify(
        config,
        testing.random_sequence(2, 5, 2, 3, seed=6),
        rf=isinstance(config, simple.Sum.Config),
    )


@pytest.mark.parametrize("axis", [0, 1, -4, 4])
def test_rejects_batch_time_and_out_of_range_axes(axis: int) -> None:
    with pytest.raises(ValueError, match="batch and time"):
        simple.Sum.Config(axis=axis).make().get_output_shape((2, 3))
