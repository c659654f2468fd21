"""Local (sliding-window) self attention with block-sparse layer-wise compute."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sequence_layers.attention import common
from sequence_layers.attention.dot_product_self_attention import (
    KVCacheSelfAttention,
    layer_query_tile,
    window_to_blocks,
)
from sequence_layers.attention.dot_product_self_attention import (
    extract_block_context as extract_block_context,  # re-exported
)
from sequence_layers.sequence import Sequence
from sequence_layers.types import (
    Constants,
    Emits,
    SequenceLayerConfig,
    check_layer_with_emits,
)


class LocalDotProductSelfAttention(KVCacheSelfAttention):
    """Sliding-window self attention: frame t attends to
    `[t - max_past_horizon, t + max_future_horizon]`.

    `[b, t, d] -> [b, t, num_heads, units_per_head]`. Numerically the same as
    `DotProductSelfAttention` with the same horizons, but `layer` never builds
    the `[t, t]` logit matrix: queries are tiled in blocks of a multiple of
    `config.block_size` frames (`layer_query_tile`), each attending to its
    `past + tile + future` key window, so memory grows linearly in t.
    `config.block_size` only tiles that compute and shapes its emits; the
    layer's own `block_size` is 1 and `step` is exactly `DotProductSelfAttention`'s
    (KV cache, query delay buffer, latency = future horizon).

    Layer emits: probabilities `[b, t, heads, past + block_size + future]` over
    each query's key window.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(SequenceLayerConfig):
        # Number of attention heads.
        num_heads: int
        # Units per head.
        units_per_head: int
        # Query tile length of the layer-wise compute (not a streaming block size).
        block_size: int
        # Past frames each frame sees (>= 1).
        max_past_horizon: int
        # Future frames each frame sees (>= 0); also the latency.
        max_future_horizon: int = 0
        # Optional relative position embedding (T5, Shaw or TransformerXL).
        relative_position_embedding: Any = None
        # Dropout rate on attention probabilities (training only).
        attention_probabilities_dropout_rate: float = 0.0
        # Share the dropout mask across queries (as T5).
        broadcast_dropout_across_queries: bool = False
        # Whether the QKV projection has a bias.
        use_bias: bool = False
        # How inputs are projected to queries, keys and values.
        input_projection: common.QueryKeyValueProjectionConfig = dataclasses.field(
            default_factory=common.CombinedQueryKeyValueProjection
        )
        # Optional layer applied to queries [b, t, heads, u] (e.g. RoPE).
        query_network: SequenceLayerConfig | None = None
        # Optional layer applied to keys [b, t, heads, u].
        key_network: SequenceLayerConfig | None = None
        # Optional layer applied to values [b, t, heads, u].
        value_network: SequenceLayerConfig | None = None
        # If set, logits become cap * tanh(logits / cap).
        attention_logits_soft_cap: float | None = None
        # Learn a [units_per_head] query scale.
        per_dim_scale: bool = False
        # Learn a [units_per_head] key scale.
        per_dim_key_scale: bool = False
        # Accepted for compatibility with the reference; sharding is not applied.
        per_dim_scale_sharding: Any = None
        # Query scale (None = 1/sqrt(units_per_head)).
        query_scale: float | None = None
        # Einsum precision.
        precision: Any = None
        # Zero context for queries with no visible key (always true here).
        zero_fully_masked: bool = False
        # Compute dtype (None = promote input and param dtypes).
        compute_dtype: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Learned always-visible sink keys/values.
        num_sink_embeddings: int = 0
        # Initializer of the sink embeddings.
        sink_embeddings_init: Any = nn.linear.default_embed_init
        # Accepted for compatibility with the reference; sharding is not applied.
        sink_embeddings_sharding: Any = None
        # A learned per-head sink logit with a zero value.
        use_sink_scalars: bool = False
        # Initializer of the sink scalars.
        sink_scalars_init: Any = common.zeros_init
        # Write the KV cache as a ring buffer (steps must be exactly 1 frame).
        use_kv_cache_ringbuffer: bool = False
        # Accepted for compatibility; logits are always accumulated in >= float32.
        experimental_accumulate_logits_in_float32: bool = False
        # Layer name.
        name: str | None = None

        def make(self) -> LocalDotProductSelfAttention:
            return LocalDotProductSelfAttention(self, name=self.name)

    config: Config

    def _validate(self) -> None:
        cfg = self.config
        if cfg.max_past_horizon < 1:
            raise ValueError(
                f"LocalDotProductSelfAttention needs max_past_horizon >= 1, got "
                f"{cfg.max_past_horizon=}. Use DotProductSelfAttention for other horizons."
            )
        if cfg.max_future_horizon < 0:
            raise ValueError(
                f"LocalDotProductSelfAttention needs max_future_horizon >= 0, got "
                f"{cfg.max_future_horizon=}."
            )
        if cfg.block_size < 1:
            raise ValueError(
                f"LocalDotProductSelfAttention needs block_size >= 1, got {cfg.block_size=}."
            )
        super()._validate()

    @check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        cfg = self.config
        q, k, v = self._project_layer(x, training, constants)
        # The compute's tiles may be larger than `block_size` (faster, same
        # result); the emits keep the `block_size` windows.
        tile = layer_query_tile(cfg.block_size, cfg.max_past_horizon, cfg.max_future_horizon)
        context, probs = self._attend_in_blocks(q, k, v, tile, training)
        probs = window_to_blocks(probs, tile, cfg.block_size)
        y = Sequence(context.astype(self.get_output_dtype(x.dtype)), q.mask)
        return y, self._emits(Sequence(probs, q.mask))
