"""Every attention config round-trips through sequence_layers.serialization."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import serialization, testing
from sequence_layers.attention import (
    BlockwiseDotProductSelfAttention,
    DotProductAttention,
    DotProductSelfAttention,
    DotProductSelfAttentionV2,
    GmmAttention,
    LocalDotProductSelfAttention,
    MultiSourceDotProductAttention,
    QueryAndSharedKeyValueProjection,
    SeparateQueryKeyValueProjection,
    ShawRelativePositionEmbedding,
    StreamingDotProductAttention,
    StreamingLocalDotProductAttention,
    T5RelativePositionEmbedding,
    TransformerXLRelativePositionEmbedding,
)

CONFIGS = [
    DotProductSelfAttention.Config(
        2,
        4,
        max_past_horizon=3,
        max_future_horizon=1,
        num_kv_heads=1,
        input_projection=SeparateQueryKeyValueProjection(),
        relative_position_embedding=T5RelativePositionEmbedding.Config(8, 2, True),
        param_dtype=jnp.bfloat16,
        num_sink_embeddings=1,
    ),
    DotProductSelfAttention.Config(
        2,
        4,
        5,
        relative_position_embedding=ShawRelativePositionEmbedding.Config(2, 1, 2, 4),
        use_kv_cache_ringbuffer=False,
    ),
    LocalDotProductSelfAttention.Config(
        2,
        4,
        block_size=4,
        max_past_horizon=3,
        relative_position_embedding=TransformerXLRelativePositionEmbedding.Config(2, 4, 3, 0, 6),
    ),
    BlockwiseDotProductSelfAttention.Config(3, 2, 4, 1, 1, segment_ids_name="seg"),
    DotProductSelfAttentionV2.Config(2, 4, 3, 1, use_kv_cache_ringbuffer=True),
    DotProductAttention.Config("src", 2, 4, input_projection=QueryAndSharedKeyValueProjection()),
    MultiSourceDotProductAttention.Config(("a", "b"), 2, 4),
    StreamingDotProductAttention.Config("src", 2, 4, 3, 1),
    StreamingLocalDotProductAttention.Config("src", 2, 4, 4, 3),
    GmmAttention.Config("src", 2, 4, 3, monotonic=True),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__qualname__.split(".")[0])
def test_config_round_trip(config: object) -> None:
    text = serialization.dumps(config)
    restored = serialization.loads(text)
    assert restored == config and hash(restored) == hash(config)
    assert serialization.dumps(restored) == text


def test_restored_layer_gives_identical_outputs() -> None:
    config = CONFIGS[0]
    x = testing.random_sequence(2, 6, 3, seed=1)
    layer = config.make()
    params = layer.init(jax.random.PRNGKey(0), x, training=False, method=layer.layer)
    restored = serialization.loads(serialization.dumps(config)).make()
    y = layer.apply(params, x, training=False, method=layer.layer)
    y2 = restored.apply(params, x, training=False, method=restored.layer)
    np.testing.assert_array_equal(
        np.asarray(y.mask_invalid().values), np.asarray(y2.mask_invalid().values)
    )
