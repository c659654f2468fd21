"""Relative position embeddings inside self attention."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing
from sequence_layers.attention import (
    DotProductAttention,
    DotProductSelfAttention,
    LocalDotProductSelfAttention,
    ShawRelativePositionEmbedding,
    T5RelativePositionEmbedding,
    TransformerXLRelativePositionEmbedding,
)
from sequence_layers.sequence import Sequence

B, T, D, H, U = 2, 10, 3, 2, 4

T5 = T5RelativePositionEmbedding.Config(
    num_buckets=8, num_heads=H, bidirectional=True, max_distance=6
)
SHAW = ShawRelativePositionEmbedding.Config(
    max_backward=2, max_forward=1, num_heads=H, units_per_head=U
)
TXL = TransformerXLRelativePositionEmbedding.Config(
    num_heads=H, units_per_head=U, max_backward=3, max_forward=1, position_bias_dim=6
)


def bind(cfg: Any, x: Sequence, constants: dict | None = None) -> Any:
    layer = cfg.make()
    params = layer.init(
        jax.random.PRNGKey(0), x, training=False, constants=constants, method=layer.layer
    )
    return layer.bind(params)


@pytest.mark.parametrize(
    ("rpe", "local"), [(T5, False), (SHAW, False), (TXL, True)], ids=["t5", "shaw", "txl_local"]
)
def test_contract_with_future_horizon(rpe: Any, local: bool) -> None:
    x = testing.random_sequence(B, T, D, seed=1)
    kw = dict(num_heads=H, units_per_head=U, max_past_horizon=3, max_future_horizon=1)
    if local:
        cfg = LocalDotProductSelfAttention.Config(
            block_size=4, relative_position_embedding=rpe, **kw
        )
    else:
        cfg = DotProductSelfAttention.Config(relative_position_embedding=rpe, **kw)
    layer = bind(cfg, x)
    assert "relative_position_embedding" in layer.variables["params"]
    assert layer.supports_step
    testing.verify_contract(layer, x, training=False, rtol=1e-5, atol=1e-5)


def test_local_txl_matches_dense() -> None:
    x = testing.random_sequence(B, T, D, seed=2)
    kw = dict(num_heads=H, units_per_head=U, max_past_horizon=3, max_future_horizon=1)
    loc = bind(
        LocalDotProductSelfAttention.Config(block_size=3, relative_position_embedding=TXL, **kw), x
    )
    dense = DotProductSelfAttention.Config(relative_position_embedding=TXL, **kw).make()
    dense = dense.bind(loc.variables)
    np.testing.assert_allclose(
        loc.layer(x, training=False).mask_invalid().values,
        dense.layer(x, training=False).mask_invalid().values,
        rtol=1e-5,
        atol=1e-5,
    )


def test_t5_buckets() -> None:
    rpe = T5RelativePositionEmbedding.Config(
        num_buckets=8, num_heads=1, bidirectional=False, max_distance=8
    )
    module = rpe.make()
    offsets = jnp.array([0, -1, -2, -3, -4, -7, -8, -100, 5])
    buckets = module.bucket(offsets)
    # Exact for |offset| < 4, log-spaced up to 7 at max_distance, future -> 0.
    np.testing.assert_array_equal(buckets, [0, 1, 2, 3, 4, 6, 7, 7, 0])


def test_t5_bias_values() -> None:
    module = T5.make()
    params = module.init(
        jax.random.PRNGKey(0),
        jnp.arange(3)[None],
        jnp.arange(3)[None],
        jnp.zeros((1, 3, H, U)),
        method=module.get_position_bias,
    )
    bias = module.apply(
        params,
        jnp.arange(3)[None],
        jnp.arange(3)[None],
        jnp.zeros((1, 3, H, U)),
        method=module.get_position_bias,
    )
    table = np.asarray(params["params"]["embedding"])
    assert bias.shape == (1, H, 3, 3)
    buckets = np.asarray(module.bucket(jnp.arange(3)[None, :] - jnp.arange(3)[:, None]))
    np.testing.assert_allclose(bias[0, 1], table[buckets, 1], atol=1e-6)


def test_cross_attention_requires_position_bias() -> None:
    x = testing.random_sequence(B, T, D, seed=3)
    constants = {"src": testing.random_sequence(B, 5, D, seed=4)}
    layer = bind(
        DotProductAttention.Config("src", H, U, relative_position_embedding=T5), x, constants
    )
    testing.verify_contract(layer, x, training=False, constants=constants)
    with pytest.raises(ValueError, match="position bias"):
        bind(DotProductAttention.Config("src", H, U, relative_position_embedding=TXL), x, constants)
