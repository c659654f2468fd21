"""Normalization layers.

`L2Normalize`, `LayerNormalization` and `RMSNormalization` normalize each
frame on its own. `BatchNormalization` normalizes with statistics learned in
training (so it steps only in inference). `GroupNormalization` normalizes
over groups of channels and over time: the whole sequence (not steppable) or,
with `cumulative=True`, the valid frames so far (steppable).

Axes count in the full `[b, t, *c]` shape (`-1` is the last channel axis);
batch and time cannot be normalized over. Invalid input frames may hold
anything (NaN included): they are zeroed before any reduction, and the
outputs there stay invalid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import ChannelSpec, Sequence

__all__ = [
    "BatchNormalization",
    "GroupNormalization",
    "L2Normalize",
    "LayerNormalization",
    "RMSNormalization",
]

Initializer = Callable[..., jax.Array]
# A partitioning spec (one mesh axis name or None per parameter dimension).
Sharding = tuple[str | None, ...]
AxisLike = int | tuple[int, ...]


def _shard(init: Initializer, sharding: Sharding | None) -> Initializer:
    return init if sharding is None else nn.with_partitioning(init, sharding)


def _hashable_axis(axis: int | Iterable[int]) -> AxisLike:
    return axis if isinstance(axis, int) else tuple(int(a) for a in axis)


def _normalize_axes(axis: AxisLike, ndim: int, layer: str) -> tuple[int, ...]:
    """Non-negative, sorted, unique axes of a `[b, t, *c]` array of rank
    `ndim`, refusing batch and time."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    result = set()
    for a in axes:
        positive = a + ndim if a < 0 else a
        if not 0 <= positive < ndim:
            raise ValueError(f"{layer}: axis {a} is out of range for inputs of rank {ndim}.")
        if positive in (0, 1):
            raise ValueError(
                f"{layer}: cannot normalize over batch or time (axis={axis} for rank {ndim}); "
                "use channel axes (2 and up, or negative)."
            )
        result.add(positive)
    if not result:
        raise ValueError(f"{layer}: axis must name at least one channel axis, got {axis=}.")
    return tuple(sorted(result))


def _reduction_dtype(dtype: Any, at_least_fp32: bool) -> Any:
    return jnp.promote_types(dtype, jnp.float32) if at_least_fp32 else dtype


def _guard_excess_precision(x: jax.Array) -> jax.Array:
    # XLA fusions may keep bf16 intermediates in f32; rounding here makes the
    # backward pass see the values the forward pass saw.
    finfo = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, finfo.nexp, finfo.nmant)


def _zero_gradient_where(cond: jax.Array, y: jax.Array) -> jax.Array:
    """`y`, with no gradient flowing back through the entries where `cond`.

    Guards normalizations of constant (e.g. all-zero) inputs, where the
    forward value is 0 but `rsqrt(epsilon)` would scale the gradient up.
    """
    return jnp.where(cond, jax.lax.stop_gradient(y), y)


def _scale_and_bias(
    module: nn.Module,
    y: jax.Array,
    axes: tuple[int, ...],
    use_scale: bool,
    use_bias: bool,
    scale_init: Initializer,
    bias_init: Initializer,
    sharding: Sharding | None,
    param_dtype: Any,
) -> jax.Array:
    """`y * scale + bias` with parameters shaped like `y`'s `axes`."""
    feature_shape = [1] * y.ndim
    for a in axes:
        feature_shape[a] = y.shape[a]
    reduced_shape = tuple(y.shape[a] for a in axes)
    if use_scale:
        scale = module.param("scale", _shard(scale_init, sharding), reduced_shape, param_dtype)
        y = y * scale.astype(y.dtype).reshape(feature_shape)
    if use_bias:
        bias = module.param("bias", _shard(bias_init, sharding), reduced_shape, param_dtype)
        y = y + bias.astype(y.dtype).reshape(feature_shape)
    return y


class L2Normalize(types.PreservesType, types.StatelessPointwise):
    """`x / sqrt(sum(x^2) + epsilon)` over `axis`, per frame: `[b, t, *c]`
    to the same shape. The reduction runs in at least float32."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Channel axes to normalize over (counted in [b, t, *c]).
        axis: AxisLike = -1
        # Added to the sum of squares.
        epsilon: float = 1e-12
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "axis", _hashable_axis(self.axis))

        def make(self) -> L2Normalize:
            return L2Normalize(self, name=self.name)

    config: Config

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        axes = _normalize_axes(self.config.axis, x.ndim, "L2Normalize")
        values = x.mask_invalid().values
        v = values.astype(_reduction_dtype(values.dtype, True))
        squared_sum = jnp.sum(jnp.square(v), axis=axes, keepdims=True)
        y = v * jax.lax.rsqrt(squared_sum + self.config.epsilon)
        y = _zero_gradient_where(squared_sum == 0, y)
        return Sequence(y.astype(values.dtype), x.mask)


def _post_init_axis_and_sharding(cfg: Any) -> None:
    """Makes `axis` and `sharding` hashable (LayerNormalization, RMSNormalization)."""
    object.__setattr__(cfg, "axis", _hashable_axis(cfg.axis))
    if cfg.sharding is not None:
        object.__setattr__(cfg, "sharding", tuple(cfg.sharding))


def _prepare_per_frame_input(
    cfg: Any, x: Sequence, name: str
) -> tuple[tuple[int, ...], jax.Array, jax.Array]:
    """Shared input handling of LayerNormalization and RMSNormalization: the
    normalized axes, the masked (optionally guarded) values, and those values
    in the reduction dtype."""
    axes = _normalize_axes(cfg.axis, x.ndim, name)
    values = x.mask_invalid().values
    if cfg.guard_against_excess_precision:
        values = _guard_excess_precision(values)
    v = values.astype(_reduction_dtype(values.dtype, cfg.reductions_in_at_least_fp32))
    return axes, values, v


class LayerNormalization(types.PreservesType, types.StatelessPointwise):
    """`(x - mean) / sqrt(var + epsilon) * scale + bias` over `axis`, per
    frame: `[b, t, *c]` to the same shape. Parameters are shaped like the
    normalized axes."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Channel axes to normalize over (counted in [b, t, *c]).
        axis: AxisLike = -1
        # Added to the variance.
        epsilon: float = 1e-6
        # Whether to add a learned `bias`.
        use_bias: bool = True
        # Whether to multiply by a learned `scale`.
        use_scale: bool = True
        # Initializer of `bias`.
        bias_init: Initializer = nn.initializers.zeros
        # Initializer of `scale`.
        scale_init: Initializer = nn.initializers.ones
        # Partitioning of `scale` and `bias`.
        sharding: Sharding | None = None
        # Whether mean and variance are computed in at least float32.
        reductions_in_at_least_fp32: bool = True
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Round the input to its dtype first (guards against XLA keeping
        # extra precision in fusions, which can break the backward pass).
        guard_against_excess_precision: bool = False
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _post_init_axis_and_sharding(self)

        def make(self) -> LayerNormalization:
            return LayerNormalization(self, name=self.name)

    config: Config

    @nn.compact
    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        cfg = self.config
        axes, values, v = _prepare_per_frame_input(cfg, x, "LayerNormalization")
        mean = jnp.mean(v, axis=axes, keepdims=True)
        variance = jnp.mean(jnp.square(v - mean), axis=axes, keepdims=True)
        y = (v - mean) * jax.lax.rsqrt(variance + cfg.epsilon)
        y = _zero_gradient_where(variance == 0, y).astype(values.dtype)
        y = _scale_and_bias(
            self,
            y,
            axes,
            cfg.use_scale,
            cfg.use_bias,
            cfg.scale_init,
            cfg.bias_init,
            cfg.sharding,
            cfg.param_dtype,
        )
        return Sequence(y, x.mask)


class RMSNormalization(types.PreservesType, types.StatelessPointwise):
    """`x / sqrt(mean(x^2) + epsilon) * scale` over `axis`, per frame (the
    T5 simplification of layer normalization: no mean, no bias)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Channel axes to normalize over (counted in [b, t, *c]).
        axis: AxisLike = -1
        # Added to the mean square.
        epsilon: float = 1e-6
        # Whether to multiply by a learned `scale`.
        use_scale: bool = True
        # Initializer of `scale`.
        scale_init: Initializer = nn.initializers.ones
        # Partitioning of `scale`.
        sharding: Sharding | None = None
        # Whether the mean square is computed in at least float32.
        reductions_in_at_least_fp32: bool = True
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Round the input to its dtype first (see LayerNormalization).
        guard_against_excess_precision: bool = False
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            _post_init_axis_and_sharding(self)

        def make(self) -> RMSNormalization:
            return RMSNormalization(self, name=self.name)

    config: Config

    @nn.compact
    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        cfg = self.config
        axes, values, v = _prepare_per_frame_input(cfg, x, "RMSNormalization")
        mean_square = jnp.mean(jnp.square(v), axis=axes, keepdims=True)
        y = v * jax.lax.rsqrt(mean_square + cfg.epsilon)
        y = _zero_gradient_where(mean_square == 0, y).astype(values.dtype)
        y = _scale_and_bias(
            self,
            y,
            axes,
            cfg.use_scale,
            False,
            cfg.scale_init,
            nn.initializers.zeros,
            cfg.sharding,
            cfg.param_dtype,
        )
        return Sequence(y, x.mask)


class BatchNormalization(types.PreservesType, types.StatelessPointwise):
    """Batch normalization of the channel `axis` of `[b, t, *c]`.

    Training (`layer(training=True)`, with `mutable=['batch_stats']`) uses
    the mean and variance of the valid frames of the batch and updates the
    running averages in `batch_stats`; inference uses the running averages
    and is pointwise in time, hence steppable. Stepping with `training=True`
    raises: batch statistics span the whole sequence, so they are not causal.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The channel axis whose features are normalized (counted in [b, t, *c]).
        axis: int = -1
        # Decay of the running averages.
        momentum: float = 0.99
        # Added to the variance.
        epsilon: float = 0.001
        # Whether to add a learned `bias`.
        use_bias: bool = True
        # Whether to multiply by a learned `scale`.
        use_scale: bool = True
        # Initializer of `bias`.
        bias_init: Initializer = nn.initializers.zeros
        # Initializer of `scale`.
        scale_init: Initializer = nn.initializers.ones
        # Partitioning of `scale` and `bias`.
        sharding: Sharding | None = None
        # Variance as E[x^2] - E[x]^2 (faster) rather than E[(x - E[x])^2].
        use_fast_variance: bool = True
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Round the input to its dtype first (see LayerNormalization).
        guard_against_excess_precision: bool = False
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            if self.sharding is not None:
                object.__setattr__(self, "sharding", tuple(self.sharding))

        def make(self) -> BatchNormalization:
            return BatchNormalization(self, name=self.name)

    config: Config

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        if training:
            raise ValueError(
                "BatchNormalization cannot step with training=True: its training statistics "
                "come from the whole batch of sequences, which a stream does not have yet. "
                "Train with layer(), or step with training=False."
            )
        return self.layer(x, training=training, constants=constants), state

    @nn.compact
    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        cfg = self.config
        (axis,) = _normalize_axes(cfg.axis, x.ndim, "BatchNormalization")
        x = x.mask_invalid()
        values = x.values
        if cfg.guard_against_excess_precision:
            values = _guard_excess_precision(values)
        bn = nn.BatchNorm(
            use_running_average=None,
            axis=axis,
            momentum=cfg.momentum,
            epsilon=cfg.epsilon,
            dtype=values.dtype,
            param_dtype=cfg.param_dtype,
            use_bias=cfg.use_bias,
            use_scale=cfg.use_scale,
            bias_init=_shard(cfg.bias_init, cfg.sharding),
            scale_init=_shard(cfg.scale_init, cfg.sharding),
            use_fast_variance=cfg.use_fast_variance,
            # The reference names the inner module after the layer.
            name=cfg.name,
        )
        # The mask makes training statistics come from valid frames only.
        y = bn(values, use_running_average=not training, mask=x.expanded_mask())
        return Sequence(y, x.mask)


class GroupNormalization(types.PreservesType, types.StatelessPointwise):
    """Group normalization (https://arxiv.org/abs/1803.08494) of `[b, t, *c]`.

    The channel `axis` is split into `num_groups` groups; each group is
    normalized with the mean and variance of its channels over the valid
    frames of its row, then scaled and shifted per channel.

    - `cumulative=False`: statistics over the whole sequence. Not steppable;
      receptive field `(-inf, inf)`.
    - `cumulative=True`: frame t uses the valid frames up to t. Steppable;
      the state is the running `(sum, count, sum of squared deviations)`
      per row and group, each `[b, 1, ..., num_groups, 1, ...]`. As in the
      reference, the squared deviation of frame t is taken from the running
      mean at t, so the cumulative variance is a streaming estimate.

    Statistics, scale and shift run in at least float32.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Number of channel groups; must divide the size of `axis`.
        num_groups: int
        # The channel axis that is split into groups (counted in [b, t, *c]).
        axis: int = -1
        # Added to the variance.
        epsilon: float = 1e-6
        # Statistics over the frames so far (steppable) instead of all frames.
        cumulative: bool = False
        # Whether to add a learned per-channel `bias`.
        use_bias: bool = True
        # Whether to multiply by a learned per-channel `scale`.
        use_scale: bool = True
        # Initializer of `bias`.
        bias_init: Initializer = nn.initializers.zeros
        # Initializer of `scale`.
        scale_init: Initializer = nn.initializers.ones
        # Partitioning of `scale` and `bias`.
        sharding: Sharding | None = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # Round the input to its dtype first (see LayerNormalization).
        guard_against_excess_precision: bool = False
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            if self.num_groups <= 0:
                raise ValueError(
                    f"GroupNormalization needs num_groups > 0, got {self.num_groups=}."
                )
            if self.sharding is not None:
                object.__setattr__(self, "sharding", tuple(self.sharding))

        def make(self) -> GroupNormalization:
            return GroupNormalization(self, name=self.name)

    config: Config

    @property
    def supports_step(self) -> bool:
        return self.config.cumulative

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return {0: (-math.inf, 0 if self.config.cumulative else math.inf)}

    @nn.nowrap
    def _axis_and_grouped_shape(self, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
        """The normalized axis of `[b, t, *c]` and the shape with that axis
        split into `[num_groups, group_size]`."""
        (axis,) = _normalize_axes(self.config.axis, len(shape), "GroupNormalization")
        groups = self.config.num_groups
        if shape[axis] % groups != 0:
            raise ValueError(
                f"GroupNormalization: axis {axis} of input shape {shape} has {shape[axis]} "
                f"channels, which num_groups={groups} does not divide."
            )
        return axis, (*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])

    @nn.nowrap
    def _raise_not_steppable(self) -> None:
        raise ValueError(
            "GroupNormalization with cumulative=False normalizes with statistics of the whole "
            "sequence, so it cannot step. Use GroupNormalization.Config(..., cumulative=True) "
            "for streaming, or layer()."
        )

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`(sum, count, sum_sq_dev)`, zeros `[b, 1, ..., num_groups, 1, ...]`."""
        if not self.config.cumulative:
            self._raise_not_steppable()
        axis, grouped = self._axis_and_grouped_shape((batch_size, 1, *input_spec.shape))
        shape = tuple(n if i in (0, 1, axis) else 1 for i, n in enumerate(grouped))
        dtype = jnp.promote_types(input_spec.dtype, jnp.float32)
        return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @nn.compact
    def _normalize(self, x: Sequence, state: Any) -> tuple[Sequence, Any]:
        """Normalizes `x`; with `cumulative`, continues from `state`."""
        cfg = self.config
        axis, grouped_shape = self._axis_and_grouped_shape(x.shape)
        out_dtype = x.dtype
        values = x.mask_invalid().values
        if cfg.guard_against_excess_precision:
            values = _guard_excess_precision(values)
        dtype = jnp.promote_types(values.dtype, jnp.float32)
        v = values.astype(dtype).reshape(grouped_shape)
        ndim = v.ndim
        mask = x.mask.reshape(x.mask.shape + (1,) * (ndim - 2))
        kept = (0, 1, axis) if cfg.cumulative else (0, axis)
        reduce_axes = tuple(a for a in range(ndim) if a not in kept)
        # Valid elements per frame: the mask times the channels reduced over.
        per_frame = math.prod(grouped_shape[a] for a in reduce_axes if a != 1)

        sum_v = jnp.sum(v, axis=reduce_axes, keepdims=True)
        count = jnp.sum(
            mask.astype(dtype), axis=tuple(a for a in reduce_axes if a < 2), keepdims=True
        )
        count = count * per_frame
        if cfg.cumulative:
            acc_sum, acc_count, acc_sq = state
            sum_v = acc_sum + jnp.cumsum(sum_v, axis=1)
            count = acc_count + jnp.cumsum(count, axis=1)
        safe_count = jnp.maximum(count, 1.0)
        mean = sum_v / safe_count
        sq = jnp.where(mask, jnp.square(v - mean), jnp.zeros_like(v))
        sum_sq = jnp.sum(sq, axis=reduce_axes, keepdims=True)
        if cfg.cumulative:
            sum_sq = acc_sq + jnp.cumsum(sum_sq, axis=1)
            state = (sum_v[:, -1:], count[:, -1:], sum_sq[:, -1:])
        variance = sum_sq / safe_count
        y = (v - mean) * jax.lax.rsqrt(variance + cfg.epsilon)
        y = _zero_gradient_where(variance == 0, y).reshape(values.shape)
        y = _scale_and_bias(
            self,
            y,
            (axis,),
            cfg.use_scale,
            cfg.use_bias,
            cfg.scale_init,
            cfg.bias_init,
            cfg.sharding,
            cfg.param_dtype,
        )
        return Sequence(y.astype(out_dtype), x.mask), state

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        state = None
        if self.config.cumulative:
            state = self.get_initial_state(
                x.shape[0], x.channel_spec, training=training, constants=constants
            )
        y, _ = self._normalize(x, state)
        return y

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        if not self.config.cumulative:
            self._raise_not_steppable()
        return self._normalize(x, state)
