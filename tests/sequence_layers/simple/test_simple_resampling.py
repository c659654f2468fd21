"""Downsample1D, Upsample1D, Upsample2D."""

from __future__ import annotations

from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import Sequence, simple, testing


def test_downsample_properties_and_values(verify) -> None:
    layer = simple.Downsample1D.Config(3).make()
    assert (layer.block_size, layer.output_ratio) == (3, Fraction(1, 3))
    assert (layer.input_latency, layer.output_latency) == (2, 0)
    assert layer.receptive_field_per_step == {0: (0, 0)}
    x = Sequence.from_lengths(jnp.arange(7.0)[None, :, None], [5])
    y = layer.apply({}, x)
    np.testing.assert_array_equal(y.values[0, :, 0], [0, 3, 6])
    np.testing.assert_array_equal(y.mask[0], [True, True, False])
    verify(simple.Downsample1D.Config(2), testing.random_sequence(2, 9, 3, seed=13), rf=True)


def test_downsample_steps_whole_blocks_only() -> None:
    layer = simple.Downsample1D.Config(2).make()
    x = testing.random_sequence(1, 3, 2)
    with pytest.raises(ValueError, match="multiple of block_size=2"):
        layer.apply({}, x, (), training=False, method="step")


def test_upsample1d(verify) -> None:
    layer = simple.Upsample1D.Config(3).make()
    assert layer.output_ratio == 3 and layer.receptive_field_per_step == {
        s: (0, 0) for s in range(3)
    }
    x = Sequence.from_lengths(jnp.array([[[1.0], [2.0]]]), [1])
    y = layer.apply({}, x)
    np.testing.assert_array_equal(y.values[0, :, 0], [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(y.mask[0], [True] * 3 + [False] * 3)
    verify(simple.Upsample1D.Config(2), testing.random_sequence(2, 5, 3, seed=14), rf=True)


def test_upsample2d(verify) -> None:
    layer = simple.Upsample2D.Config((2, 3)).make()
    assert layer.output_ratio == 2 and layer.get_output_shape((2, 4)) == (6, 4)
    v = jnp.arange(4.0).reshape(1, 1, 2, 2)
    y = layer.apply({}, Sequence.from_values(v))
    expected = np.repeat(np.repeat(np.asarray(v), 2, axis=1), 3, axis=2)
    np.testing.assert_array_equal(y.values, expected)
    verify(simple.Upsample2D.Config(2), testing.random_sequence(2, 4, 2, 3, seed=15), rf=True)
    with pytest.raises(ValueError, match=r"\[b, t, h, c\]"):
        layer.get_output_shape((3,))


@pytest.mark.parametrize(
    "make",
    [
        lambda: simple.Downsample1D.Config(0),
        lambda: simple.Upsample1D.Config(-1),
        lambda: simple.Upsample2D.Config((1, 2, 3)),
    ],
)
def test_rate_validation(make) -> None:
    with pytest.raises(ValueError, match="rate"):
        make()
