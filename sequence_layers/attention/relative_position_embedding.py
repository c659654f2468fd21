"""Relative position embeddings: T5 buckets, Shaw et al., TransformerXL.

Each maps absolute query/key positions (`[#b, q]`, `[#b, k]`) to attention
logit terms, so a layer uses them the same way in `layer` and `step`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers.attention import common


def _gather_relative(table: jax.Array, index: jax.Array) -> jax.Array:
    """`table [b, h, q, r]` and `index [#b, q, k]` -> `[b, h, q, k]`."""
    b, h, q, _ = table.shape
    index = jnp.broadcast_to(index[:, None], (b, h, q, index.shape[-1]))
    return jnp.take_along_axis(table, index, axis=-1)


class T5RelativePositionEmbedding(common.RelativePositionEmbedding):
    """T5 bucketed relative position biases (arXiv:1910.10683).

    A learned `embedding [num_buckets, num_heads]`; offsets `key - query` map to
    log-spaced buckets, exact below `num_buckets // 2` (halved when
    bidirectional), all offsets beyond `max_distance` sharing the last bucket.
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        # Number of buckets (split between directions when bidirectional).
        num_buckets: int
        # Number of attention heads.
        num_heads: int
        # Whether future keys get their own buckets (else they share bucket 0).
        bidirectional: bool
        # Offsets at or beyond this distance share the last bucket.
        max_distance: int = 128
        # Initializer of the bias table.
        bias_matrix_init: Any = nn.linear.default_embed_init
        # Accepted for compatibility with the reference; sharding is not applied.
        bias_matrix_sharding: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Compute dtype (None = the queries' dtype).
        compute_dtype: Any = None

        def make(self) -> T5RelativePositionEmbedding:
            return T5RelativePositionEmbedding(self)

    config: Config

    def setup(self) -> None:
        cfg = self.config
        self.bias_matrix = self.param(
            "embedding", cfg.bias_matrix_init, (cfg.num_buckets, cfg.num_heads), cfg.param_dtype
        )

    @property
    def supports_position_bias(self) -> bool:
        return True

    def bucket(self, relative_position: jax.Array) -> jax.Array:
        """int32 buckets in `[0, num_buckets)` of `key - query` offsets."""
        cfg = self.config
        num_buckets = cfg.num_buckets
        n = -relative_position
        result = jnp.zeros(n.shape, jnp.int32)
        if cfg.bidirectional:
            num_buckets //= 2
            result = result + (n < 0).astype(jnp.int32) * num_buckets
            n = jnp.abs(n)
        else:
            n = jnp.maximum(n, 0)
        max_exact = num_buckets // 2
        eps = jnp.finfo(jnp.float32).eps
        # (num_buckets - 1 - max_exact), as the reference: the largest bucket is
        # reached exactly at max_distance.
        large = max_exact + (
            jnp.log(n.astype(jnp.float32) / max_exact + eps)
            / math.log(cfg.max_distance / max_exact)
            * (num_buckets - 1 - max_exact)
        ).astype(jnp.int32)
        large = jnp.minimum(large, num_buckets - 1)
        return result + jnp.where(n < max_exact, n, large).astype(jnp.int32)

    def get_position_bias(
        self,
        query_positions: jax.Array,
        key_positions: jax.Array,
        queries: jax.Array,
        keys: jax.Array | None = None,
    ) -> jax.Array:
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        buckets = self.bucket(relative)  # [#b, q, k]
        dtype = self.config.compute_dtype or queries.dtype
        table = self.bias_matrix.astype(dtype)  # [buckets, heads]
        return jnp.transpose(table[buckets], (0, 3, 1, 2))


class ShawRelativePositionEmbedding(common.RelativePositionEmbedding):
    """Query-dependent relative position biases (arXiv:1803.02155).

    A learned `embedding [max_backward + max_forward + 1, heads, units]`; the
    bias of (query i, key j) is `q_i . embedding[clip(j - i)]`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        # Largest distinct backward offset.
        max_backward: int
        # Largest distinct forward offset.
        max_forward: int
        # Number of attention heads.
        num_heads: int
        # Units per head.
        units_per_head: int
        # Initializer of the embedding table.
        embedding_init: Any = nn.linear.default_embed_init
        # Accepted for compatibility with the reference; sharding is not applied.
        embedding_sharding: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Compute dtype.
        compute_dtype: Any = jnp.float32

        def make(self) -> ShawRelativePositionEmbedding:
            return ShawRelativePositionEmbedding(self)

    config: Config

    @property
    def num_buckets(self) -> int:
        return self.config.max_backward + self.config.max_forward + 1

    def setup(self) -> None:
        cfg = self.config
        self.embedding = self.param(
            "embedding",
            cfg.embedding_init,
            (self.num_buckets, cfg.num_heads, cfg.units_per_head),
            cfg.param_dtype,
        )

    @property
    def supports_position_bias(self) -> bool:
        return True

    def get_position_bias(
        self,
        query_positions: jax.Array,
        key_positions: jax.Array,
        queries: jax.Array,
        keys: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        relative = key_positions[:, None, :] - query_positions[:, :, None]
        index = jnp.clip(relative, -cfg.max_backward, cfg.max_forward) + cfg.max_backward
        dtype = cfg.compute_dtype
        table = jnp.einsum("rhd,bqhd->bhqr", self.embedding.astype(dtype), queries.astype(dtype))
        return _gather_relative(table, index.astype(jnp.int32))


def timing_signal(positions: jax.Array, dim: int, dtype: Any) -> jax.Array:
    """Sinusoids `[..., dim]` of `positions` (timescales 1 to 10^4; sin then cos)."""
    half = dim // 2
    log_increment = math.log(1e4) / max(half - 1, 1)
    inv_timescales = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -log_increment)
    scaled = positions.astype(jnp.float32)[..., None] * inv_timescales
    signal = jnp.concatenate([jnp.sin(scaled), jnp.cos(scaled)], axis=-1)
    if dim % 2:
        signal = jnp.pad(signal, [(0, 0)] * (signal.ndim - 1) + [(0, 1)])
    return signal.astype(dtype)


class TransformerXLRelativePositionEmbedding(common.RelativePositionEmbedding):
    """TransformerXL relative attention logits (arXiv:1901.02860).

    Logits of (query i, key j), with scaled queries:
    `(q_i + u) . k_j + (q_i + v) . pos_proj(sinusoid(clip(p_i - p_j)))`, offsets
    clipped to `[-max_forward, max_backward]`. Variables: `pos_proj/kernel
    [position_bias_dim, heads, units]`, `u`, `v [heads, units]` (with use_bias).
    """

    @dataclasses.dataclass(frozen=True)
    class Config:
        # Number of attention heads.
        num_heads: int
        # Units per head.
        units_per_head: int
        # Largest distinct backward offset (query after key).
        max_backward: int
        # Largest distinct forward offset.
        max_forward: int
        # Width of the sinusoidal position signal.
        position_bias_dim: int
        # Learn the global content (u) and position (v) biases.
        use_bias: bool = True
        # Accepted for compatibility with the reference; sharding is not applied.
        u_sharding: Any = None
        v_sharding: Any = None
        pos_proj_sharding: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Accepted for compatibility; must be None.
        einsum_factory: Any = None

        def make(self) -> TransformerXLRelativePositionEmbedding:
            return TransformerXLRelativePositionEmbedding(self)

    config: Config

    def setup(self) -> None:
        cfg = self.config
        self.pos_proj = common.EinsumProjection(
            output_shape=(cfg.num_heads, cfg.units_per_head),
            use_bias=False,
            kernel_init=nn.linear.default_kernel_init,
            bias_init=nn.initializers.zeros_init(),
            param_dtype=cfg.param_dtype,
            compute_dtype=None,
            name="pos_proj",
        )
        if cfg.use_bias:
            shape = (cfg.num_heads, cfg.units_per_head)
            zeros = nn.initializers.zeros_init()
            self.u = self.param("u", zeros, shape, cfg.param_dtype)
            self.v = self.param("v", zeros, shape, cfg.param_dtype)

    @property
    def supports_get_logits(self) -> bool:
        return True

    def get_position_logits(
        self,
        queries: jax.Array,
        keys: jax.Array,
        query_positions: jax.Array,
        key_positions: jax.Array,
        precision: Any,
    ) -> jax.Array:
        cfg = self.config
        q_content, q_position = queries, queries
        if cfg.use_bias:
            q_content = queries + self.u.astype(queries.dtype)
            q_position = queries + self.v.astype(queries.dtype)
        content = jnp.einsum("bqhu,bkhu->bhqk", q_content, keys, precision=precision)
        offsets = jnp.arange(-cfg.max_forward, cfg.max_backward + 1)
        embeddings = self.pos_proj(timing_signal(offsets, cfg.position_bias_dim, queries.dtype))
        table = jnp.einsum("bqhu,fhu->bhqf", q_position, embeddings, precision=precision)
        distance = query_positions[:, :, None] - key_positions[:, None, :]
        index = jnp.clip(distance, -cfg.max_forward, cfg.max_backward) + cfg.max_forward
        return content + _gather_relative(table, index.astype(jnp.int32))
