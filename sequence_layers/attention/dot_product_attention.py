"""Cross attention to a whole source sequence given in the constants."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers.attention import common
from sequence_layers.sequence import Sequence
from sequence_layers.types import (
    ChannelSpec,
    Constants,
    Emits,
    Emitting,
    ReceptiveField,
    SequenceLayerConfig,
    State,
    check_layer_with_emits,
    check_step_with_emits,
    detached,
)


class DotProductAttention(common.HeadsOutput, Emitting):
    """Multi-head cross attention from the input to `constants[source_name]`.

    `x [b, t, d]`, source `[b, s, d_src]` -> `[b, t, num_heads, units_per_head]`
    (no output projection). Each frame attends to every valid source frame, so
    frames are independent: `step` is as cheap as `layer` per frame.

    Step state: `(keys [b, s, heads, u], values [b, s, heads, u], mask [b, s],
    query_network_state, time_step [b])`; the source is projected once in
    `get_initial_state` (so sources of different lengths must be padded to one
    length). With `recompute_kv_per_step` the state is `(query_network_state,
    time_step)` and every step re-reads the source.

    Emits `CrossAttentionEmits({source_name: probabilities [b, t, heads, s]})`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(SequenceLayerConfig):
        # Key of the source Sequence [b, s, d_src] in the constants.
        source_name: str
        # Number of attention heads.
        num_heads: int
        # Units per head.
        units_per_head: int
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
        # Optional layer applied to queries [b, t, heads, u] (e.g. RoPE).
        query_network: SequenceLayerConfig | None = None
        # Optional layer applied (layer-wise) to keys [b, s, heads, u].
        key_network: SequenceLayerConfig | None = None
        # Optional layer applied (layer-wise) to values [b, s, heads, u].
        value_network: SequenceLayerConfig | None = None
        # Optional relative position embedding; must provide a position bias.
        relative_position_embedding: Any = None
        # If set, constants key of query positions [b, t] (else the time index).
        query_positions_name: str | None = None
        # Learn a [units_per_head] query scale.
        per_dim_scale: bool = False
        # Learn a [units_per_head] key scale.
        per_dim_key_scale: bool = False
        # Accepted for compatibility with the reference; sharding is not applied.
        per_dim_scale_sharding: Any = None
        # Query scale (None = 1/sqrt(units_per_head)).
        query_scale: float | None = None
        # If set, logits become cap * tanh(logits / cap).
        attention_logits_soft_cap: float | None = None
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
        # Accepted for compatibility; logits are always accumulated in >= float32.
        experimental_accumulate_logits_in_float32: bool = False
        # Re-read and re-project the source on every step instead of caching it.
        recompute_kv_per_step: bool = False
        # Accepted for compatibility; probabilities are always emitted.
        emit_attention_weights: bool = False
        # Layer name.
        name: str | None = None

        def make(self) -> DotProductAttention:
            return DotProductAttention(self, name=self.name)

    config: Config

    def setup(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if not cfg.source_name:
            raise ValueError(f"{name}: source_name must be a non-empty string.")
        common.validate_heads(cfg.num_heads, cfg.units_per_head, name)
        common.validate_soft_cap(cfg.attention_logits_soft_cap, name)
        self.input_projection = cfg.input_projection.make(
            num_query_heads=cfg.num_heads,
            num_kv_heads=cfg.num_heads,
            units_per_head=cfg.units_per_head,
            use_bias=cfg.use_bias,
            precision=cfg.precision,
            compute_dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            allow_combined_qkv=False,
        )
        nn.share_scope(self, self.input_projection)
        common.setup_scales_and_sinks(self, cfg, cfg.num_heads)
        self.query_network = common.make_network(cfg.query_network, "query", name)
        self.key_network = common.make_network(cfg.key_network, "key", name)
        self.value_network = common.make_network(cfg.value_network, "value", name)
        self.relative_position_embedding = None
        if cfg.relative_position_embedding is not None:
            self.relative_position_embedding = cfg.relative_position_embedding.make()
            if not self.relative_position_embedding.supports_position_bias:
                raise ValueError(
                    f"{name}: the relative position embedding must provide a position bias "
                    f"(T5, Shaw), got {type(self.relative_position_embedding).__name__}."
                )

    @property
    def supports_step(self) -> bool:
        cfg = self.config
        return cfg.query_network is None or detached(cfg.query_network).supports_step

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        if self.config.query_network is not None:
            return detached(self.config.query_network).receptive_field_per_step
        return {0: (0, 0)}

    def _project_kv(
        self, training: bool, constants: Constants | None
    ) -> tuple[Sequence, Sequence, jax.Array]:
        source = common.get_source(type(self).__name__, self.config.source_name, constants)
        k, v = self.input_projection.get_kv(common.clear_invalid(source))
        if self.key_network is not None:
            k = self.key_network.layer(k, training=training, constants=constants)
        if self.value_network is not None:
            v = self.value_network.layer(v, training=training, constants=constants)
        k, v = common.clear_invalid(k), common.clear_invalid(v)
        return k, v, k.mask & v.mask

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        cfg = self.config
        q_state: Any = ()
        if self.query_network is not None:
            spec = common.network_spec(cfg.num_heads, cfg.units_per_head, input_spec.dtype)
            q_state = self.query_network.get_initial_state(
                batch_size, spec, training=training, constants=constants
            )
        time_step = jnp.zeros((batch_size,), jnp.int32)
        if cfg.recompute_kv_per_step:
            return (q_state, time_step)
        k, v, mask = self._project_kv(training, constants)
        return (k.values, v.values, mask, q_state, time_step)

    def _attention(
        self,
        q: Sequence,
        keys: jax.Array,
        values: jax.Array,
        kv_mask: jax.Array,
        time_step: jax.Array,
        *,
        training: bool,
        constants: Constants | None,
    ) -> tuple[Sequence, Emits]:
        cfg = self.config
        b, t = q.shape[:2]
        bias = None
        if self.relative_position_embedding is not None:
            if cfg.query_positions_name:
                q_pos = common.get_source(
                    type(self).__name__, cfg.query_positions_name, constants, required_rank=2
                ).values
                if q_pos.shape != (b, t):
                    raise ValueError(
                        f"{type(self).__name__}: query positions must be [b, t]={(b, t)}, got "
                        f"{q_pos.shape}."
                    )
            else:
                q_pos = time_step[:, None] + jnp.arange(t)[None, :]
            k_pos = jnp.arange(keys.shape[1])[None, :]
            bias = self.relative_position_embedding.get_position_bias(q_pos, k_pos, q.values, keys)
        visible = kv_mask[:, None, None, :]
        context, probs = common.attend(
            self, q.values, keys, values, visible, training=training, logit_bias=bias
        )
        y = Sequence(context.astype(self.get_output_dtype(q.dtype)), q.mask)
        return y, common.CrossAttentionEmits({cfg.source_name: Sequence(probs, q.mask)})

    def _queries(
        self, x: Sequence, q_state: Any, training: bool, constants: Constants | None, step: bool
    ) -> tuple[Sequence, Any]:
        self.get_output_shape(x.channel_shape)
        q = self.input_projection.get_q(common.clear_invalid(x))
        if self.query_network is not None:
            if step:
                q, q_state = self.query_network.step(
                    q, q_state, training=training, constants=constants
                )
            else:
                q = self.query_network.layer(q, training=training, constants=constants)
        return common.clear_invalid(q), q_state

    @check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        q, _ = self._queries(x, (), training, constants, step=False)
        k, v, mask = self._project_kv(training, constants)
        time_step = jnp.zeros((x.shape[0],), jnp.int32)
        return self._attention(
            q, k.values, v.values, mask, time_step, training=training, constants=constants
        )

    @check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        if self.config.recompute_kv_per_step:
            q_state, time_step = state
            k, v, mask = self._project_kv(training, constants)
            keys, values = k.values, v.values
        else:
            keys, values, mask, q_state, time_step = state
        q, q_state = self._queries(x, q_state, training, constants, step=True)
        y, emits = self._attention(
            q, keys, values, mask, time_step, training=training, constants=constants
        )
        time_step = time_step + x.shape[1]
        if self.config.recompute_kv_per_step:
            return y, (q_state, time_step), emits
        return y, (keys, values, mask, q_state, time_step), emits
