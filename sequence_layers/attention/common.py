"""Shared attention machinery: QKV projections, masks, a NaN-safe softmax.

Every attention layer in this package builds on three rules:

- Invalid frames may hold anything (NaN in tests). Queries, keys and values are
  cleared with `jnp.where` before they are contracted, never multiplied by a
  zero mask, so neither values nor gradients can pick up a NaN.
- Masked logits are replaced (not offset) and masked probabilities are exactly
  zero after the softmax, so a query with no visible key gets a zero context
  vector instead of a NaN or an average of garbage.
- Softmax runs in at least float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from sequence_layers.sequence import MASK_DTYPE, Sequence
from sequence_layers.types import ChannelSpec, Constants, SequenceLayer, SequenceLayerConfig

__all__ = [
    "CombinedQueryKeyValueProjection",
    "CrossAttentionEmits",
    "InputProjectionModule",
    "QueryAndKeyValueProjection",
    "QueryAndSharedKeyValueProjection",
    "QueryKeyValueProjectionConfig",
    "RelativePositionEmbedding",
    "SelfAttentionEmits",
    "SeparateQueryKeyValueProjection",
]

# Low enough that exp() underflows to an exact zero in float32 and bfloat16.
INVALID_LOGIT_VALUE = -1e9

# Shared initializer instances (dataclass defaults must not call functions).
zeros_init = nn.initializers.zeros_init()

# [d] -> [heads, units]: kernel [d, heads, units].
input_projection_default_kernel_init = nn.initializers.lecun_normal(in_axis=-3, out_axis=(-2, -1))
# [d] -> [stacked, heads, units]: kernel [d, stacked, heads, units].
stacked_input_projection_default_kernel_init = nn.initializers.lecun_normal(
    in_axis=-4, out_axis=(-2, -1), batch_axis=(-3,)
)


def promoted_dtype(*dtypes: Any, compute_dtype: Any = None) -> Any:
    """`compute_dtype` if given, else the promotion of `dtypes` (the reference's
    `get_promoted_dtype`)."""
    if compute_dtype is not None:
        return jnp.dtype(compute_dtype)
    return jnp.result_type(*[jnp.dtype(d) for d in dtypes])


def at_least_float32(dtype: Any) -> Any:
    return jnp.promote_types(dtype, jnp.float32)


# Emits ----------------------------------------------------------------------


class SelfAttentionEmits(struct.PyTreeNode):
    """Self-attention probabilities, `Sequence [b, q, heads, keys]` (the key axis
    layout depends on the layer: full time, KV-cache window, or local block)."""

    probabilities: Any


class CrossAttentionEmits(struct.PyTreeNode):
    """Cross-attention probabilities per source name, each
    `Sequence [b, q, heads, source_time]`."""

    probabilities_by_source: Mapping[str, Any]


# Projections ----------------------------------------------------------------


class EinsumProjection(nn.Module):
    """`[..., d] -> [..., *output_shape]` with kernel `[d, *output_shape]`.

    The input dimension is read lazily from the first call, so `layer` and
    `step` create the same variables."""

    output_shape: tuple[int, ...]
    use_bias: bool
    kernel_init: Callable[..., jax.Array]
    bias_init: Callable[..., jax.Array]
    param_dtype: Any
    compute_dtype: Any
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (x.shape[-1], *self.output_shape), self.param_dtype
        )
        dtype = promoted_dtype(x.dtype, self.param_dtype, compute_dtype=self.compute_dtype)
        y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=1, precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, self.output_shape, self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def _project(proj: EinsumProjection, x: Sequence) -> Sequence:
    # Callers pass masked inputs; the projection of a zero frame is the bias,
    # so the result is not guaranteed masked.
    return Sequence(proj(x.values), x.mask)


@dataclasses.dataclass(frozen=True)
class QueryKeyValueProjectionConfig:
    """Base of the four ways to project inputs to queries, keys and values."""

    def make(
        self,
        num_query_heads: int,
        num_kv_heads: int,
        units_per_head: int,
        use_bias: bool,
        precision: Any,
        compute_dtype: Any,
        param_dtype: Any,
        allow_combined_qkv: bool = True,
    ) -> InputProjectionModule:
        raise NotImplementedError(type(self).__name__)


class InputProjectionModule(nn.Module):
    """Projects `[b, t, d]` to queries `[b, t, heads, units]` and keys/values
    `[b, t, kv_heads, units]`. Attention layers share scope with it, so its
    variables sit directly under the layer (e.g. `query_key_value_projection`)."""

    config: QueryKeyValueProjectionConfig
    num_query_heads: int
    num_kv_heads: int
    units_per_head: int
    use_bias: bool
    precision: Any
    compute_dtype: Any
    param_dtype: Any
    allow_combined_qkv: bool = True

    @nn.nowrap
    def get_input_projection_output_dtype(self, input_dtype: Any) -> Any:
        return promoted_dtype(input_dtype, self.param_dtype, compute_dtype=self.compute_dtype)

    def _dense(self, shape: tuple[int, ...], kernel_init: Any, bias_init: Any, name: str) -> Any:
        return EinsumProjection(
            output_shape=shape,
            use_bias=self.use_bias,
            kernel_init=kernel_init,
            bias_init=bias_init,
            param_dtype=self.param_dtype,
            compute_dtype=self.compute_dtype,
            precision=self.precision,
            name=name,
        )

    def get_qkv(self, x: Sequence) -> tuple[Sequence, Sequence, Sequence]:
        raise NotImplementedError

    def get_q(self, x: Sequence) -> Sequence:
        raise NotImplementedError(f"{type(self.config).__name__} has no separate query projection.")

    def get_kv(self, x: Sequence) -> tuple[Sequence, Sequence]:
        raise NotImplementedError(
            f"{type(self.config).__name__} has no separate key/value projection."
        )


class _CombinedModule(InputProjectionModule):
    def setup(self) -> None:
        if not self.allow_combined_qkv:
            raise ValueError(
                "CombinedQueryKeyValueProjection cannot project queries and keys from "
                "different inputs (cross attention). Use QueryAndKeyValueProjection, "
                "SeparateQueryKeyValueProjection or QueryAndSharedKeyValueProjection."
            )
        if self.num_query_heads != self.num_kv_heads:
            raise ValueError(
                f"CombinedQueryKeyValueProjection needs num_heads == num_kv_heads, got "
                f"{self.num_query_heads=} {self.num_kv_heads=}. Use "
                "SeparateQueryKeyValueProjection for grouped KV heads."
            )
        cfg = self.config
        stacked = 2 if cfg.share_kv_projection else 3
        self._qkv = self._dense(
            (stacked, self.num_query_heads, self.units_per_head),
            cfg.qkv_kernel_init,
            cfg.bias_init,
            "query_key_value_projection",
        )

    def get_qkv(self, x: Sequence) -> tuple[Sequence, Sequence, Sequence]:
        y = self._qkv(x.values)
        if y.shape[2] == 2:
            q, k = Sequence(y[:, :, 0], x.mask), Sequence(y[:, :, 1], x.mask)
            return q, k, k
        return tuple(Sequence(y[:, :, i], x.mask) for i in range(3))  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class CombinedQueryKeyValueProjection(QueryKeyValueProjectionConfig):
    """One kernel `query_key_value_projection/kernel [d, 3, heads, units]`
    (`[d, 2, ...]` with `share_kv_projection`). Self-attention only; no GQA."""

    # Initializer of the stacked kernel [d, 3 (or 2), heads, units].
    qkv_kernel_init: Any = stacked_input_projection_default_kernel_init
    # Accepted for compatibility with the reference; sharding is not applied.
    qkv_kernel_sharding: Any = None
    # Initializer of the bias [3 (or 2), heads, units].
    bias_init: Any = zeros_init
    # Accepted for compatibility with the reference; sharding is not applied.
    bias_sharding: Any = None
    # Whether keys and values share one projection.
    share_kv_projection: bool = False

    def make(self, *args: Any, **kwargs: Any) -> InputProjectionModule:
        return _CombinedModule(self, *args, **kwargs)


class _SeparateModule(InputProjectionModule):
    def setup(self) -> None:
        cfg = self.config
        h, kv, u = self.num_query_heads, self.num_kv_heads, self.units_per_head
        self._q = self._dense((h, u), cfg.q_kernel_init, cfg.bias_init, "query_projection")
        self._k = self._dense((kv, u), cfg.k_kernel_init, cfg.bias_init, "key_projection")
        self._v = self._dense((kv, u), cfg.v_kernel_init, cfg.bias_init, "value_projection")

    def get_qkv(self, x: Sequence) -> tuple[Sequence, Sequence, Sequence]:
        return _project(self._q, x), _project(self._k, x), _project(self._v, x)

    def get_q(self, x: Sequence) -> Sequence:
        return _project(self._q, x)

    def get_kv(self, x: Sequence) -> tuple[Sequence, Sequence]:
        return _project(self._k, x), _project(self._v, x)


@dataclasses.dataclass(frozen=True)
class SeparateQueryKeyValueProjection(QueryKeyValueProjectionConfig):
    """Three kernels `query_projection`, `key_projection`, `value_projection`,
    each `[d, heads or kv_heads, units]`. Supports GQA."""

    # Initializers of the query, key and value kernels.
    q_kernel_init: Any = input_projection_default_kernel_init
    k_kernel_init: Any = input_projection_default_kernel_init
    v_kernel_init: Any = input_projection_default_kernel_init
    # Accepted for compatibility with the reference; sharding is not applied.
    q_kernel_sharding: Any = None
    k_kernel_sharding: Any = None
    v_kernel_sharding: Any = None
    # Initializer of the biases.
    bias_init: Any = zeros_init
    # Accepted for compatibility with the reference; sharding is not applied.
    bias_sharding: Any = None

    def make(self, *args: Any, **kwargs: Any) -> InputProjectionModule:
        return _SeparateModule(self, *args, **kwargs)


class _QueryAndKeyValueModule(InputProjectionModule):
    def setup(self) -> None:
        cfg = self.config
        h, kv, u = self.num_query_heads, self.num_kv_heads, self.units_per_head
        self._q = self._dense((h, u), cfg.q_kernel_init, cfg.q_bias_init, "query_projection")
        self._kv = self._dense(
            (2, kv, u), cfg.kv_kernel_init, cfg.kv_bias_init, "key_value_projection"
        )

    def get_qkv(self, x: Sequence) -> tuple[Sequence, Sequence, Sequence]:
        return (self.get_q(x), *self.get_kv(x))

    def get_q(self, x: Sequence) -> Sequence:
        return _project(self._q, x)

    def get_kv(self, x: Sequence) -> tuple[Sequence, Sequence]:
        y = self._kv(x.values)
        return Sequence(y[:, :, 0], x.mask), Sequence(y[:, :, 1], x.mask)


@dataclasses.dataclass(frozen=True)
class QueryAndKeyValueProjection(QueryKeyValueProjectionConfig):
    """`query_projection [d, heads, units]` and a stacked
    `key_value_projection [d, 2, kv_heads, units]`. Supports GQA."""

    # Query kernel / bias initializers (sharding accepted for compatibility, unused).
    q_kernel_init: Any = input_projection_default_kernel_init
    q_kernel_sharding: Any = None
    q_bias_init: Any = zeros_init
    q_bias_sharding: Any = None
    # Stacked key/value kernel / bias initializers (sharding unused).
    kv_kernel_init: Any = stacked_input_projection_default_kernel_init
    kv_kernel_sharding: Any = None
    kv_bias_init: Any = zeros_init
    kv_bias_sharding: Any = None

    def make(self, *args: Any, **kwargs: Any) -> InputProjectionModule:
        return _QueryAndKeyValueModule(self, *args, **kwargs)


class _QueryAndSharedKeyValueModule(InputProjectionModule):
    def setup(self) -> None:
        cfg = self.config
        h, kv, u = self.num_query_heads, self.num_kv_heads, self.units_per_head
        self._q = self._dense((h, u), cfg.q_kernel_init, cfg.q_bias_init, "query_projection")
        self._shared_kv = self._dense(
            (kv, u), cfg.kv_kernel_init, cfg.kv_bias_init, "shared_key_value_projection"
        )

    def get_qkv(self, x: Sequence) -> tuple[Sequence, Sequence, Sequence]:
        return (self.get_q(x), *self.get_kv(x))

    def get_q(self, x: Sequence) -> Sequence:
        return _project(self._q, x)

    def get_kv(self, x: Sequence) -> tuple[Sequence, Sequence]:
        kv = _project(self._shared_kv, x)
        return kv, kv


@dataclasses.dataclass(frozen=True)
class QueryAndSharedKeyValueProjection(QueryKeyValueProjectionConfig):
    """`query_projection [d, heads, units]` and one
    `shared_key_value_projection [d, kv_heads, units]` used as both keys and values."""

    # Query kernel / bias initializers (sharding accepted for compatibility, unused).
    q_kernel_init: Any = input_projection_default_kernel_init
    q_kernel_sharding: Any = None
    q_bias_init: Any = zeros_init
    q_bias_sharding: Any = None
    # Shared key/value kernel / bias initializers (sharding unused).
    kv_kernel_init: Any = input_projection_default_kernel_init
    kv_kernel_sharding: Any = None
    kv_bias_init: Any = zeros_init
    kv_bias_sharding: Any = None

    def make(self, *args: Any, **kwargs: Any) -> InputProjectionModule:
        return _QueryAndSharedKeyValueModule(self, *args, **kwargs)


# Relative position embeddings -------------------------------------------------


class RelativePositionEmbedding(nn.Module):
    """Base of relative position embeddings.

    A subclass either adds a bias to the logits (`supports_position_bias`,
    `get_position_bias`) or computes the logits itself (`supports_get_logits`,
    `get_position_logits`). Both take absolute positions of queries and keys,
    so layers use them identically in `layer` and `step`."""

    class Config(Protocol):
        def make(self) -> RelativePositionEmbedding: ...

    @property
    def supports_position_bias(self) -> bool:
        return False

    @property
    def supports_get_logits(self) -> bool:
        return False

    def get_position_bias(
        self,
        query_positions: jax.Array,
        key_positions: jax.Array,
        queries: jax.Array,
        keys: jax.Array | None,
    ) -> jax.Array:
        """`[#b, q]`, `[#b, k]` positions -> bias `[#b, heads, q, k]`."""
        raise NotImplementedError(f"{type(self).__name__} has no position bias.")

    def get_position_logits(
        self,
        queries: jax.Array,
        keys: jax.Array,
        query_positions: jax.Array,
        key_positions: jax.Array,
        precision: Any,
    ) -> jax.Array:
        """Scaled queries `[b, q, heads, u]`, keys `[b, k, heads, u]` and positions
        `[#b, q]`, `[#b, k]` -> logits `[b, heads, q, k]` (replacing q.k)."""
        raise NotImplementedError(f"{type(self).__name__} does not compute logits.")


class HeadsOutput(SequenceLayer):
    """Output shape and dtype shared by the dot-product attention layers:
    `[b, t, d]` inputs give `[b, t, num_heads, units_per_head]` in the dtype
    the input, `param_dtype` and `compute_dtype` promote to."""

    # Appended to the input-rank error (a layer may suggest a fix). Left
    # unannotated so Flax treats it as a class constant, not a module field.
    _input_shape_hint = ""

    @nn.nowrap
    def get_output_shape(
        self, input_shape: Any, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        if len(input_shape) != 1:
            raise ValueError(
                f"{type(self).__name__} needs inputs [b, t, d], got channel shape "
                f"{tuple(input_shape)}.{self._input_shape_hint}"
            )
        return (self.config.num_heads, self.config.units_per_head)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        cfg = self.config
        return promoted_dtype(input_dtype, cfg.param_dtype, compute_dtype=cfg.compute_dtype)


# Validation and helpers --------------------------------------------------------


def validate_heads(num_heads: int, units_per_head: int, name: str) -> None:
    if num_heads <= 0:
        raise ValueError(f"{name}: num_heads must be > 0, got {num_heads=}.")
    if units_per_head <= 0:
        raise ValueError(f"{name}: units_per_head must be > 0, got {units_per_head=}.")


def validate_soft_cap(cap: float | None, name: str) -> None:
    if cap is not None and cap < 0:
        raise ValueError(f"{name}: attention_logits_soft_cap must be None or >= 0, got {cap=}.")


def get_source(
    layer_name: str, source_name: str, constants: Constants | None, required_rank: int = 3
) -> Sequence:
    """The attention source `constants[source_name]`, validated."""
    if not source_name:
        raise ValueError(f"{layer_name}: source_name must be a non-empty string.")
    if constants is None or source_name not in constants:
        available = sorted(constants) if constants else []
        raise ValueError(
            f"{layer_name} needs constants[{source_name!r}] (a Sequence); constants has "
            f"{available}. Pass constants={{{source_name!r}: source}}."
        )
    source = constants[source_name]
    if not isinstance(source, Sequence):
        raise ValueError(
            f"{layer_name}: constants[{source_name!r}] must be a Sequence, got {type(source)}."
        )
    if source.ndim != required_rank:
        raise ValueError(
            f"{layer_name}: constants[{source_name!r}] must have rank {required_rank}, got "
            f"{source.shape=}."
        )
    return source


def clear_invalid(x: Sequence) -> Sequence:
    """Zeroes invalid frames with `jnp.where` (NaN-safe), keeping `Sequence` type."""
    return Sequence(jnp.where(x.expanded_mask(), x.values, jnp.zeros((), x.dtype)), x.mask)


def make_network(
    config: SequenceLayerConfig | None, what: str, layer_name: str
) -> SequenceLayer | None:
    """Builds an optional query/key/value network (inside `setup`)."""
    if config is None:
        return None
    network = config.make()
    if network.output_ratio != 1 or network.block_size != 1:
        raise ValueError(
            f"{layer_name}: the {what} network must have output_ratio 1 and block_size 1, "
            f"got {network.output_ratio=} {network.block_size=}."
        )
    return network


def network_spec(num_heads: int, units_per_head: int, dtype: Any) -> ChannelSpec:
    return ChannelSpec((num_heads, units_per_head), dtype)


def dropout(
    module: nn.Module,
    probabilities: jax.Array,
    rate: float,
    broadcast_dims: tuple[int, ...],
    training: bool,
) -> jax.Array:
    """Inverted dropout on `[b, heads, q, k]` probabilities (training only)."""
    if not training or rate <= 0.0:
        return probabilities
    if rate >= 1.0:
        return jnp.zeros_like(probabilities)
    shape = list(probabilities.shape)
    for d in broadcast_dims:
        shape[d] = 1
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, shape)
    return jnp.where(keep, probabilities / (1.0 - rate), jnp.zeros((), probabilities.dtype))


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    if not cap:
        return logits
    c = jnp.asarray(cap, logits.dtype)
    return c * jnp.tanh(logits / c)


# softplus(0) ** -1, so a zero-initialized per-dim scale starts at `query_scale`.
_R_SOFTPLUS_0 = 1.442695041


def scale_queries(
    queries: jax.Array, per_dim_scale: jax.Array | None, query_scale: float | None
) -> jax.Array:
    if query_scale is None:
        query_scale = 1.0 / float(np.sqrt(queries.shape[-1]))
    if per_dim_scale is None:
        return queries * jnp.asarray(query_scale, queries.dtype)
    scale = jnp.asarray(_R_SOFTPLUS_0 * query_scale, queries.dtype)
    return queries * (scale * jax.nn.softplus(per_dim_scale.astype(queries.dtype)))


def scale_keys(keys: jax.Array, per_dim_key_scale: jax.Array | None) -> jax.Array:
    if per_dim_key_scale is None:
        return keys
    scale = jnp.asarray(_R_SOFTPLUS_0, keys.dtype)
    return keys * (scale * jax.nn.softplus(per_dim_key_scale.astype(keys.dtype)))


def masked_softmax(logits: jax.Array, visible: jax.Array, out_dtype: Any) -> jax.Array:
    """Softmax over the last axis where `visible`; exact zeros elsewhere, and an
    all-zero row (not NaN) when nothing is visible."""
    x = logits.astype(at_least_float32(logits.dtype))
    x = jnp.where(visible, x, jnp.asarray(INVALID_LOGIT_VALUE, x.dtype))
    p = jax.nn.softmax(x, axis=-1)
    return jnp.where(visible, p, jnp.zeros((), p.dtype)).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """Per-layer knobs of the attention core, gathered from a layer config."""

    soft_cap: float | None = None
    query_scale: float | None = None
    precision: Any = None
    zero_fully_masked: bool = False
    compute_dtype: Any = None
    dropout_rate: float = 0.0
    broadcast_dropout_across_queries: bool = False

    @classmethod
    def from_config(cls, config: Any) -> AttentionOptions:
        return cls(
            soft_cap=getattr(config, "attention_logits_soft_cap", None),
            query_scale=getattr(config, "query_scale", None),
            precision=getattr(config, "precision", None),
            zero_fully_masked=getattr(config, "zero_fully_masked", False),
            compute_dtype=getattr(config, "compute_dtype", None),
            dropout_rate=getattr(config, "attention_probabilities_dropout_rate", 0.0),
            broadcast_dropout_across_queries=getattr(
                config, "broadcast_dropout_across_queries", False
            ),
        )


def dot_product_attention(
    module: nn.Module,
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    visible: jax.Array,
    *,
    options: AttentionOptions,
    training: bool,
    logit_bias: jax.Array | None = None,
    logits_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    per_dim_scale: jax.Array | None = None,
    per_dim_key_scale: jax.Array | None = None,
    sink_logits: jax.Array | None = None,
    sink_values: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Multi-head (and grouped-KV) dot-product attention.

    Args:
      queries: `[b, q, heads, u]`, finite.
      keys, values: `[b, k, kv_heads, u]`, finite; `heads % kv_heads == 0`.
      visible: bool, broadcastable to `[b, heads, q, k]`.
      logit_bias: optional, broadcastable to `[b, heads, q, k]`.
      logits_fn: optional replacement for the q.k contraction (scaled inputs ->
        `[b, heads, q, k]` logits), used by relative position embeddings.
      sink_logits: optional `[b, heads, q, s]` always-visible extra logits.
      sink_values: `[s, kv_heads, u]` values of the sinks.

    Returns:
      context `[b, q, heads, u]` and probabilities `[b, q, heads, s + k]`.
    """
    b, heads = queries.shape[0], queries.shape[2]
    kv_heads = keys.shape[2]
    if heads % kv_heads:
        raise ValueError(f"num_heads={heads} must be a multiple of num_kv_heads={kv_heads}.")
    group = heads // kv_heads
    dtype = promoted_dtype(
        queries.dtype, keys.dtype, values.dtype, compute_dtype=options.compute_dtype
    )
    queries = scale_queries(queries.astype(dtype), per_dim_scale, options.query_scale)
    keys = scale_keys(keys.astype(dtype), per_dim_key_scale)
    if logits_fn is not None:
        if group != 1:
            raise NotImplementedError(
                "Relative position embeddings that compute logits do not support "
                f"grouped KV heads ({heads=} {kv_heads=})."
            )
        logits = logits_fn(queries, keys)
    else:
        logits = _grouped_logits(queries, keys, kv_heads, options.precision)
    if logit_bias is not None:
        logits = logits + logit_bias.astype(logits.dtype)
    logits = soft_cap(logits, options.soft_cap)
    visible = jnp.broadcast_to(visible, logits.shape)
    if sink_logits is not None:
        sink_logits = soft_cap(sink_logits.astype(logits.dtype), options.soft_cap)
        logits = jnp.concatenate([sink_logits, logits], axis=-1)
        visible = jnp.concatenate([jnp.ones(sink_logits.shape, MASK_DTYPE), visible], axis=-1)
        sinks = jnp.broadcast_to(sink_values[None].astype(values.dtype), (b, *sink_values.shape))
        values = jnp.concatenate([sinks, values], axis=1)
    probabilities = masked_softmax(logits, visible, dtype)
    broadcast = (2,) if options.broadcast_dropout_across_queries else ()
    probabilities = dropout(module, probabilities, options.dropout_rate, broadcast, training)
    context = _grouped_context(probabilities, values.astype(dtype), kv_heads, options.precision)
    return context, jnp.transpose(probabilities, (0, 2, 1, 3))


# Both contractions fold (batch, kv head) into one leading batch axis: as one
# einsum with batch axes b, k in place ("bqkgu,bskgu->bkgqs"), XLA:CPU ran them
# 1.5-3x slower ([32, 1, 4, 64] queries on 65 cached keys: 0.97 vs 0.31 ms),
# most of a batched attention step. Head h = kv_head * group + g (as the reference).
def _grouped_logits(
    queries: jax.Array, keys: jax.Array, kv_heads: int, precision: Any
) -> jax.Array:
    """`queries [b, q, heads, u]`, `keys [b, s, kv_heads, u]` -> `[b, heads, q, s]`."""
    b, q_len, heads, units = queries.shape
    group, s = heads // kv_heads, keys.shape[1]
    qf = queries.reshape(b, q_len, kv_heads, group, units).transpose(0, 2, 3, 1, 4)
    qf = qf.reshape(b * kv_heads, group * q_len, units)
    kf = keys.transpose(0, 2, 1, 3).reshape(b * kv_heads, s, units)
    logits = jnp.einsum("xqu,xsu->xqs", qf, kf, precision=precision)
    return logits.reshape(b, heads, q_len, s)


def _grouped_context(
    probabilities: jax.Array, values: jax.Array, kv_heads: int, precision: Any
) -> jax.Array:
    """`probabilities [b, heads, q, s]`, `values [b, s, kv_heads, u]` -> `[b, q, heads, u]`."""
    b, heads, q_len, s = probabilities.shape
    group, units = heads // kv_heads, values.shape[-1]
    pf = probabilities.reshape(b * kv_heads, group * q_len, s)
    vf = values.transpose(0, 2, 1, 3).reshape(b * kv_heads, s, units)
    context = jnp.einsum("xqs,xsu->xqu", pf, vf, precision=precision)
    context = context.reshape(b, kv_heads, group, q_len, units).transpose(0, 3, 1, 2, 4)
    return context.reshape(b, q_len, heads, units)


# Visibility masks -------------------------------------------------------------


def band_mask(
    query_time: int, key_time: int, lower: int | None, upper: int | None, offset: int = 0
) -> jax.Array:
    """`[q, k]` bool: key j visible to query i iff `-lower <= j - (i + offset) <= upper`
    (None = unbounded)."""
    i = np.arange(query_time)[:, None] + offset
    j = np.arange(key_time)[None, :]
    m = np.ones((query_time, key_time), bool)
    if lower is not None:
        m &= j - i >= -lower
    if upper is not None:
        m &= j - i <= upper
    return jnp.asarray(m)


def horizon(h: int) -> int | None:
    """A config horizon (-1 = unbounded) as a band bound (None = unbounded)."""
    return None if h < 0 else h


# Learned scales and sinks, shared by the dot-product layers -----------------------


def setup_scales_and_sinks(module: nn.Module, cfg: Any, num_kv_heads: int) -> None:
    """Creates (inside `setup`) the optional per-dim scales and sink parameters
    named as in the reference: `per_dim_scale`, `per_dim_key_scale`,
    `sink_key_embeddings`, `sink_value_embeddings`, `sink_scalars`."""
    units = (cfg.units_per_head,)
    zeros = nn.initializers.zeros_init()
    module._per_dim_scale = (
        module.param("per_dim_scale", zeros, units, cfg.param_dtype)
        if getattr(cfg, "per_dim_scale", False)
        else None
    )
    module._per_dim_key_scale = (
        module.param("per_dim_key_scale", zeros, units, cfg.param_dtype)
        if getattr(cfg, "per_dim_key_scale", False)
        else None
    )
    num_sinks = getattr(cfg, "num_sink_embeddings", 0)
    use_scalars = getattr(cfg, "use_sink_scalars", False)
    if num_sinks > 0 and use_scalars:
        raise ValueError(
            f"{type(module).__name__}: use either num_sink_embeddings or use_sink_scalars."
        )
    module._sink_key_embeddings = None
    module._sink_scalars = None
    module._sink_value_embeddings = None
    if num_sinks > 0:
        module._sink_key_embeddings = module.param(
            "sink_key_embeddings",
            cfg.sink_embeddings_init,
            (num_sinks, cfg.num_heads, cfg.units_per_head),
            cfg.param_dtype,
        )
        module._sink_value_embeddings = module.param(
            "sink_value_embeddings",
            cfg.sink_embeddings_init,
            (num_sinks, num_kv_heads, cfg.units_per_head),
            cfg.param_dtype,
        )
    elif use_scalars:
        module._sink_scalars = module.param(
            "sink_scalars", cfg.sink_scalars_init, (cfg.num_heads,), cfg.param_dtype
        )


def sinks(module: Any, queries: jax.Array) -> tuple[jax.Array | None, jax.Array | None]:
    """Sink logits `[b, heads, q, s]` and values `[s, kv_heads, u]`, or Nones."""
    b, q, heads, units = queries.shape
    if module._sink_key_embeddings is not None:
        logits = jnp.einsum(
            "bqhu,shu->bhqs",
            queries,
            module._sink_key_embeddings.astype(queries.dtype),
            precision=getattr(module.config, "precision", None),
        )
        return logits, module._sink_value_embeddings
    if module._sink_scalars is not None:
        logits = jnp.broadcast_to(
            module._sink_scalars.astype(queries.dtype)[None, :, None, None], (b, heads, q, 1)
        )
        num_kv_heads = getattr(module.config, "num_kv_heads", None) or heads
        return logits, jnp.zeros((1, num_kv_heads, units), queries.dtype)
    return None, None


def attend(
    module: Any,
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    visible: jax.Array,
    *,
    training: bool,
    logit_bias: jax.Array | None = None,
    positions: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`dot_product_attention` with `module`'s config, scales, sinks and (given
    query/key `positions`) its `relative_position_embedding`."""
    logits_fn = None
    rpe = getattr(module, "relative_position_embedding", None)
    if rpe is not None and positions is not None:
        q_pos, k_pos = positions
        if rpe.supports_position_bias:
            bias = rpe.get_position_bias(q_pos, k_pos, queries, keys)
            logit_bias = bias if logit_bias is None else logit_bias + bias
        elif rpe.supports_get_logits:
            precision = getattr(module.config, "precision", None)

            def logits_fn(q: jax.Array, k: jax.Array) -> jax.Array:
                return rpe.get_position_logits(q, k, q_pos, k_pos, precision)

    sink_logits, sink_values = sinks(module, queries)
    return dot_product_attention(
        module,
        queries,
        keys,
        values,
        visible,
        options=AttentionOptions.from_config(module.config),
        training=training,
        logit_bias=logit_bias,
        logits_fn=logits_fn,
        per_dim_scale=module._per_dim_scale,
        per_dim_key_scale=module._per_dim_key_scale,
        sink_logits=sink_logits,
        sink_values=sink_values,
    )
