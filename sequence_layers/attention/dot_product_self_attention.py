"""Dot-product self attention with a sliding-window KV cache."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def extract_block_context(
    x: jax.Array, block_size: int, past: int, future: int, pad_value: Any = 0
) -> jax.Array:
    """`[b, t, ...] -> [b, ceil(t / block), past + block + future, ...]`: for block u,
    frames `u * block - past ... (u + 1) * block + future - 1` (padded outside)."""
    t = x.shape[1]
    num_blocks = -(-t // block_size)
    right = num_blocks * block_size - t + future
    widths = [(0, 0), (past, right)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, widths, constant_values=jnp.asarray(pad_value, x.dtype))
    context = past + block_size + future
    index = np.arange(num_blocks)[:, None] * block_size + np.arange(context)[None, :]
    return x[:, index]


# DotProductSelfAttention.layer tiles queries in blocks of a multiple of this
# many frames when the band of visible keys is narrow (see `_layer_query_block`).
_LAYER_QUERY_BLOCK = 16
# Banded `layer()` tiles are up to this many queries (`layer_query_tile`).
_MAX_LAYER_QUERY_TILE = 64


def layer_query_tile(block: int, past: int, future: int) -> int:
    """Queries a tile of a banded `layer()` takes: a multiple of `block`,
    about the band's width `past + future` up to `_MAX_LAYER_QUERY_TILE`.

    Each tile is one small matmul per (row, head) in the attention core, and
    XLA:CPU runs many small matmuls slowly: 4 heads of 36 units, 512 rows of
    tiles at past 64 (a batch-32 `layer()` of 256 frames), the core took
    24-26 ms in tiles of 16 queries (16 x 80 logits a tile) and 9.2 ms in
    tiles of 64 (64 x 128, 1.6x the logits); at past 128, 55.7 ms in tiles
    of 16 and 17.6 ms in tiles of 64; at past 16, 5.3 ms in 16 and 6.1 in
    64. Larger tiles went back up (past 64: 10.8 ms at 128, 34 ms dense)."""
    return block * max(1, min(past + future, _MAX_LAYER_QUERY_TILE) // block)


class KVCacheSelfAttention(common.HeadsOutput, Emitting):
    """Shared base of `DotProductSelfAttention` and `LocalDotProductSelfAttention`:
    configuration checks, projections, the KV-cache state and `step`.

    Step state (all batch-major, sizes independent of time), with
    `W = max(0, past) + max(0, future)`:

        (keys [b, W, kv_heads, u], values [b, W, kv_heads, u], kv_mask [b, W],
         time_step [b] int32, query_network_state, key_network_state,
         value_network_state, query_delay_buffer Sequence [b, F, heads, u] or ())

    Default mode is a sliding window: each step attends over `cache ++ block`
    with a band mask, then keeps the last `W` physical frames. With a future
    horizon F > 0 queries wait F frames in the delay buffer, so input and output
    latency are both F and the first F step outputs are invalid.

    Without relative positions or sinks the window is kept as a ring buffer
    instead, head-major with one spare slot (`keys`/`values`
    `[b, kv_heads, R = W + 1, u]`, `kv_mask [b, R]`): frame `t` lives in slot
    `t % R` (see `_attend_ring`). Same visible frames, same outputs; emitted
    step probabilities list the cache in slot order.
    """

    config: Any
    # Cross-attention subclasses project queries and keys from different inputs.
    _allow_combined_qkv = True
    # Self-attention users often pass [b, t, h, d] features; say how to fix it.
    _input_shape_hint = " Flatten or Reshape first."

    # Setup ---------------------------------------------------------------------

    @property
    def _num_kv_heads(self) -> int:
        return getattr(self.config, "num_kv_heads", None) or self.config.num_heads

    def _validate(self) -> None:
        cfg = self.config
        name = type(self).__name__
        common.validate_heads(cfg.num_heads, cfg.units_per_head, name)
        if cfg.num_heads % self._num_kv_heads:
            raise ValueError(
                f"{name}: num_heads must be a multiple of num_kv_heads, got "
                f"{cfg.num_heads=} {self._num_kv_heads=}."
            )
        if cfg.max_past_horizon < -1 or cfg.max_future_horizon < -1:
            raise ValueError(
                f"{name}: horizons must be >= -1 (-1 = unbounded), got "
                f"{cfg.max_past_horizon=} {cfg.max_future_horizon=}."
            )
        if cfg.max_past_horizon == 0 and cfg.max_future_horizon == 0:
            raise ValueError(
                f"{name}: max_past_horizon and max_future_horizon are both 0, so each "
                "frame would attend only to itself. Set a positive horizon."
            )
        common.validate_soft_cap(cfg.attention_logits_soft_cap, name)
        if cfg.num_sink_embeddings > 0 and cfg.use_sink_scalars:
            raise ValueError(f"{name}: use either num_sink_embeddings or use_sink_scalars.")
        if cfg.use_kv_cache_ringbuffer:
            if self._num_kv_heads != cfg.num_heads:
                raise NotImplementedError(f"{name}: use_kv_cache_ringbuffer does not support GQA.")
            if cfg.num_sink_embeddings > 0 or cfg.use_sink_scalars:
                raise NotImplementedError(
                    f"{name}: use_kv_cache_ringbuffer does not support sinks."
                )
            if cfg.relative_position_embedding is not None:
                raise NotImplementedError(
                    f"{name}: use_kv_cache_ringbuffer does not support relative positions."
                )

    def setup(self) -> None:
        self._validate()
        cfg = self.config
        name = type(self).__name__
        self.input_projection = cfg.input_projection.make(
            num_query_heads=cfg.num_heads,
            num_kv_heads=self._num_kv_heads,
            units_per_head=cfg.units_per_head,
            use_bias=cfg.use_bias,
            precision=cfg.precision,
            compute_dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            allow_combined_qkv=self._allow_combined_qkv,
        )
        nn.share_scope(self, self.input_projection)
        self.query_network = common.make_network(cfg.query_network, "query", name)
        self.key_network = common.make_network(cfg.key_network, "key", name)
        self.value_network = common.make_network(cfg.value_network, "value", name)
        common.setup_scales_and_sinks(self, cfg, self._num_kv_heads)
        self.relative_position_embedding = (
            cfg.relative_position_embedding.make()
            if cfg.relative_position_embedding is not None
            else None
        )

    # Structure -----------------------------------------------------------------

    def _networks_support_step(self) -> bool:
        cfg = self.config
        nets = (cfg.query_network, cfg.key_network, cfg.value_network)
        return all(c is None or detached(c).supports_step for c in nets)

    @property
    def supports_step(self) -> bool:
        cfg = self.config
        return (
            cfg.max_past_horizon >= 0
            and cfg.max_future_horizon >= 0
            # Unlike the reference, relative positions also step with a future
            # horizon: step tracks the delayed queries' absolute positions.
            and self._networks_support_step()
        )

    @property
    def input_latency(self) -> int:
        return max(0, self.config.max_future_horizon)

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        cfg = self.config
        start = -math.inf if cfg.max_past_horizon < 0 else -cfg.max_past_horizon
        end = math.inf if cfg.max_future_horizon < 0 else cfg.max_future_horizon
        return {0: (start, end)}

    @property
    def _ring_cache(self) -> bool:
        """Whether `step` keeps the KV cache as a head-major ring buffer.

        Shifting a sliding window copies the whole cache each step, and the
        attention dots then read it through a transposed copy: three passes
        over K and V per step (with the state donated). The ring buffer's
        dots read the cache in place and the write is one fused select.
        Relative positions and sinks keep the sliding window, whose keys are
        in time order.
        """
        cfg = self.config
        return not (
            cfg.use_kv_cache_ringbuffer
            or cfg.relative_position_embedding is not None
            or getattr(cfg, "num_sink_embeddings", 0) > 0
            or getattr(cfg, "use_sink_scalars", False)
        )

    @property
    def _query_delay(self) -> int:
        """Frames queries wait in the delay buffer."""
        return max(0, self.config.max_future_horizon)

    @property
    def _window(self) -> int:
        cfg = self.config
        return max(0, cfg.max_past_horizon) + max(0, cfg.max_future_horizon)

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
        w, future = self._window, self._query_delay
        kv_shape = (batch_size, w, self._num_kv_heads, cfg.units_per_head)
        if self._ring_cache:
            w += 1  # one spare slot: a single frame is written before it is attended
            kv_shape = (batch_size, self._num_kv_heads, w, cfg.units_per_head)
        # Zeros with an all-False mask: nothing before the stream is visible.
        keys = jnp.zeros(kv_shape, dtype)
        values = jnp.zeros(kv_shape, dtype)
        kv_mask = jnp.zeros((batch_size, w), MASK_DTYPE)
        delay: Any = ()
        if future:
            delay = Sequence(
                jnp.zeros((batch_size, future, cfg.num_heads, cfg.units_per_head), dtype),
                jnp.zeros((batch_size, future), MASK_DTYPE),
            )
        q_spec = common.network_spec(cfg.num_heads, cfg.units_per_head, dtype)
        kv_spec = common.network_spec(self._num_kv_heads, cfg.units_per_head, dtype)

        def net_state(net: Any, spec: ChannelSpec) -> Any:
            if net is None:
                return ()
            return net.get_initial_state(batch_size, spec, training=training, constants=constants)

        return (
            keys,
            values,
            kv_mask,
            jnp.zeros((batch_size,), jnp.int32),
            net_state(self.query_network, q_spec),
            net_state(self.key_network, kv_spec),
            net_state(self.value_network, kv_spec),
            delay,
        )

    # Shared compute ---------------------------------------------------------------

    def _attend(
        self,
        queries: jax.Array,
        keys: jax.Array,
        values: jax.Array,
        visible: jax.Array,
        *,
        training: bool,
        positions: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        return common.attend(
            self, queries, keys, values, visible, training=training, positions=positions
        )

    def _project_inputs(
        self, x: Sequence, constants: Constants | None
    ) -> tuple[Sequence, Sequence, Sequence]:
        """Queries, keys and values of a block (before the q/k/v networks)."""
        return self.input_projection.get_qkv(common.clear_invalid(x))

    def _emits(self, probabilities: Sequence) -> Emits:
        return common.SelfAttentionEmits(probabilities)

    def _project_layer(
        self, x: Sequence, training: bool, constants: Constants | None
    ) -> tuple[Sequence, Sequence, Sequence]:
        self.get_output_shape(x.channel_shape)  # Validates the input rank up front.
        q, k, v = self._project_inputs(x, constants)
        if self.query_network is not None:
            q = self.query_network.layer(q, training=training, constants=constants)
        if self.key_network is not None:
            k = self.key_network.layer(k, training=training, constants=constants)
        if self.value_network is not None:
            v = self.value_network.layer(v, training=training, constants=constants)
        return common.clear_invalid(q), common.clear_invalid(k), common.clear_invalid(v)

    def _attend_in_blocks(
        self, q: Sequence, k: Sequence, v: Sequence, block: int, training: bool
    ) -> tuple[jax.Array, jax.Array]:
        """Banded attention with queries tiled in blocks of `block` frames, each
        attending to its `past + block + future` key window: context
        `[b, t, heads, u]` and probabilities `[b, t, heads, past + block + future]`
        over each query's window. Needs both horizons bounded."""
        cfg = self.config
        past, future = cfg.max_past_horizon, cfg.max_future_horizon
        b, t = q.shape[:2]
        num_blocks = -(-t // block)
        context = past + block + future
        kv_mask = k.mask & v.mask
        # Blocks fold into the batch so the dense attention core does the work.
        q_blocks = jnp.pad(q.values, [(0, 0), (0, num_blocks * block - t), (0, 0), (0, 0)])
        q_blocks = q_blocks.reshape(b * num_blocks, block, *q.values.shape[2:])
        k_blocks = extract_block_context(k.values, block, past, future)
        v_blocks = extract_block_context(v.values, block, past, future)
        m_blocks = extract_block_context(kv_mask, block, past, future, pad_value=False)
        k_blocks = k_blocks.reshape(b * num_blocks, context, *k.values.shape[2:])
        v_blocks = v_blocks.reshape(b * num_blocks, context, *v.values.shape[2:])
        m_blocks = m_blocks.reshape(b * num_blocks, context)
        # Query w of a block sits at window index w + past; it sees window
        # indices c with 0 <= c - w <= past + future.
        band = common.band_mask(block, context, 0, past + future)
        visible = m_blocks[:, None, None, :] & band[None, None]
        # Absolute positions of each block's queries and key window.
        starts = np.arange(num_blocks)[:, None] * block
        q_pos = jnp.tile(jnp.asarray(starts + np.arange(block)[None, :]), (b, 1))
        k_pos = jnp.tile(jnp.asarray(starts - past + np.arange(context)[None, :]), (b, 1))
        context_vectors, probs = self._attend(
            q_blocks, k_blocks, v_blocks, visible, training=training, positions=(q_pos, k_pos)
        )
        context_vectors = context_vectors.reshape(b, num_blocks * block, *context_vectors.shape[2:])
        probs = probs.reshape(b, num_blocks * block, *probs.shape[2:])
        return context_vectors[:, :t], probs[:, :t]

    # Step -------------------------------------------------------------------------------

    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        cfg = self.config
        if not self.supports_step:
            # Said here, before the generic check, so the message names the cause.
            raise ValueError(
                f"{type(self).__name__} does not support step(): max_past_horizon="
                f"{cfg.max_past_horizon} and max_future_horizon={cfg.max_future_horizon} "
                "must both be >= 0 (an unbounded horizon needs the whole sequence; use "
                "layer()), and any query/key/value network must support step."
            )
        return self._checked_step(x, state, training=training, constants=constants)

    @check_step_with_emits
    def _checked_step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        cfg = self.config
        keys_cache, values_cache, kv_mask, time_step, q_state, k_state, v_state, delay = state
        self.get_output_shape(x.channel_shape)  # Validates the input rank up front.
        n, w = x.shape[1], self._window
        q, k, v = self._project_inputs(x, constants)
        if self.query_network is not None:
            q, q_state = self.query_network.step(q, q_state, training=training, constants=constants)
        if self.key_network is not None:
            k, k_state = self.key_network.step(k, k_state, training=training, constants=constants)
        if self.value_network is not None:
            v, v_state = self.value_network.step(v, v_state, training=training, constants=constants)
        q, k, v = common.clear_invalid(q), common.clear_invalid(k), common.clear_invalid(v)
        new_kv_mask = k.mask & v.mask
        dtype = keys_cache.dtype
        new_keys, new_values = k.values.astype(dtype), v.values.astype(dtype)

        if isinstance(delay, Sequence):
            # Queries wait F frames so every key they may see has arrived.
            future = self._query_delay
            queue = Sequence(
                jnp.concatenate([delay.values, q.values.astype(delay.dtype)], axis=1),
                jnp.concatenate([delay.mask, q.mask], axis=1),
            )
            q = Sequence(queue.values[:, :n], queue.mask[:, :n])
            delay = Sequence(queue.values[:, -future:], queue.mask[:, -future:])

        if self._ring_cache:
            context, probs, keys_cache, values_cache, kv_mask = _attend_ring(
                self,
                q.values,
                (new_keys, new_values, new_kv_mask),
                (keys_cache, values_cache, kv_mask),
                time_step,
                training=training,
            )
        elif cfg.use_kv_cache_ringbuffer:
            if n != 1:
                raise ValueError(
                    f"{type(self).__name__} with use_kv_cache_ringbuffer=True steps exactly one "
                    f"frame at a time, got a block of {n} frames. Step frame by frame or set "
                    "use_kv_cache_ringbuffer=False."
                )
            all_keys = jnp.concatenate([keys_cache, new_keys], axis=1)
            all_values = jnp.concatenate([values_cache, new_values], axis=1)
            visible = jnp.concatenate([kv_mask, new_kv_mask], axis=1)[:, None, None, :]
            context, probs = self._attend(
                q.values, all_keys, all_values, visible, training=training
            )
            # Overwrite the oldest frame in place; order does not matter to a
            # softmax without position information.
            slot = jax.nn.one_hot(time_step % w, w, dtype=jnp.int32).astype(MASK_DTYPE)
            keys_cache = jnp.where(slot[:, :, None, None], new_keys, keys_cache)
            values_cache = jnp.where(slot[:, :, None, None], new_values, values_cache)
            kv_mask = jnp.where(slot, new_kv_mask, kv_mask)
        else:
            all_keys = jnp.concatenate([keys_cache, new_keys], axis=1)
            all_values = jnp.concatenate([values_cache, new_values], axis=1)
            all_mask = jnp.concatenate([kv_mask, new_kv_mask], axis=1)
            # Query i (absolute t0 - F + i) sees cache index j (absolute t0 - W + j)
            # iff 0 <= j - i <= P + F.
            visible = all_mask[:, None, None, :] & common.band_mask(n, w + n, 0, w)[None, None]
            # Absolute positions: queries lag the input by the delay buffer.
            q_pos = (time_step - self._query_delay)[:, None] + jnp.arange(n)[None, :]
            k_pos = (time_step - w)[:, None] + jnp.arange(w + n)[None, :]
            context, probs = self._attend(
                q.values,
                all_keys,
                all_values,
                visible,
                training=training,
                positions=(q_pos, k_pos),
            )
            keys_cache = all_keys[:, n:]
            values_cache = all_values[:, n:]
            kv_mask = all_mask[:, n:]

        new_state = (
            keys_cache,
            values_cache,
            kv_mask,
            time_step + n,
            q_state,
            k_state,
            v_state,
            delay,
        )
        y = Sequence(context.astype(self.get_output_dtype(x.dtype)), q.mask)
        return y, new_state, self._emits(Sequence(probs, q.mask))


def _attend_ring(
    module: KVCacheSelfAttention,
    queries: jax.Array,
    block: tuple[jax.Array, jax.Array, jax.Array],
    cache: tuple[jax.Array, jax.Array, jax.Array],
    time_step: jax.Array,
    *,
    training: bool,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """One step of attention over a ring-buffer KV cache.

    A single frame is written into the ring first and the ring alone is
    attended: the spare slot keeps every frame the query may see, the write
    is one select XLA does in place on the donated cache, and the dots read
    the result directly. (With the window shifted instead, each step copied K
    and V three times: the donated input, the concatenation transposed for
    the dots, the shifted window.) A longer block could overwrite frames its
    first queries still see, so it is attended as a second part of the same
    softmax and written afterwards.

    Args:
      queries: `[b, n, heads, u]` (already delayed by F frames).
      block: the block's keys and values `[b, n, kv_heads, u]` and mask `[b, n]`.
      cache: keys and values `[b, kv_heads, R, u]` and mask `[b, R]`; slot `s`
        holds the latest frame `t < time_step` with `t % R == s`.
      time_step: `[b]` absolute time of the block's first frame.

    Returns:
      context `[b, n, heads, u]`, probabilities `[b, n, heads, R (+ n)]`
      (ring slots, then the block when n > 1) and the updated cache.
    """
    cfg = module.config
    keys_cache, values_cache, kv_mask = cache
    new_keys, new_values, new_mask = block
    b, n, heads, units = queries.shape
    kv_heads, ring = keys_cache.shape[1], keys_cache.shape[2]
    group = heads // kv_heads
    options = common.AttentionOptions.from_config(cfg)
    dtype = common.promoted_dtype(
        queries.dtype, keys_cache.dtype, compute_dtype=options.compute_dtype
    )
    new_k = jnp.swapaxes(new_keys, 1, 2)  # [b, kv_heads, n, u]
    new_v = jnp.swapaxes(new_values, 1, 2)
    t0 = time_step[:, None]
    slots = jnp.arange(ring)[None, :]

    def write(keys: jax.Array, values: jax.Array, mask: jax.Array) -> tuple[jax.Array, ...]:
        # Slot s gets the block's last frame j with (time_step + j) % R == s, if any.
        last = n - 1 - jnp.mod(t0 + n - 1 - slots, ring)  # [b, R]
        written, index = last >= 0, jnp.clip(last, 0, n - 1)

        def put(cached: jax.Array, new: jax.Array) -> jax.Array:
            picked = jnp.take_along_axis(new, index[:, None, :, None], axis=2)
            return jnp.where(written[:, None, :, None], picked.astype(cached.dtype), cached)

        new_mask_at = jnp.take_along_axis(new_mask, index, axis=1)
        return put(keys, new_k), put(values, new_v), jnp.where(written, new_mask_at, mask)

    if n == 1:
        keys_cache, values_cache, kv_mask = write(keys_cache, values_cache, kv_mask)
        parts = [(keys_cache, values_cache)]
        # Slot s now holds time_step - ((time_step - s) mod R).
        key_time = t0 - jnp.mod(t0 - slots, ring)
        valid = kv_mask
    else:
        parts = [(keys_cache, values_cache), (new_k, new_v)]
        slot_time = t0 - 1 - jnp.mod(t0 - 1 - slots, ring)
        key_time = jnp.concatenate([slot_time, t0 + jnp.arange(n)[None, :]], axis=1)
        valid = jnp.concatenate([kv_mask, new_mask], axis=1)
    frames = key_time.shape[1]

    queries = common.scale_queries(
        queries.astype(dtype), module._per_dim_scale, options.query_scale
    )
    # (batch, kv head) folded into one leading batch axis, as `common` does.
    qf = queries.reshape(b, n, kv_heads, group, units).transpose(0, 2, 3, 1, 4)
    qf = qf.reshape(b * kv_heads, group * n, units)

    def folded(a: jax.Array) -> jax.Array:
        return a.astype(dtype).reshape(b * kv_heads, a.shape[2], units)

    logits = jnp.concatenate(
        [
            jnp.einsum(
                "xqu,xsu->xqs",
                qf,
                folded(common.scale_keys(k, module._per_dim_key_scale)),
                precision=options.precision,
            )
            for k, _ in parts
        ],
        axis=-1,
    ).reshape(b, heads, n, frames)
    logits = common.soft_cap(logits, options.soft_cap)
    # Query i waits D frames (the query delay, F for self attention): it is
    # at time_step - D + i and sees keys k with D - W <= k - q <= D (the
    # sliding window's band; -P <= k - q <= F when D = F).
    delay = module._query_delay
    query_time = t0 - delay + jnp.arange(n)[None, :]
    offset = key_time[:, None, :] - query_time[:, :, None]  # [b, n, keys]
    in_band = (offset >= delay - module._window) & (offset <= delay)
    visible = (valid[:, None, :] & in_band)[:, None]
    probabilities = common.masked_softmax(logits, visible, dtype)
    broadcast = (2,) if options.broadcast_dropout_across_queries else ()
    probabilities = common.dropout(module, probabilities, options.dropout_rate, broadcast, training)
    pf = probabilities.reshape(b * kv_heads, group * n, frames)
    context = sum(
        jnp.einsum("xqs,xsu->xqu", p, folded(v), precision=options.precision)
        for p, (_, v) in zip(jnp.split(pf, [ring], axis=-1), parts, strict=False)
    )
    context = context.reshape(b, kv_heads, group, n, units).transpose(0, 3, 1, 2, 4)
    context = context.reshape(b, n, heads, units)
    if n > 1:
        keys_cache, values_cache, kv_mask = write(keys_cache, values_cache, kv_mask)
    return context, jnp.transpose(probabilities, (0, 2, 1, 3)), keys_cache, values_cache, kv_mask


def window_to_blocks(probs: jax.Array, tile: int, block: int) -> jax.Array:
    """Probabilities over each query's key window of a `tile`-query tile
    `[b, t, heads, past + tile + future]` -> over its window of a `block`-query
    tile `[b, t, heads, past + block + future]` (`tile` a multiple of `block`):
    query i's `block` window starts `(i % tile) // block * block` keys into
    its `tile` window, and holds every key it sees. Only runs when the emits
    are used; `layer()` drops it."""
    if tile == block:
        return probs
    t, c = probs.shape[1], probs.shape[3] - tile + block
    i = np.arange(t)[:, None]
    index = (i % tile) // block * block + np.arange(c)[None, :]  # [t, c]
    index = np.broadcast_to(index[None, :, None, :], (*probs.shape[:3], c))
    return jnp.take_along_axis(probs, jnp.asarray(index), axis=-1)


def _window_to_full(probs: jax.Array, block: int, past: int) -> jax.Array:
    """Probabilities over each query's key window `[b, t, heads, c]` (query i
    in block u = i // block sees keys from u * block - past) -> over all keys
    `[b, t, heads, t]`, zero outside the window. Only runs when the emits are
    used; `layer()` drops it."""
    t, c = probs.shape[1], probs.shape[3]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    index = j - (i // block * block - past)  # [t, t] window index of key j
    inside = (index >= 0) & (index < c)
    index = np.broadcast_to(np.clip(index, 0, c - 1)[None, :, None, :], (*probs.shape[:3], t))
    full = jnp.take_along_axis(probs, jnp.asarray(index), axis=-1)
    return jnp.where(inside[None, :, None, :], full, jnp.zeros((), probs.dtype))


class DotProductSelfAttention(KVCacheSelfAttention):
    """Multi-head dot-product self attention over a band of past and future frames.

    `[b, t, d] -> [b, t, num_heads, units_per_head]` (no output projection).
    Frame t attends to frames `[t - max_past_horizon, t + max_future_horizon]`
    (-1 = unbounded, not steppable). Emits `SelfAttentionEmits` with
    probabilities `[b, t, heads, t]` from `layer` and, from `step`, over the
    KV cache and the block (`[b, block, heads, W + 1]` for one frame, ring
    slots in slot order, `[b, block, heads, W + 1 + block]` for more; see
    `KVCacheSelfAttention`).

    Example:
        >>> cfg = DotProductSelfAttention.Config(num_heads=2, units_per_head=4,
        ...                                      max_past_horizon=64)
    """

    @dataclasses.dataclass(frozen=True)
    class Config(SequenceLayerConfig):
        # Number of query heads (a multiple of num_kv_heads).
        num_heads: int
        # Units per head.
        units_per_head: int
        # Past frames each frame sees: -1 all (not steppable), 0 none.
        max_past_horizon: int
        # Future frames each frame sees: -1 all (not steppable), 0 none. Latency.
        max_future_horizon: int = 0
        # Key/value heads for grouped-query attention (None = num_heads).
        num_kv_heads: int | None = None
        # Optional relative position embedding config (T5 / Shaw).
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
        # Optional layer applied to keys [b, t, kv_heads, u].
        key_network: SequenceLayerConfig | None = None
        # Optional layer applied to values [b, t, kv_heads, u].
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
        # Zero context for queries with no visible key (always true here: such
        # queries get exact zeros instead of NaN).
        zero_fully_masked: bool = False
        # Compute dtype (None = promote input and param dtypes).
        compute_dtype: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Learned always-visible sink keys/values (arXiv:2309.17453).
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

        def make(self) -> DotProductSelfAttention:
            return DotProductSelfAttention(self, name=self.name)

    config: Config

    def _layer_query_block(self, t: int) -> int:
        """Query block length for a banded `layer` over `t` frames, or 0 for
        the dense `[t, t]` logits.

        With both horizons bounded, tiles of queries (`layer_query_tile`)
        against their `past + block + future` keys compute the same result;
        used where that is under half of the dense logits (d256 block at
        past 64, batch 32, 256 frames: tiles of 64 compute 2x fewer logits).
        """
        cfg = self.config
        past, future = cfg.max_past_horizon, cfg.max_future_horizon
        if past < 0 or future < 0:
            return 0
        block = layer_query_tile(_LAYER_QUERY_BLOCK, past, future)
        if 2 * (past + block + future) > t:
            return 0
        return block

    @check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        cfg = self.config
        q, k, v = self._project_layer(x, training, constants)
        t = x.shape[1]
        block = self._layer_query_block(t)
        if block:
            context, window_probs = self._attend_in_blocks(q, k, v, block, training)
            y = Sequence(context.astype(self.get_output_dtype(x.dtype)), q.mask)
            probs = _window_to_full(window_probs, block, cfg.max_past_horizon)
            return y, self._emits(Sequence(probs, q.mask))
        kv_mask = k.mask & v.mask
        band = common.band_mask(
            t, t, common.horizon(cfg.max_past_horizon), common.horizon(cfg.max_future_horizon)
        )
        visible = kv_mask[:, None, None, :] & band[None, None]
        positions = jnp.arange(t)[None, :]
        context, probs = self._attend(
            q.values,
            k.values,
            v.values,
            visible,
            training=training,
            positions=(positions, positions),
        )
        y = Sequence(context.astype(self.get_output_dtype(x.dtype)), q.mask)
        return y, self._emits(Sequence(probs, q.mask))
