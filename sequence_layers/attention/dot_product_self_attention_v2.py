"""Self attention v2: position- and segment-aware masking, KV cache with positions."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sequence_layers.attention import common
from sequence_layers.attention.blockwise_dot_product_self_attention import (
    BlockwiseDotProductSelfAttention,
)
from sequence_layers.sequence import MASK_DTYPE
from sequence_layers.types import SequenceLayerConfig


class DotProductSelfAttentionV2(BlockwiseDotProductSelfAttention):
    """Self attention whose band mask comes from per-frame positions.

    `[b, t, d] -> [b, t, num_heads, units_per_head]`. A query at position p sees
    keys at positions `[p - max_past_horizon, p + max_future_horizon]` (-1 =
    unbounded, not steppable), restricted to equal segment ids when
    `segment_ids_name` is set. Positions come from `constants[position_name]`
    when present, else from a per-row counter of physical frames, so packed or
    restarted streams mask correctly. Block size 1; latency = future horizon.

    State is `BlockwiseDotProductSelfAttention`'s with 1-frame blocks: the KV
    cache stores each frame's position and segment id. With
    `use_kv_cache_ringbuffer` each step must be exactly one frame and overwrites
    the oldest cache slot in place. Emits nothing (as the reference).
    """

    @dataclasses.dataclass(frozen=True)
    class Config(SequenceLayerConfig):
        # Number of query heads (a multiple of num_kv_heads).
        num_heads: int
        # Units per head.
        units_per_head: int
        # Past frames each frame sees: -1 all (not steppable), 0 none.
        max_past_horizon: int
        # Future frames each frame sees: -1 all (not steppable), 0 none.
        max_future_horizon: int = 0
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
        # Overwrite the oldest KV-cache slot in place (steps must be 1 frame).
        use_kv_cache_ringbuffer: bool = False
        # If set, constants key of segment ids [b, t]; only equal ids attend.
        segment_ids_name: str | None = None
        # If set, constants key of positions [b, t] (else counted internally).
        position_name: str | None = None
        # Accepted for compatibility; attention is computed densely here.
        flash_attention_query_block_size: int | None = None
        flash_attention_key_block_size: int | None = None
        # Accepted for compatibility (no effect).
        experimental_remat_outer: bool = False
        experimental_remat_inner: bool = False
        # Accepted for compatibility; logits are always accumulated in >= float32.
        experimental_accumulate_logits_in_float32: bool = False
        # Layer name.
        name: str | None = None

        def make(self) -> DotProductSelfAttentionV2:
            return DotProductSelfAttentionV2(self, name=self.name)

    config: Config  # type: ignore[assignment]

    @property
    def block_size(self) -> int:
        return 1

    @property
    def _frames_per_block(self) -> int:
        return 1

    @property
    def _past_blocks(self) -> int:
        return self.config.max_past_horizon

    @property
    def _future_blocks(self) -> int:
        return self.config.max_future_horizon

    def _validate(self) -> None:
        cfg = self.config
        name = type(self).__name__
        if cfg.max_past_horizon < -1 or cfg.max_future_horizon < -1:
            raise ValueError(
                f"{name}: horizons must be >= -1 (-1 = unbounded), got "
                f"{cfg.max_past_horizon=} {cfg.max_future_horizon=}."
            )
        if cfg.max_past_horizon == 0 and cfg.max_future_horizon == 0:
            raise ValueError(
                f"{name}: max_past_horizon and max_future_horizon are both 0, so each frame "
                "would attend only to itself. Set a positive horizon."
            )
        if cfg.use_kv_cache_ringbuffer and self._num_kv_heads != cfg.num_heads:
            raise NotImplementedError(f"{name}: use_kv_cache_ringbuffer does not support GQA.")

    def _keep_window(self, kv: dict, time_step: jax.Array, n: int, w: int) -> dict:
        if not self.config.use_kv_cache_ringbuffer:
            return super()._keep_window(kv, time_step, n, w)
        if n != 1:
            raise ValueError(
                f"{type(self).__name__} with use_kv_cache_ringbuffer=True steps exactly one "
                f"frame at a time, got a block of {n} frames. Step frame by frame or set "
                "use_kv_cache_ringbuffer=False."
            )
        # Positions travel with the cached frames, so slot order is irrelevant.
        slot = jax.nn.one_hot(time_step % w, w, dtype=jnp.int32).astype(MASK_DTYPE)

        def write(a: jax.Array) -> jax.Array:
            cache, new = a[:, :w], a[:, w:]
            s = slot.reshape(slot.shape + (1,) * (a.ndim - 2))
            return jnp.where(s, new, cache)

        return jax.tree.map(write, kv)
