"""Blockwise self attention: bidirectional inside a block, horizons in blocks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers.attention import common
from sequence_layers.sequence import MASK_DTYPE, Sequence
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


class BlockwiseDotProductSelfAttention(common.HeadsOutput, Emitting):
    """Self attention over blocks of `block_size` frames.

    `[b, t, d] -> [b, t, num_heads, units_per_head]`. Frame positions p are
    grouped into blocks `p // block_size`; a query sees every key whose block is
    at most `max_past_horizon_blocks` before and `max_future_horizon_blocks`
    after its own (-1 = unbounded, not steppable), restricted to equal segment
    ids when `segment_ids_name` is set. Positions come from
    `constants[position_name]` or from an internal per-row counter.

    `step` takes multiples of `block_size` frames; input latency is
    `max_future_horizon_blocks * block_size`. State (batch-major, fixed size):

        ({keys, values [b, W, kv_heads, u], positions, segment_ids [b, W] int32,
          mask [b, W]}, time_step [b], query/key/value network states,
         query delay buffer {queries, positions, segment_ids, mask} or ())

    with `W = (past_blocks + future_blocks) * block_size`. Emits nothing (as
    the reference).
    """

    @dataclasses.dataclass(frozen=True)
    class Config(SequenceLayerConfig):
        # Frames per block: bidirectional inside, and the step block size.
        block_size: int
        # Number of query heads (a multiple of num_kv_heads).
        num_heads: int
        # Units per head.
        units_per_head: int
        # Past blocks each block sees: -1 all (not steppable), 0 none.
        max_past_horizon_blocks: int
        # Future blocks each block sees: -1 all (not steppable), 0 none.
        max_future_horizon_blocks: int = 0
        # Key/value heads for grouped-query attention (None = num_heads).
        num_kv_heads: int | None = None
        # Whether the QKV projection has a bias.
        use_bias: bool = False
        # How inputs are projected to queries, keys and values.
        input_projection: common.QueryKeyValueProjectionConfig = dataclasses.field(
            default_factory=common.CombinedQueryKeyValueProjection
        )
        # Optional layer applied to queries [b, t, heads, u].
        query_network: SequenceLayerConfig | None = None
        # Optional layer applied to keys [b, t, kv_heads, u].
        key_network: SequenceLayerConfig | None = None
        # Optional layer applied to values [b, t, kv_heads, u].
        value_network: SequenceLayerConfig | None = None
        # If set, logits become cap * tanh(logits / cap).
        attention_logits_soft_cap: float | None = None
        # Learn a [units_per_head] query scale.
        per_dim_scale: bool = False
        # Accepted for compatibility with the reference; sharding is not applied.
        per_dim_scale_sharding: Any = None
        # Query scale (None = 1/sqrt(units_per_head)).
        query_scale: float | None = None
        # Einsum precision.
        precision: Any = None
        # Compute dtype (None = promote input and param dtypes).
        compute_dtype: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # If set, constants key of segment ids [b, t]; only equal ids attend.
        segment_ids_name: str | None = None
        # If set, constants key of positions [b, t] (else counted internally).
        position_name: str | None = None
        # Accepted for compatibility; attention is computed densely here.
        flash_attention_query_block_size: int | None = None
        flash_attention_key_block_size: int | None = None
        # Accepted for compatibility; logits are always accumulated in >= float32.
        experimental_accumulate_logits_in_float32: bool = False
        # Layer name.
        name: str | None = None

        def make(self) -> BlockwiseDotProductSelfAttention:
            return BlockwiseDotProductSelfAttention(self, name=self.name)

    config: Config

    def setup(self) -> None:
        cfg = self.config
        name = type(self).__name__
        common.validate_heads(cfg.num_heads, cfg.units_per_head, name)
        common.validate_soft_cap(cfg.attention_logits_soft_cap, name)
        self._validate()
        self.input_projection = cfg.input_projection.make(
            num_query_heads=cfg.num_heads,
            num_kv_heads=self._num_kv_heads,
            units_per_head=cfg.units_per_head,
            use_bias=cfg.use_bias,
            precision=cfg.precision,
            compute_dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
        )
        nn.share_scope(self, self.input_projection)
        common.setup_scales_and_sinks(self, cfg, self._num_kv_heads)
        networks = []
        for what, net_cfg in (
            ("query", cfg.query_network),
            ("key", cfg.key_network),
            ("value", cfg.value_network),
        ):
            net = None
            if net_cfg is not None:
                net = net_cfg.make()
                if net.output_ratio != 1 or self.block_size % net.block_size:
                    raise ValueError(
                        f"{name}: the {what} network needs output_ratio 1 and a block_size "
                        f"dividing {self.block_size}, got {net.output_ratio=} {net.block_size=}."
                    )
            networks.append(net)
        self.query_network, self.key_network, self.value_network = networks

    @property
    def _num_kv_heads(self) -> int:
        return self.config.num_kv_heads or self.config.num_heads

    # Masking granularity and horizons (in blocks); V2 uses 1-frame blocks.
    @property
    def _frames_per_block(self) -> int:
        return self.config.block_size

    @property
    def _past_blocks(self) -> int:
        return self.config.max_past_horizon_blocks

    @property
    def _future_blocks(self) -> int:
        return self.config.max_future_horizon_blocks

    def _validate(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if cfg.block_size < 1:
            raise ValueError(f"{name}: block_size must be >= 1, got {cfg.block_size=}.")
        if self._past_blocks < -1 or self._future_blocks < -1:
            raise ValueError(
                f"{name}: horizons must be >= -1 (-1 = unbounded), got "
                f"{cfg.max_past_horizon_blocks=} {cfg.max_future_horizon_blocks=}."
            )

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def supports_step(self) -> bool:
        cfg = self.config
        nets = (cfg.query_network, cfg.key_network, cfg.value_network)
        return (
            self._past_blocks >= 0
            and self._future_blocks >= 0
            and all(c is None or detached(c).supports_step for c in nets)
        )

    @property
    def input_latency(self) -> int:
        return max(0, self._future_blocks * self._frames_per_block)

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        n, past, future = self._frames_per_block, self._past_blocks, self._future_blocks
        fields: dict[int, ReceptiveField] = {}
        for i in range(n):
            # Frame i of a block sees whole blocks: back to the start of the
            # oldest past block, forward to the end of the last future block.
            start = -math.inf if past < 0 else -past * n - i
            end = math.inf if future < 0 else future * n + n - 1 - i
            fields[i] = (start, end)
        return fields

    @property
    def _window(self) -> int:
        blocks = max(0, self._past_blocks) + max(0, self._future_blocks)
        return blocks * self._frames_per_block

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        cfg = self.config
        dtype = self.get_output_dtype(input_spec.dtype)
        w, delay = self._window, self.input_latency
        ids = jnp.zeros((batch_size, w), jnp.int32)
        kv = {
            "keys": jnp.zeros((batch_size, w, self._num_kv_heads, cfg.units_per_head), dtype),
            "values": jnp.zeros((batch_size, w, self._num_kv_heads, cfg.units_per_head), dtype),
            "positions": ids,
            "segment_ids": ids,
            "mask": jnp.zeros((batch_size, w), MASK_DTYPE),
        }
        query_delay: Any = ()
        if delay:
            ids = jnp.zeros((batch_size, delay), jnp.int32)
            query_delay = {
                "queries": jnp.zeros((batch_size, delay, cfg.num_heads, cfg.units_per_head), dtype),
                "positions": ids,
                "segment_ids": ids,
                "mask": jnp.zeros((batch_size, delay), MASK_DTYPE),
            }
        q_spec = common.network_spec(cfg.num_heads, cfg.units_per_head, dtype)
        kv_spec = common.network_spec(self._num_kv_heads, cfg.units_per_head, dtype)

        def net_state(net: Any, spec: ChannelSpec) -> Any:
            if net is None:
                return ()
            return net.get_initial_state(batch_size, spec, training=training, constants=constants)

        return (
            kv,
            jnp.zeros((batch_size,), jnp.int32),
            net_state(self.query_network, q_spec),
            net_state(self.key_network, kv_spec),
            net_state(self.value_network, kv_spec),
            query_delay,
        )

    def _positions_and_segments(
        self, x: Sequence, time_step: jax.Array, constants: Constants | None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        name = type(self).__name__
        b, t = x.shape[:2]
        if cfg.position_name:
            positions = common.get_source(name, cfg.position_name, constants, 2).values
        else:
            positions = time_step[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        if cfg.segment_ids_name:
            segments = common.get_source(name, cfg.segment_ids_name, constants, 2).values
        else:
            segments = jnp.zeros((b, t), jnp.int32)
        return positions.astype(jnp.int32), segments.astype(jnp.int32)

    def _visible(
        self,
        q_pos: jax.Array,
        q_seg: jax.Array,
        k_pos: jax.Array,
        k_seg: jax.Array,
        k_mask: jax.Array,
    ) -> jax.Array:
        """`[b, 1, q, k]`: key mask, block-distance band and segment equality."""
        n = self._frames_per_block
        distance = (q_pos // n)[:, :, None] - (k_pos // n)[:, None, :]
        visible = k_mask[:, None, :] & (q_seg[:, :, None] == k_seg[:, None, :])
        if self._past_blocks >= 0:
            visible &= distance <= self._past_blocks
        if self._future_blocks >= 0:
            visible &= distance >= -self._future_blocks
        return visible[:, None]

    def _project(
        self,
        x: Sequence,
        states: tuple[Any, Any, Any] | None,
        training: bool,
        constants: Constants | None,
    ) -> tuple[Sequence, Sequence, Sequence, tuple[Any, Any, Any]]:
        self.get_output_shape(x.channel_shape)
        q, k, v = self.input_projection.get_qkv(common.clear_invalid(x))
        nets = (self.query_network, self.key_network, self.value_network)
        seqs, new_states = [q, k, v], []
        for i, net in enumerate(nets):
            state = states[i] if states is not None else ()
            if net is not None:
                if states is None:
                    seqs[i] = net.layer(seqs[i], training=training, constants=constants)
                else:
                    seqs[i], state = net.step(
                        seqs[i], state, training=training, constants=constants
                    )
            new_states.append(state)
        q, k, v = (common.clear_invalid(s) for s in seqs)
        return q, k, v, tuple(new_states)  # type: ignore[return-value]

    def _keep_window(self, kv: dict, time_step: jax.Array, n: int, w: int) -> dict:
        """The KV cache after a step: the last `w` physical frames of `cache ++ block`."""
        return jax.tree.map(lambda a: a[:, a.shape[1] - w :], kv)

    @check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        q, k, v, _ = self._project(x, None, training, constants)
        zeros = jnp.zeros((x.shape[0],), jnp.int32)
        positions, segments = self._positions_and_segments(x, zeros, constants)
        visible = self._visible(positions, segments, positions, segments, k.mask & v.mask)
        context, _ = common.attend(self, q.values, k.values, v.values, visible, training=training)
        return Sequence(context.astype(self.get_output_dtype(x.dtype)), q.mask), ()

    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        if not self.supports_step:
            # Said here, before the generic check, so the message names the cause.
            raise ValueError(
                f"{type(self).__name__} does not support step(): its past and future "
                f"horizons ({self._past_blocks}, {self._future_blocks}) must both be >= 0 "
                "(an unbounded horizon needs the whole sequence; use layer())."
            )
        return self._checked_step(x, state, training=training, constants=constants)

    @check_step_with_emits
    def _checked_step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        kv, time_step, q_state, k_state, v_state, query_delay = state
        n, w = x.shape[1], self._window
        positions, segments = self._positions_and_segments(x, time_step, constants)
        q, k, v, (q_state, k_state, v_state) = self._project(
            x, (q_state, k_state, v_state), training, constants
        )
        dtype = kv["keys"].dtype
        new_kv = {
            "keys": k.values.astype(dtype),
            "values": v.values.astype(dtype),
            "positions": positions,
            "segment_ids": segments,
            "mask": k.mask & v.mask,
        }
        kv = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), kv, new_kv)
        queries = {
            "queries": q.values.astype(dtype),
            "positions": positions,
            "segment_ids": segments,
            "mask": q.mask,
        }
        if isinstance(query_delay, dict):
            # Queries wait until every key their future blocks hold has arrived.
            queue = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=1), query_delay, queries)
            queries = jax.tree.map(lambda a: a[:, :n], queue)
            query_delay = jax.tree.map(lambda a: a[:, n:], queue)
        visible = self._visible(
            queries["positions"],
            queries["segment_ids"],
            kv["positions"],
            kv["segment_ids"],
            kv["mask"],
        )
        context, _ = common.attend(
            self, queries["queries"], kv["keys"], kv["values"], visible, training=training
        )
        kv = self._keep_window(kv, time_step, n, w)
        new_state = (kv, time_step + n, q_state, k_state, v_state, query_delay)
        y = Sequence(context.astype(self.get_output_dtype(x.dtype)), queries["mask"])
        return y, new_state, ()
