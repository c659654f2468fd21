"""Convolutions over time: Conv1D, DepthwiseConv1D, and the machinery they
share with Conv2D/Conv3D (`convolution_nd.py`) and pooling.

The time axis (axis 1) follows the padding modes of `types.PaddingMode`
(rules in `utils`); the other spatial axes of Conv2D/Conv3D are padded
independently in both `layer` and `step`. Streaming keeps the last
`conv_buffer_width` input frames as state:

    conv = Conv1D.Config(filters=8, kernel_size=5, padding="causal").make()
    params = conv.init(jax.random.PRNGKey(0), x)
    y = conv.apply(params, x)                      # whole sequence
    state = conv.get_initial_state(2, x.channel_spec, training=False)
    y_block, state = conv.apply(params, x[:, :4], state, training=False,
                                method=conv.step)  # block by block, same result

Conv2D/Conv3D live in `convolution_nd.py`, transposed convolutions in
`convolution_transpose.py`; pooling shares the time-window rules defined here
(`TimeWindowedLayer`).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from fractions import Fraction
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import types, utils
from sequence_layers.sequence import MASK_DTYPE, ChannelSpec, Sequence
from sequence_layers.weight_normalization import WeightNormalization, apply_kernel_constraints

__all__ = [
    "BaseConv",
    "Conv1D",
    "DepthwiseConv1D",
    "TimeWindowedLayer",
    "compute_time_window_mask",
    "get_promoted_dtype",
]

# Spatial (non-time) padding: a padding mode string or explicit (left, right).
SpatialPadding = str | tuple[int, int]

_AND_MODES = ("valid", "causal_valid", "reverse_causal_valid")
_DEFAULT_KERNEL_INIT = nn.linear.default_kernel_init


# Helpers shared by convolutions and pooling --------------------------------


def get_promoted_dtype(input_dtype: Any, param_dtype: Any, compute_dtype: Any = None) -> Any:
    """Output dtype of a layer with parameters: `compute_dtype` if set, else
    the promotion of input and parameter dtypes."""
    if compute_dtype is not None:
        return jnp.dtype(compute_dtype)
    return jnp.result_type(input_dtype, param_dtype)


def normalize_tuple(value: int | tuple[int, ...] | list[int], n: int, name: str) -> tuple[int, ...]:
    """`value` as an n-tuple of ints (an int is repeated)."""
    if isinstance(value, int | np.integer):
        return (int(value),) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must be an int or {n} ints, got {value!r}.")
    return value


def validate_spatial_padding(padding: Any) -> SpatialPadding:
    """A padding mode string, or an explicit `(left, right)` of ints >= 0."""
    if isinstance(padding, str | types.PaddingMode):
        return types.validate_padding(padding)
    pad = tuple(padding)
    if len(pad) != 2 or not all(isinstance(p, int | np.integer) and p >= 0 for p in pad):
        raise ValueError(
            f"Spatial padding must be a padding mode or (left, right) ints >= 0, got {padding!r}."
        )
    return (int(pad[0]), int(pad[1]))


def spatial_explicit_padding(
    padding: SpatialPadding, kernel_size: int, stride: int, dilation_rate: int
) -> tuple[int, int]:
    if isinstance(padding, str):
        return utils.convolution_explicit_padding(padding, kernel_size, stride, dilation_rate)
    return padding


def spatial_output_size(
    size: int, padding: SpatialPadding, kernel_size: int, stride: int, dilation_rate: int
) -> int:
    left, right = spatial_explicit_padding(padding, kernel_size, stride, dilation_rate)
    k = utils.effective_kernel_size(kernel_size, dilation_rate)
    return max(0, (size + left + right - k) // stride + 1)


def compute_time_window_mask(
    mask: jax.Array,
    kernel_size: int,
    stride: int,
    dilation_rate: int,
    padding: str,
    is_step: bool,
) -> jax.Array:
    """Output mask of a window over time (conv or pool).

    Like `utils.compute_conv_mask`, but the AND/OR rules reduce over the
    window's `kernel_size` dilated taps (the frames the output actually reads).
    In step mode `mask` is the mask of `buffer ++ block`.
    """
    if padding not in (*_AND_MODES, "semicausal_full"):
        return utils.compute_conv_mask(mask, kernel_size, stride, dilation_rate, padding, is_step)
    if not is_step:
        left, right = utils.convolution_explicit_padding(
            padding, kernel_size, stride, dilation_rate
        )
        b = mask.shape[0]
        mask = jnp.concatenate(
            [
                jnp.full((b, left), padding == "causal_valid", MASK_DTYPE),
                mask,
                jnp.zeros((b, right), MASK_DTYPE),
            ],
            axis=1,
        )
    k_eff = utils.effective_kernel_size(kernel_size, dilation_rate)
    if mask.shape[1] < k_eff:
        return jnp.zeros((mask.shape[0], 0), MASK_DTYPE)
    use_or = padding == "semicausal_full"
    out = jax.lax.reduce_window(
        mask.astype(jnp.int32),
        np.int32(0 if use_or else 1),
        jax.lax.max if use_or else jax.lax.min,
        (1, kernel_size),
        (1, stride),
        "VALID",
        window_dilation=(1, dilation_rate),
    )
    return out.astype(MASK_DTYPE)


class TimeWindowedLayer(types.SequenceLayer, metaclass=abc.ABCMeta):
    """Structural rules of a layer that slides a window over time (axis 1)
    and possibly over further spatial axes: block size, ratio, latencies,
    receptive field and step buffer, all from the time padding mode.

    Subclasses give per-axis `_kernel_size`, `_strides`, `_dilation_rate`
    and `_paddings` (time first).
    """

    # Time padding modes this family can step with.
    _steppable_paddings: ClassVar[tuple[str, ...]] = utils.STEPPABLE_CONV_PADDINGS

    @property
    @abc.abstractmethod
    def _kernel_size(self) -> tuple[int, ...]: ...

    @property
    @abc.abstractmethod
    def _strides(self) -> tuple[int, ...]: ...

    @property
    @abc.abstractmethod
    def _dilation_rate(self) -> tuple[int, ...]: ...

    @property
    @abc.abstractmethod
    def _paddings(self) -> tuple[Any, ...]: ...

    @property
    def _time_padding(self) -> str:
        return self._paddings[0]

    @property
    def _time_window(self) -> tuple[int, int, int]:
        return self._kernel_size[0], self._strides[0], self._dilation_rate[0]

    @property
    def supports_step(self) -> bool:
        return self._time_padding in self._steppable_paddings

    @property
    def block_size(self) -> int:
        return self._strides[0]

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(1, self._strides[0])

    @property
    def input_latency(self) -> int:
        k, _, d = self._time_window
        return utils.conv_input_latency(self._time_padding, k, d)

    @property
    def output_latency(self) -> int:
        k, s, d = self._time_window
        return utils.conv_output_latency(self._time_padding, k, s, d)

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        k, s, d = self._time_window
        return utils.conv_receptive_field_per_step(k, s, d, self._time_padding)

    @property
    def _buffer_width(self) -> int:
        k, s, d = self._time_window
        return utils.conv_buffer_width(self._time_padding, k, s, d)

    def _time_explicit_padding(self) -> tuple[int, int]:
        k, s, d = self._time_window
        return utils.convolution_explicit_padding(self._time_padding, k, s, d)

    def _spatial_explicit_paddings(self) -> tuple[tuple[int, int], ...]:
        return tuple(
            spatial_explicit_padding(p, k, s, d)
            for p, k, s, d in zip(
                self._paddings[1:],
                self._kernel_size[1:],
                self._strides[1:],
                self._dilation_rate[1:],
                strict=True,
            )
        )

    def _window_mask(self, mask: jax.Array, is_step: bool) -> jax.Array:
        k, s, d = self._time_window
        return compute_time_window_mask(mask, k, s, d, self._time_padding, is_step)

    def _check_input_rank(self, channel_shape: tuple[int, ...]) -> None:
        rank = len(self._kernel_size)
        if len(channel_shape) != rank:
            raise ValueError(
                f"{type(self).__name__} needs inputs [b, t, {', '.join(['...'] * rank)}] "
                f"({rank} channel axes: {rank - 1} spatial + features), got channel shape "
                f"{tuple(channel_shape)}."
            )

    def _check_steppable(self) -> None:
        if not self.supports_step:
            raise ValueError(
                f"{type(self).__name__} with time padding {self._time_padding!r} is not "
                f"steppable; use one of {self._steppable_paddings} to stream it, or call "
                "layer() instead."
            )

    def _initial_buffer(
        self, batch_size: int, input_spec: ChannelSpec, pad_value: Any = 0
    ) -> Sequence:
        """`[b, buffer_width, *c]` of `pad_value`, valid only where `layer`
        treats its front padding as valid frames (`causal_valid`)."""
        self._check_steppable()
        self._check_input_rank(tuple(input_spec.shape))
        width = self._buffer_width
        values = jnp.full((batch_size, width, *input_spec.shape), pad_value, input_spec.dtype)
        valid = utils.conv_initial_buffer_valid(self._time_padding)
        return Sequence(values, jnp.full((batch_size, width), valid, MASK_DTYPE))


# Convolutions -------------------------------------------------------------


class BaseConv(TimeWindowedLayer):
    """A convolution over time (+ spatial axes) with learned kernel and bias.

    Subclasses implement `_conv(values, paddings, training)` as the single
    `@nn.compact` method, so `layer` and `step` share parameters. Concrete
    subclasses declare `config: Config`.
    """

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return get_promoted_dtype(input_dtype, self.config.param_dtype, self.config.compute_dtype)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> Sequence | jax.Array:
        """The last `buffer_width` input frames: a `Sequence` where the output
        mask reads the buffer's mask (`*_valid` and reverse-causal modes),
        else just their values `[b, buffer_width, *c]`."""
        buffer = self._initial_buffer(batch_size, input_spec)
        return buffer if self._buffer_holds_mask else buffer.values

    @property
    def _buffer_holds_mask(self) -> bool:
        # Causal and semicausal buffers are exactly the left padding, so
        # output j lines up with block frame j * stride and takes its mask;
        # a mask in the state would be dead weight carried through every step.
        return utils.conv_step_reads_buffer_mask(self._time_padding)

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self._check_input_rank(x.channel_shape)
        # Invalid frames may hold anything (NaN): zero them before mixing time.
        x = x.mask_invalid()
        paddings = (self._time_explicit_padding(), *self._spatial_explicit_paddings())
        values = self._conv(x.values, paddings, training)
        return Sequence(values, self._window_mask(x.mask, is_step=False))

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: Sequence | jax.Array,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, Sequence | jax.Array]:
        self._check_input_rank(x.channel_shape)
        x = x.mask_invalid()
        paddings = ((0, 0), *self._spatial_explicit_paddings())
        # The buffer stands in for the time padding `layer` adds.
        if self._buffer_holds_mask:
            window = state.concatenate(x)
            y = Sequence(
                self._conv(window.values, paddings, training),
                self._window_mask(window.mask, is_step=True),
            )
            keep = window.shape[1] - self._buffer_width
            return y, Sequence(window.values[:, keep:], window.mask[:, keep:])
        values = jnp.concatenate([state, x.values], axis=1)
        y = Sequence(self._conv(values, paddings, training), x.mask[:, :: self._strides[0]])
        return y, values[:, values.shape[1] - self._buffer_width :]

    def _conv(
        self, values: jax.Array, paddings: tuple[tuple[int, int], ...], training: bool
    ) -> jax.Array:
        raise NotImplementedError

    def _kernel_and_bias(
        self, kernel_shape: tuple[int, ...], bias_size: int, training: bool
    ) -> tuple[jax.Array, jax.Array | None]:
        """Creates `kernel` (constrained per config) and `bias`; call from the
        compact `_conv`."""
        cfg = self.config
        kernel_init = cfg.kernel_init
        if cfg.kernel_sharding is not None:
            kernel_init = nn.with_partitioning(kernel_init, cfg.kernel_sharding)
        kernel = self.param("kernel", kernel_init, kernel_shape, cfg.param_dtype)
        kernel = apply_kernel_constraints(
            self,
            kernel,
            use_weight_norm=cfg.use_weight_norm,
            kernel_constraint=cfg.kernel_constraint,
            training=training,
        )
        bias = None
        if cfg.use_bias:
            bias_init = cfg.bias_init
            if cfg.bias_sharding is not None:
                bias_init = nn.with_partitioning(bias_init, cfg.bias_sharding)
            bias = self.param("bias", bias_init, (bias_size,), cfg.param_dtype)
        return kernel, bias

    def _run(
        self,
        values: jax.Array,
        kernel: jax.Array,
        bias: jax.Array | None,
        paddings: tuple[tuple[int, int], ...],
        feature_group_count: int,
    ) -> jax.Array:
        cfg = self.config
        values, kernel, bias = nn.dtypes.promote_dtype(
            values, kernel, bias, dtype=cfg.compute_dtype
        )
        rank = len(self._kernel_size)
        spatial = "THW"[:rank] if rank > 1 else "H"
        if rank == 1 and feature_group_count == values.shape[-1] and kernel.shape[0] <= 64:
            y = _depthwise_conv1d(
                values, kernel, paddings[0], self._strides[0], self._dilation_rate[0]
            )
        elif (
            rank == 1
            and feature_group_count == 1
            and _conv1d_output_frames(
                values.shape[1], kernel.shape[0], paddings[0], *self._time_window[1:]
            )
            <= _MATMUL_MAX_FRAMES
        ):
            y = _conv1d_as_matmul(
                values, kernel, paddings[0], *self._time_window[1:], precision=cfg.precision
            )
        else:
            y = jax.lax.conv_general_dilated(
                values,
                kernel,
                window_strides=self._strides,
                padding=paddings,
                rhs_dilation=self._dilation_rate,
                dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
                feature_group_count=feature_group_count,
                precision=cfg.precision,
            )
        if bias is not None:
            y = y + bias
        if cfg.activation is not None:
            y = cfg.activation(y)
        return y


# Conv1D outputs of at most this many frames (a step block) run as one matmul
# over the stacked taps (see `_conv1d_as_matmul`).
_MATMUL_MAX_FRAMES = 4


def _conv1d_output_frames(
    frames: int, kernel_size: int, padding: tuple[int, int], stride: int, dilation: int
) -> int:
    span = frames + padding[0] + padding[1] - dilation * (kernel_size - 1)
    return max(0, (span - 1) // stride + 1)


def _conv1d_as_matmul(
    values: jax.Array,
    kernel: jax.Array,
    padding: tuple[int, int],
    stride: int,
    dilation: int,
    *,
    precision: Any,
) -> jax.Array:
    """A 1D convolution (`[b, t, c]`, kernel `[k, c, f]`) with few output
    frames as one matmul: the taps of each output frame side by side,
    `[b, t_out, k * c] x [k * c, f]`.

    For one output frame (a step of a stride-1 conv) the window is the
    buffer plus the new frame, so the stacking is a free reshape. XLA:CPU
    runs a convolution that small through its convolution kernel at 2-4x the
    cost of the matmul (a [1, 5, 128] window, k=5, 128 filters: 75 vs 35 us;
    batch 32: 255 vs 58 us); from about 8 output frames on the convolution
    is as fast or faster, so longer inputs keep it.
    """
    k, c, f = kernel.shape
    t_out = _conv1d_output_frames(values.shape[1], k, padding, stride, dilation)
    if t_out == 0:
        return jnp.zeros((values.shape[0], 0, f), jnp.result_type(values, kernel))
    values = jnp.pad(values, ((0, 0), padding, (0, 0)))
    taps = [
        jax.lax.slice_in_dim(
            values, i * dilation, i * dilation + (t_out - 1) * stride + 1, stride, 1
        )
        for i in range(k)
    ]
    cols = jnp.stack(taps, axis=2).reshape(values.shape[0], t_out, k * c)
    return jnp.matmul(cols, kernel.reshape(k * c, f), precision=precision)


def _depthwise_conv1d(
    values: jax.Array, kernel: jax.Array, padding: tuple[int, int], stride: int, dilation: int
) -> jax.Array:
    """A depthwise 1D conv (`[b, t, c]`, kernel `[k, 1, c * m]`) as a sum of
    `k` shifted, strided slices times a tap each.

    The same result as `conv_general_dilated` with `feature_group_count=c`,
    but XLA's CPU grouped convolution is 10-60x slower than this fused
    elementwise sum (0.74 vs 0.08 ms for a [32, 18, 144] step with k=15),
    and on GPU the sum is a single memory-bound fusion as well.
    """
    k, _, out = kernel.shape
    multiplier = out // values.shape[-1]
    if multiplier > 1:  # output channel o reads input channel o // multiplier
        values = jnp.repeat(values, multiplier, axis=-1)
    values = jnp.pad(values, ((0, 0), padding, (0, 0)))
    span = values.shape[1] - dilation * (k - 1)
    if span <= 0:
        return jnp.zeros((values.shape[0], 0, out), values.dtype)
    t_out = (span - 1) // stride + 1
    # Accumulate in float32 (as the convolution does) for bfloat16/float16.
    acc = jnp.promote_types(values.dtype, jnp.float32)
    y = jnp.zeros((values.shape[0], t_out, out), acc)
    for tap in range(k):
        start = tap * dilation
        piece = jax.lax.slice_in_dim(values, start, start + (t_out - 1) * stride + 1, stride, 1)
        y = y + piece.astype(acc) * kernel[tap, 0].astype(acc)
    return y.astype(values.dtype)


def _check_groups(in_features: int, groups: int, name: str) -> None:
    if in_features % groups != 0:
        raise ValueError(
            f"{name}: input features ({in_features}) must be divisible by groups ({groups})."
        )


def _validate_common(cfg: Any, name: str) -> None:
    if cfg.use_weight_norm and cfg.kernel_constraint is not None:
        raise ValueError(
            f"{name}: use_weight_norm=True and kernel_constraint={cfg.kernel_constraint} "
            "are both set; choose one."
        )
    if getattr(cfg, "groups", 1) < 1:
        raise ValueError(f"{name}: groups must be >= 1, got {cfg.groups}.")


def _validate_window(
    kernel: tuple[int, ...], strides: tuple[int, ...], dilation: tuple[int, ...], name: str
) -> None:
    for what, vals in (("kernel_size", kernel), ("strides", strides), ("dilation_rate", dilation)):
        if any(v < 1 for v in vals):
            raise ValueError(f"{name}: {what} must be >= 1, got {vals}.")


class _Conv1DWindow(BaseConv):
    """Conv1D / DepthwiseConv1D: one time axis, configured by the int fields
    `kernel_size`, `strides`, `dilation_rate` and `padding`."""

    @property
    def _kernel_size(self) -> tuple[int, ...]:
        return (self.config.kernel_size,)

    @property
    def _strides(self) -> tuple[int, ...]:
        return (self.config.strides,)

    @property
    def _dilation_rate(self) -> tuple[int, ...]:
        return (self.config.dilation_rate,)

    @property
    def _paddings(self) -> tuple[Any, ...]:
        return (self.config.padding,)


class Conv1D(_Conv1DWindow):
    """1D convolution over time: `[b, t, c_in] -> [b, ceil-ish(t / strides), filters]`.

    Parameters: `kernel [kernel_size, c_in / groups, filters]`, `bias [filters]`.
    Steppable for padding causal_valid, reverse_causal_valid, causal,
    reverse_causal and semicausal; block size = strides.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        """Config for Conv1D."""

        # Output channels.
        filters: int
        # Taps along time.
        kernel_size: int
        # Time stride (also the step block size).
        strides: int = 1
        # Spacing between taps.
        dilation_rate: int = 1
        # Time padding mode (types.PaddingMode).
        padding: str = "valid"
        # Feature groups: input and output channels split into this many groups.
        groups: int = 1
        # Whether to add a learned bias.
        use_bias: bool = True
        # Weight-normalize the kernel with a learned per-filter scale.
        use_weight_norm: bool = False
        # Applied to the output (after the bias).
        activation: Callable[[jax.Array], jax.Array] | None = None
        # Dtype to compute in (None: promote input and parameter dtypes).
        compute_dtype: Any = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # jax.lax precision of the convolution.
        precision: Any = None
        # Kernel initializer.
        kernel_init: nn.initializers.Initializer = _DEFAULT_KERNEL_INIT
        # A WeightNormalization config applied to the kernel.
        kernel_constraint: WeightNormalization.Config | None = None
        # Optional partitioning names for the kernel.
        kernel_sharding: Any = None
        # Bias initializer.
        bias_init: nn.initializers.Initializer = nn.initializers.zeros
        # Optional partitioning names for the bias.
        bias_sharding: Any = None
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "padding", types.validate_padding(self.padding))
            _validate_window((self.kernel_size,), (self.strides,), (self.dilation_rate,), "Conv1D")
            _validate_common(self, "Conv1D")

        def make(self) -> Conv1D:
            return Conv1D(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        self._check_input_rank(tuple(input_shape))
        return (self.config.filters,)

    @nn.compact
    def _conv(
        self, values: jax.Array, paddings: tuple[tuple[int, int], ...], training: bool
    ) -> jax.Array:
        cfg = self.config
        c_in = values.shape[-1]
        _check_groups(c_in, cfg.groups, "Conv1D")
        kernel, bias = self._kernel_and_bias(
            (cfg.kernel_size, c_in // cfg.groups, cfg.filters), cfg.filters, training
        )
        return self._run(values, kernel, bias, paddings, cfg.groups)


class DepthwiseConv1D(_Conv1DWindow):
    """Depthwise 1D convolution: each input channel gets `depth_multiplier`
    filters of its own. `[b, t, c] -> [b, t', c * depth_multiplier]`.

    Parameters: `kernel [kernel_size, 1, c * depth_multiplier]`, `bias`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        """Config for DepthwiseConv1D."""

        # Taps along time.
        kernel_size: int
        # Time stride (also the step block size).
        strides: int = 1
        # Output channels per input channel.
        depth_multiplier: int = 1
        # Spacing between taps.
        dilation_rate: int = 1
        # Time padding mode (types.PaddingMode).
        padding: str = "valid"
        # Whether to add a learned bias.
        use_bias: bool = True
        # Weight-normalize the kernel with a learned per-filter scale.
        use_weight_norm: bool = False
        # Applied to the output (after the bias).
        activation: Callable[[jax.Array], jax.Array] | None = None
        # Dtype to compute in (None: promote input and parameter dtypes).
        compute_dtype: Any = None
        # Dtype of the parameters.
        param_dtype: Any = jnp.float32
        # jax.lax precision of the convolution.
        precision: Any = None
        # Kernel initializer.
        kernel_init: nn.initializers.Initializer = _DEFAULT_KERNEL_INIT
        # A WeightNormalization config applied to the kernel.
        kernel_constraint: WeightNormalization.Config | None = None
        # Optional partitioning names for the kernel.
        kernel_sharding: Any = None
        # Bias initializer.
        bias_init: nn.initializers.Initializer = nn.initializers.zeros
        # Optional partitioning names for the bias.
        bias_sharding: Any = None
        # Module name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "padding", types.validate_padding(self.padding))
            _validate_window(
                (self.kernel_size,), (self.strides,), (self.dilation_rate,), "DepthwiseConv1D"
            )
            if self.depth_multiplier < 1:
                raise ValueError(
                    f"DepthwiseConv1D: depth_multiplier must be >= 1, got {self.depth_multiplier}."
                )
            _validate_common(self, "DepthwiseConv1D")

        def make(self) -> DepthwiseConv1D:
            return DepthwiseConv1D(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        self._check_input_rank(tuple(input_shape))
        return (input_shape[0] * self.config.depth_multiplier,)

    @nn.compact
    def _conv(
        self, values: jax.Array, paddings: tuple[tuple[int, int], ...], training: bool
    ) -> jax.Array:
        cfg = self.config
        c_in = values.shape[-1]
        c_out = c_in * cfg.depth_multiplier
        kernel, bias = self._kernel_and_bias((cfg.kernel_size, 1, c_out), c_out, training)
        return self._run(values, kernel, bias, paddings, c_in)
