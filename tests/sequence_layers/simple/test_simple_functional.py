"""Lambda."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import ChannelSpec, MaskedSequence, Sequence, simple, testing

X = testing.random_sequence(2, 5, 4, seed=16)


def test_values_function(verify) -> None:
    config = simple.Lambda.Config(lambda v: v[..., :2] * 3.0, mask_required=False)
    layer, y = verify(config, X, rf=True)
    testing.assert_allclose(y.values, np.asarray(X.values)[..., :2] * 3)
    assert isinstance(layer.layer(X, training=False), MaskedSequence)
    assert layer.get_output_spec(X.channel_spec) == ChannelSpec((2,), jnp.float32)


def test_mask_required_unmasks() -> None:
    y = simple.Lambda.Config(jnp.exp).make().apply({}, X)
    assert type(y) is Sequence


def test_sequence_function() -> None:
    config = simple.Lambda.Config(lambda s: s.apply_values(jnp.sum, axis=-1), sequence_input=True)
    layer = config.make()
    y = layer.apply({}, X)
    testing.assert_allclose(y.values, np.asarray(X.values).sum(-1))
    assert layer.get_output_spec(X.channel_spec).shape == ()


def test_output_dtype_needs_expected_spec() -> None:
    layer = simple.Lambda.Config(lambda v: v.astype(jnp.int32)).make()
    with pytest.raises(ValueError, match="expected_input_spec"):
        layer.get_output_dtype(jnp.float32)
    spec = ChannelSpec((4,), jnp.float32)
    typed = simple.Lambda.Config(lambda v: v.astype(jnp.int32), expected_input_spec=spec).make()
    assert typed.get_output_dtype(jnp.float32) == jnp.int32


def test_changing_batch_or_time_raises() -> None:
    layer = simple.Lambda.Config(lambda v: v[:, :2]).make()
    with pytest.raises(ValueError, match="must keep batch and time"):
        layer.apply({}, X)
    with pytest.raises(ValueError, match="must keep batch and time"):
        jax.eval_shape(lambda x: layer.apply({}, x), X)
