"""Transposed convolutions over time: Conv1DTranspose, Conv2DTranspose.

Each input frame produces `strides` output frames (`output_ratio = strides`).
Time padding is one of 'valid', 'same', 'causal' or 'semicausal_full'; only
'causal' streams: a step convolves its block and overlap-adds the tail that
spills into later outputs from a state buffer of `max(k_eff - strides, 0)`
output frames, so step and layer agree exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types, utils
from sequence_layers.convolution import get_promoted_dtype, normalize_tuple
from sequence_layers.sequence import ChannelSpec, Sequence
from sequence_layers.weight_normalization import WeightNormalization, apply_kernel_constraints

__all__ = [
    "Conv1DTranspose",
    "Conv2DTranspose",
    "transpose_conv_explicit_padding",
    "transpose_conv_receptive_field_per_step",
]

_DEFAULT_KERNEL_INIT = nn.linear.default_kernel_init
TRANSPOSE_PADDINGS = ("valid", "same", "causal", "semicausal_full")


def _validate_transpose_padding(padding: Any, what: str) -> str:
    padding = types.validate_padding(padding)
    if padding not in TRANSPOSE_PADDINGS:
        raise ValueError(
            f"Transposed convolutions support {what} in {TRANSPOSE_PADDINGS}, got {padding!r}."
        )
    return padding


def transpose_conv_explicit_padding(
    kernel_size: int, stride: int, dilation_rate: int, padding: str | tuple[int, int]
) -> tuple[int, int]:
    """(left, right) padding of the stride-dilated input for a transposed conv.

    - valid: every output any input touches: `t * s + max(k_eff - s, 0)` frames.
    - causal: output `o` only reads inputs `<= o // s`; `t * s` frames.
    - same: `t * s` frames, centred.
    - semicausal_full: `(k_eff - s, k_eff - 1)`.
    An explicit `(left, right)` is used as is.
    """
    if not isinstance(padding, str):
        return padding
    k = utils.effective_kernel_size(kernel_size, dilation_rate)
    match padding:
        case "valid":
            return k - 1, stride - 1 + max(k - stride, 0)
        case "causal":
            return k - 1, stride - 1
        case "same":
            total = k + stride - 2
            left = k - 1 if stride > k - 1 else math.ceil(total / 2)
            return left, total - left
        case "semicausal_full":
            return k - stride, k - 1
    raise ValueError(f"Unsupported transposed-conv padding {padding!r}; use {TRANSPOSE_PADDINGS}.")


def _transpose_output_size(
    size: int, kernel_size: int, stride: int, dilation_rate: int, padding: str | tuple[int, int]
) -> int:
    left, right = transpose_conv_explicit_padding(kernel_size, stride, dilation_rate, padding)
    k = utils.effective_kernel_size(kernel_size, dilation_rate)
    if size == 0:
        return 0
    return max(0, (size - 1) * stride + 1 + left + right - k + 1)


def transpose_conv_receptive_field_per_step(
    kernel_size: int, stride: int, dilation_rate: int, padding: str
) -> dict[int, types.ReceptiveField]:
    """Inputs read by output phase `p` (output `q * s + p` reads inputs
    `q + start .. q + end`), derived from the taps that land on real
    (non-hole) positions of the stride-dilated input."""
    left, _ = transpose_conv_explicit_padding(kernel_size, stride, dilation_rate, padding)
    result: dict[int, types.ReceptiveField] = {}
    for phase in range(stride):
        inputs = [
            (phase + tap * dilation_rate - left) // stride
            for tap in range(kernel_size)
            if (phase + tap * dilation_rate - left) % stride == 0
        ]
        result[phase] = (min(inputs), max(inputs)) if inputs else None
    return result


def compute_conv_transpose_mask(
    mask: jax.Array, kernel_size: int, stride: int, dilation_rate: int, padding: str
) -> jax.Array:
    """Output mask: for same/causal (and whenever outputs never overlap) each
    input frame's mask repeated `stride` times; for valid, an output is valid
    iff every input it reads is (AND); for semicausal_full, iff any is (OR)."""
    k = utils.effective_kernel_size(kernel_size, dilation_rate)
    if padding in ("same", "causal") or (padding == "valid" and k <= stride):
        return jnp.repeat(mask, stride, axis=1)
    use_or = padding == "semicausal_full"
    signal = (mask if use_or else jnp.logical_not(mask)).astype(jnp.float32)
    hits = jax.lax.conv_general_dilated(
        signal[:, :, None],
        jnp.ones((kernel_size, 1, 1), jnp.float32),
        window_strides=(1,),
        padding=(transpose_conv_explicit_padding(kernel_size, stride, dilation_rate, padding),),
        lhs_dilation=(stride,),
        rhs_dilation=(dilation_rate,),
        dimension_numbers=("NHC", "HIO", "NHC"),
    )[:, :, 0]
    return hits > 0 if use_or else hits == 0


class _BaseConvTranspose(types.SequenceLayer):
    """Shared logic; subclasses give `_kernel_size`, `_strides`,
    `_dilation_rate` (time first) and `_spatial_paddings`."""

    @property
    def _kernel_size(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def _strides(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def _dilation_rate(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def _time_padding(self) -> str:
        raise NotImplementedError

    @property
    def _spatial_paddings(self) -> tuple[Any, ...]:
        return ()

    @property
    def supports_step(self) -> bool:
        return self._time_padding == "causal"

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(self._strides[0])

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return transpose_conv_receptive_field_per_step(
            self._kernel_size[0], self._strides[0], self._dilation_rate[0], self._time_padding
        )

    @property
    def _buffer_width(self) -> int:
        k = utils.effective_kernel_size(self._kernel_size[0], self._dilation_rate[0])
        return max(0, k - self._strides[0])

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return get_promoted_dtype(input_dtype, self.config.param_dtype, self.config.compute_dtype)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        rank = len(self._kernel_size)
        if len(input_shape) != rank:
            raise ValueError(
                f"{type(self).__name__} needs {rank} channel axes, got channel shape "
                f"{tuple(input_shape)}."
            )
        spatial = tuple(
            _transpose_output_size(size, k, s, d, p)
            for size, k, s, d, p in zip(
                input_shape[:-1],
                self._kernel_size[1:],
                self._strides[1:],
                self._dilation_rate[1:],
                self._spatial_paddings,
                strict=True,
            )
        )
        return (*spatial, self.config.filters)

    def _paddings(self, time_padding: str) -> tuple[tuple[int, int], ...]:
        return tuple(
            transpose_conv_explicit_padding(k, s, d, p)
            for k, s, d, p in zip(
                self._kernel_size,
                self._strides,
                self._dilation_rate,
                (time_padding, *self._spatial_paddings),
                strict=True,
            )
        )

    def _time_mask(self, mask: jax.Array) -> jax.Array:
        return compute_conv_transpose_mask(
            mask, self._kernel_size[0], self._strides[0], self._dilation_rate[0], self._time_padding
        )

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> jax.Array:
        if not self.supports_step:
            raise ValueError(
                f"{type(self).__name__} with time padding {self._time_padding!r} is not "
                "steppable; only 'causal' streams. Use layer() instead."
            )
        spec = self.get_output_spec(input_spec, constants=constants)
        # Not-yet-complete output frames (pre-bias), overlap-added next step.
        return jnp.zeros((batch_size, self._buffer_width, *spec.shape), spec.dtype)

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        x = x.mask_invalid()
        values, bias = self._conv(x.values, self._paddings(self._time_padding), training)
        mask = self._time_mask(x.mask)
        if x.shape[1] == 0:
            # Nothing in, nothing out. XLA still pads an empty dilated input
            # out to frames: causal and same gave a frame of values against
            # an empty mask (no valid Sequence), and valid two frames marked
            # valid (its mask ANDs over inputs, and over none that is true).
            values, mask = values[:, :0], mask[:, :0]
        return Sequence(self._finish(values, bias), mask)

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: jax.Array,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, jax.Array]:
        x = x.mask_invalid()
        # 'valid' keeps every output the block touches; the tail beyond
        # `t * s` frames is completed by later blocks.
        values, bias = self._conv(x.values, self._paddings("valid"), training)
        width = self._buffer_width
        emitted = x.shape[1] * self._strides[0]
        values = values.at[:, :width].add(state.astype(values.dtype))
        y, state = values[:, :emitted], values[:, emitted:]
        return Sequence(self._finish(y, bias), self._time_mask(x.mask)), state

    def _finish(self, values: jax.Array, bias: jax.Array | None) -> jax.Array:
        # Bias and activation come after the overlap-add, so they apply once.
        if bias is not None:
            values = values + bias
        if self.config.activation is not None:
            values = self.config.activation(values)
        return values

    @nn.compact
    def _conv(
        self, values: jax.Array, paddings: tuple[tuple[int, int], ...], training: bool
    ) -> tuple[jax.Array, jax.Array | None]:
        """The pre-bias transposed convolution and the (promoted) bias."""
        cfg = self.config
        c_in = values.shape[-1]
        if c_in % cfg.groups != 0:
            raise ValueError(
                f"{type(self).__name__}: input features ({c_in}) must be divisible by "
                f"groups ({cfg.groups})."
            )
        kernel_init = cfg.kernel_init
        if cfg.kernel_sharding is not None:
            kernel_init = nn.with_partitioning(kernel_init, cfg.kernel_sharding)
        kernel = self.param(
            "kernel",
            kernel_init,
            (*self._kernel_size, c_in // cfg.groups, cfg.filters),
            cfg.param_dtype,
        )
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
            bias = self.param("bias", bias_init, (cfg.filters,), cfg.param_dtype)
        values, kernel, bias = nn.dtypes.promote_dtype(
            values, kernel, bias, dtype=cfg.compute_dtype
        )
        spatial = "TH" if len(self._kernel_size) == 2 else "H"
        y = jax.lax.conv_general_dilated(
            values,
            kernel,
            window_strides=(1,) * len(self._kernel_size),
            padding=paddings,
            lhs_dilation=self._strides,
            rhs_dilation=self._dilation_rate,
            dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
            feature_group_count=cfg.groups,
            precision=cfg.precision,
        )
        return y, bias


def _validate_common(cfg: Any, name: str) -> None:
    if cfg.use_weight_norm and cfg.kernel_constraint is not None:
        raise ValueError(
            f"{name}: use_weight_norm=True and kernel_constraint are both set; choose one."
        )
    for what in ("kernel_size", "strides", "dilation_rate"):
        value = getattr(cfg, what)
        if any(v < 1 for v in (value if isinstance(value, tuple) else (value,))):
            raise ValueError(f"{name}: {what} must be >= 1, got {value}.")
    if cfg.groups < 1 or cfg.filters % cfg.groups != 0:
        raise ValueError(
            f"{name}: groups={cfg.groups} must be >= 1 and divide filters={cfg.filters}."
        )


class Conv1DTranspose(_BaseConvTranspose):
    """1D transposed convolution: `[b, t, c_in] -> [b, t * strides (+ tail), filters]`.

    Parameters: `kernel [kernel_size, c_in / groups, filters]`, `bias [filters]`.
    Output frames: `t * strides` for same/causal, plus `max(k_eff - strides, 0)`
    for valid. Steppable only with causal padding (block size 1).
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        """Config for Conv1DTranspose."""

        # Output channels.
        filters: int
        # Taps along time.
        kernel_size: int
        # Upsampling factor (output frames per input frame).
        strides: int = 1
        # Spacing between taps.
        dilation_rate: int = 1
        # Time padding: 'valid', 'same', 'causal' or 'semicausal_full'.
        padding: str = "valid"
        # Feature groups.
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
            object.__setattr__(
                self, "padding", _validate_transpose_padding(self.padding, "padding")
            )
            _validate_common(self, "Conv1DTranspose")

        def make(self) -> Conv1DTranspose:
            return Conv1DTranspose(self, name=self.name)

    config: Config

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
    def _time_padding(self) -> str:
        return self.config.padding


class Conv2DTranspose(_BaseConvTranspose):
    """2D transposed convolution over (time, height):
    `[b, t, h, c_in] -> [b, t * st (+ tail), h', filters]`.

    Parameters: `kernel [kt, kh, c_in / groups, filters]`, `bias [filters]`.
    Steppable only with causal `time_padding`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        """Config for Conv2DTranspose."""

        # Output channels.
        filters: int
        # Taps along (time, height); an int applies to both.
        kernel_size: int | tuple[int, int]
        # Upsampling factors along (time, height).
        strides: int | tuple[int, int] = 1
        # Dilation along (time, height).
        dilation_rate: int | tuple[int, int] = 1
        # Time padding: 'valid', 'same', 'causal' or 'semicausal_full'.
        time_padding: str = "valid"
        # Height padding: one of the time paddings above or explicit (left, right).
        spatial_padding: str | tuple[int, int] = "same"
        # Feature groups.
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
            object.__setattr__(
                self, "time_padding", _validate_transpose_padding(self.time_padding, "time_padding")
            )
            if isinstance(self.spatial_padding, str | types.PaddingMode):
                spatial = _validate_transpose_padding(self.spatial_padding, "spatial_padding")
            else:
                spatial = tuple(int(p) for p in self.spatial_padding)
                if len(spatial) != 2:
                    raise ValueError(
                        "Conv2DTranspose: explicit spatial_padding must be (left, right), "
                        f"got {self.spatial_padding!r}."
                    )
            object.__setattr__(self, "spatial_padding", spatial)
            for field in ("kernel_size", "strides", "dilation_rate"):
                object.__setattr__(self, field, normalize_tuple(getattr(self, field), 2, field))
            _validate_common(self, "Conv2DTranspose")

        def make(self) -> Conv2DTranspose:
            return Conv2DTranspose(self, name=self.name)

    config: Config

    @property
    def _kernel_size(self) -> tuple[int, ...]:
        return self.config.kernel_size

    @property
    def _strides(self) -> tuple[int, ...]:
        return self.config.strides

    @property
    def _dilation_rate(self) -> tuple[int, ...]:
        return self.config.dilation_rate

    @property
    def _time_padding(self) -> str:
        return self.config.time_padding

    @property
    def _spatial_paddings(self) -> tuple[Any, ...]:
        return (self.config.spatial_padding,)
