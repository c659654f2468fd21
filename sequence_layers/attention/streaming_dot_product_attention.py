"""Cross attention to a source streamed alongside the input."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sequence_layers.attention import common
from sequence_layers.attention.dot_product_self_attention import DotProductSelfAttention
from sequence_layers.attention.local_dot_product_self_attention import (
    LocalDotProductSelfAttention,
)
from sequence_layers.sequence import Sequence
from sequence_layers.types import (
    Constants,
    Emits,
    ReceptiveField,
    SequenceLayerConfig,
    detached,
)


class _StreamingSource:
    """Turns a KV-cache self-attention layer into cross attention whose keys and
    values come from `constants[source_name]`, a Sequence streamed in step with
    the input: `layer` gets the whole source (same length as x), each `step`
    gets the source block aligned with the input block."""

    _allow_combined_qkv = False

    def _validate(self) -> None:
        cfg = self.config  # type: ignore[attr-defined]
        name = type(self).__name__
        if not cfg.source_name:
            raise ValueError(f"{name}: source_name must be a non-empty string.")
        if cfg.max_past_horizon < 1 or cfg.max_future_horizon < 0:
            raise ValueError(
                f"{name} needs max_past_horizon >= 1 and max_future_horizon >= 0, got "
                f"{cfg.max_past_horizon=} {cfg.max_future_horizon=}."
            )
        if cfg.relative_position_embedding is not None:
            raise NotImplementedError(f"{name} does not support relative_position_embedding yet.")
        super()._validate()  # type: ignore[misc]

    def _project_inputs(
        self, x: Sequence, constants: Constants | None
    ) -> tuple[Sequence, Sequence, Sequence]:
        name = type(self).__name__
        source = common.get_source(name, self.config.source_name, constants)
        if source.shape[:2] != x.shape[:2]:
            raise ValueError(
                f"{name} streams its source with the input: constants["
                f"{self.config.source_name!r}] must be [b, t] = {x.shape[:2]} like x, got "
                f"{source.shape[:2]}. In step mode pass the source block of this step."
            )
        projection = self.input_projection  # type: ignore[attr-defined]
        q = projection.get_q(common.clear_invalid(x))
        k, v = projection.get_kv(common.clear_invalid(source))
        return q, k, v

    def _emits(self, probabilities: Sequence) -> Emits:
        return common.CrossAttentionEmits({self.config.source_name: probabilities})

    @property
    def _query_delay(self) -> int:
        if not self.config.use_query_delay_buffer:
            return 0
        return max(0, self.config.max_future_horizon)

    @property
    def input_latency(self) -> int:
        return self._query_delay

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        # The source is a constant; x reaches only its own frame's query.
        if self.config.query_network is not None:
            return detached(self.config.query_network).receptive_field_per_step
        return {0: (0, 0)}


class StreamingDotProductAttention(_StreamingSource, DotProductSelfAttention):
    """Cross attention to a source streamed at the input's block size.

    `x [b, t, d]` with `constants[source_name]` `[b, t, d_src]` ->
    `[b, t, num_heads, units_per_head]`. Frame t attends to source frames
    `[t - max_past_horizon, t + max_future_horizon]`. In `step` the constants
    hold this block's source frames; the projected source is kept in a KV cache
    of `past + future` frames (state as `DotProductSelfAttention`), and with
    `use_query_delay_buffer` the latency is `max_future_horizon`.

    Emits `CrossAttentionEmits({source_name: probabilities})`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(SequenceLayerConfig):
        # Key of the streamed source Sequence in the constants.
        source_name: str
        # Number of attention heads.
        num_heads: int
        # Units per head.
        units_per_head: int
        # Past source frames each frame sees (>= 1).
        max_past_horizon: int
        # Future source frames each frame sees (>= 0).
        max_future_horizon: int = 0
        # Not supported yet (must be None).
        relative_position_embedding: Any = None
        # Dropout rate on attention probabilities (training only).
        attention_probabilities_dropout_rate: float = 0.0
        # Share the dropout mask across queries (as T5).
        broadcast_dropout_across_queries: bool = False
        # Whether the projections have a bias.
        use_bias: bool = False
        # How queries (from x) and keys/values (from the source) are projected.
        input_projection: common.QueryKeyValueProjectionConfig = dataclasses.field(
            default_factory=common.QueryAndKeyValueProjection
        )
        # Optional layer applied to queries [b, t, heads, u].
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
        # Delay queries by max_future_horizon inside the layer (else the caller
        # has already delayed them relative to the source).
        use_query_delay_buffer: bool = True
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
        # Accepted for compatibility; probabilities are always emitted.
        emit_attention_weights: bool = False
        # Layer name.
        name: str | None = None

        def make(self) -> StreamingDotProductAttention:
            return StreamingDotProductAttention(self, name=self.name)

    config: Config  # type: ignore[assignment]


class StreamingLocalDotProductAttention(_StreamingSource, LocalDotProductSelfAttention):
    """`StreamingDotProductAttention` with block-sparse layer-wise compute.

    `config.block_size` only tiles the layer-wise compute (queries in blocks
    against `past + block + future` source frames); the layer's `block_size` is
    1 and `step` is `StreamingDotProductAttention`'s.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(SequenceLayerConfig):
        # Key of the streamed source Sequence in the constants.
        source_name: str
        # Number of attention heads.
        num_heads: int
        # Units per head.
        units_per_head: int
        # Query tile length of the layer-wise compute.
        block_size: int
        # Past source frames each frame sees (>= 1).
        max_past_horizon: int
        # Future source frames each frame sees (>= 0).
        max_future_horizon: int = 0
        # Not supported yet (must be None).
        relative_position_embedding: Any = None
        # Dropout rate on attention probabilities (training only).
        attention_probabilities_dropout_rate: float = 0.0
        # Share the dropout mask across queries (as T5).
        broadcast_dropout_across_queries: bool = False
        # Whether the projections have a bias.
        use_bias: bool = False
        # How queries (from x) and keys/values (from the source) are projected.
        input_projection: common.QueryKeyValueProjectionConfig = dataclasses.field(
            default_factory=common.QueryAndKeyValueProjection
        )
        # Optional layer applied to queries [b, t, heads, u].
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
        # Delay queries by max_future_horizon inside the layer.
        use_query_delay_buffer: bool = True
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

        def make(self) -> StreamingLocalDotProductAttention:
            return StreamingLocalDotProductAttention(self, name=self.name)

    config: Config  # type: ignore[assignment]
