"""Cross attention with one softmax over several sources."""

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


def _as_names(names: Any, count: int, what: str) -> tuple[str | None, ...]:
    if names is None:
        return (None,) * count
    if isinstance(names, str):
        return (names,) * count
    names = tuple(names)
    if len(names) != count:
        raise ValueError(f"{what} needs one name per source ({count}), got {names}.")
    return names


class MultiSourceDotProductAttention(common.HeadsOutput, Emitting):
    """Cross attention from the input to several sources at once.

    `x [b, t, d]` and sources `constants[name] [b, s_i, d_src]` (equal channel
    shapes) -> `[b, t, num_heads, units_per_head]`. One shared key/value
    projection; one softmax over the concatenation of all sources' valid
    frames. With `query_segment_ids_name` (and per-source
    `source_segment_ids_names`) a query sees only source frames of its segment.

    Step state: `(kv, query_network_state, time_step [b])` where `kv` holds the
    projected, concatenated sources (`keys`, `values` `[b, sum s_i, kv_heads, u]`,
    `segment_ids`, `mask` `[b, sum s_i]`), computed once in `get_initial_state`.
    In step mode the query segment ids in the constants are this block's ids.
    Emits nothing (as the reference).
    """

    @dataclasses.dataclass(frozen=True)
    class Config(SequenceLayerConfig):
        # Constants key(s) of the source Sequences.
        source_names: str | tuple[str, ...]
        # Number of attention heads.
        num_heads: int
        # Units per head.
        units_per_head: int
        # Key/value heads for grouped-query attention (None = num_heads).
        num_kv_heads: int | None = None
        # Accepted for compatibility; attention is computed densely here.
        flash_attention_query_block_size: int | None = None
        flash_attention_source_block_sizes: int | tuple[int, ...] | None = None
        # Accepted for compatibility; positions do not affect the result here
        # (as in the reference, whose only mask is the segment mask).
        query_positions_name: str | None = None
        # Constants key of query segment ids [b, t] (None = no segment mask).
        query_segment_ids_name: str | None = None
        # Accepted for compatibility (see query_positions_name).
        source_position_names: str | tuple[str, ...] | None = None
        # Constants key(s) of source segment ids [b, s_i].
        source_segment_ids_names: str | tuple[str, ...] | None = None
        # Whether the projections have a bias.
        use_bias: bool = False
        # How queries (from x) and keys/values (from the sources) are projected.
        input_projection: common.QueryKeyValueProjectionConfig = dataclasses.field(
            default_factory=common.QueryAndKeyValueProjection
        )
        # Optional layer applied to queries [b, t, heads, u].
        query_network: SequenceLayerConfig | None = None
        # Optional layer applied (layer-wise) to each source's keys.
        key_network: SequenceLayerConfig | None = None
        # Optional layer applied (layer-wise) to each source's values.
        value_network: SequenceLayerConfig | None = None
        # Learn a [units_per_head] query scale.
        per_dim_scale: bool = False
        # Accepted for compatibility with the reference; sharding is not applied.
        per_dim_scale_sharding: Any = None
        # Query scale (None = 1/sqrt(units_per_head)).
        query_scale: float | None = None
        # If set, logits become cap * tanh(logits / cap).
        attention_logits_soft_cap: float | None = None
        # Einsum precision.
        precision: Any = None
        # Compute dtype (None = promote input and param dtypes).
        compute_dtype: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Accepted for compatibility; logits are always accumulated in >= float32.
        experimental_accumulate_logits_in_float32: bool = False
        # Layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            for field in (
                "source_names",
                "source_position_names",
                "source_segment_ids_names",
                "flash_attention_source_block_sizes",
            ):
                value = getattr(self, field)
                if isinstance(value, list):
                    object.__setattr__(self, field, tuple(value))

        def make(self) -> MultiSourceDotProductAttention:
            return MultiSourceDotProductAttention(self, name=self.name)

    config: Config

    @property
    def _source_names(self) -> tuple[str, ...]:
        names = self.config.source_names
        return (names,) if isinstance(names, str) else tuple(names)

    def setup(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if not self._source_names or not all(self._source_names):
            raise ValueError(f"{name}: source_names must be non-empty, got {cfg.source_names!r}.")
        common.validate_heads(cfg.num_heads, cfg.units_per_head, name)
        common.validate_soft_cap(cfg.attention_logits_soft_cap, name)
        num_kv_heads = cfg.num_kv_heads or cfg.num_heads
        self.input_projection = cfg.input_projection.make(
            num_query_heads=cfg.num_heads,
            num_kv_heads=num_kv_heads,
            units_per_head=cfg.units_per_head,
            use_bias=cfg.use_bias,
            precision=cfg.precision,
            compute_dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            allow_combined_qkv=False,
        )
        nn.share_scope(self, self.input_projection)
        common.setup_scales_and_sinks(self, cfg, num_kv_heads)
        self.query_network = common.make_network(cfg.query_network, "query", name)
        self.key_network = common.make_network(cfg.key_network, "key", name)
        self.value_network = common.make_network(cfg.value_network, "value", name)

    @property
    def supports_step(self) -> bool:
        cfg = self.config
        return cfg.query_network is None or detached(cfg.query_network).supports_step

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        if self.config.query_network is not None:
            return detached(self.config.query_network).receptive_field_per_step
        return {0: (0, 0)}

    def _project_sources(self, training: bool, constants: Constants | None) -> dict[str, Any]:
        name = type(self).__name__
        names = self._source_names
        segment_names = _as_names(
            self.config.source_segment_ids_names, len(names), "source_segment_ids_names"
        )
        sources = [common.get_source(name, n, constants) for n in names]
        shapes = {s.channel_shape for s in sources}
        if len(shapes) != 1:
            raise ValueError(
                f"{name}: all sources need the same channel shape, got "
                f"{dict(zip(names, (s.channel_shape for s in sources)))}."
            )
        parts: list[dict[str, jax.Array]] = []
        for source, segment_name in zip(sources, segment_names):
            k, v = self.input_projection.get_kv(common.clear_invalid(source))
            if self.key_network is not None:
                k = self.key_network.layer(k, training=training, constants=constants)
            if self.value_network is not None:
                v = self.value_network.layer(v, training=training, constants=constants)
            k, v = common.clear_invalid(k), common.clear_invalid(v)
            if segment_name:
                segments = common.get_source(name, segment_name, constants, 2).values
            else:
                segments = jnp.zeros(k.mask.shape, jnp.int32)
            parts.append(
                {
                    "keys": k.values,
                    "values": v.values,
                    "segment_ids": segments.astype(jnp.int32),
                    "mask": k.mask & v.mask,
                }
            )
        return jax.tree.map(lambda *a: jnp.concatenate(a, axis=1), *parts)

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
        kv = self._project_sources(training, constants)
        return (kv, q_state, jnp.zeros((batch_size,), jnp.int32))

    def _attention(
        self, q: Sequence, kv: dict[str, Any], training: bool, constants: Constants | None
    ) -> Sequence:
        cfg = self.config
        visible = kv["mask"][:, None, :]
        if cfg.query_segment_ids_name:
            q_seg = common.get_source(
                type(self).__name__, cfg.query_segment_ids_name, constants, 2
            ).values.astype(jnp.int32)
            visible = visible & (q_seg[:, :, None] == kv["segment_ids"][:, None, :])
        context, _ = common.attend(
            self, q.values, kv["keys"], kv["values"], visible[:, None], training=training
        )
        return Sequence(context.astype(self.get_output_dtype(q.dtype)), q.mask)

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
        kv = self._project_sources(training, constants)
        return self._attention(q, kv, training, constants), ()

    @check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        kv, q_state, time_step = state
        q, q_state = self._queries(x, q_state, training, constants, step=True)
        y = self._attention(q, kv, training, constants)
        return y, (kv, q_state, time_step + x.shape[1]), ()
