"""Convolutions over time and space: Conv2D `[b, t, h, c]` and Conv3D
`[b, t, h, w, c]`.

Axis 1 (time) follows the padding modes of `types.PaddingMode` and streams
exactly like Conv1D (same `BaseConv` state and masks); the other spatial
axes are padded by `spatial_padding` in both `layer` and `step`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.convolution import (
    _DEFAULT_KERNEL_INIT,
    BaseConv,
    _check_groups,
    _validate_common,
    _validate_window,
    normalize_tuple,
    spatial_output_size,
    validate_spatial_padding,
)
from sequence_layers.weight_normalization import WeightNormalization

__all__ = ["Conv2D", "Conv3D"]


class _ConvND(BaseConv):
    """Conv2D / Conv3D: time padding modes on axis 1, `spatial_padding` on the
    remaining spatial axes."""

    @property
    def _kernel_size(self) -> tuple[int, ...]:
        return self.config.kernel_size

    @property
    def _strides(self) -> tuple[int, ...]:
        return self.config.strides

    @property
    def _dilation_rate(self) -> tuple[int, ...]:
        return self.config.dilation_rate

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        self._check_input_rank(tuple(input_shape))
        spatial = tuple(
            spatial_output_size(size, p, k, s, d)
            for size, p, k, s, d in zip(
                input_shape[:-1],
                self._paddings[1:],
                self._kernel_size[1:],
                self._strides[1:],
                self._dilation_rate[1:],
                strict=True,
            )
        )
        return (*spatial, self.config.filters)

    @nn.compact
    def _conv(
        self, values: jax.Array, paddings: tuple[tuple[int, int], ...], training: bool
    ) -> jax.Array:
        cfg = self.config
        c_in = values.shape[-1]
        _check_groups(c_in, cfg.groups, type(self).__name__)
        kernel, bias = self._kernel_and_bias(
            (*cfg.kernel_size, c_in // cfg.groups, cfg.filters), cfg.filters, training
        )
        return self._run(values, kernel, bias, paddings, cfg.groups)


def _post_init_nd(cfg: Any, rank: int, name: str) -> None:
    object.__setattr__(cfg, "time_padding", types.validate_padding(cfg.time_padding))
    for field in ("kernel_size", "strides", "dilation_rate"):
        object.__setattr__(cfg, field, normalize_tuple(getattr(cfg, field), rank, field))
    _validate_window(cfg.kernel_size, cfg.strides, cfg.dilation_rate, name)
    _validate_common(cfg, name)


class Conv2D(_ConvND):
    """2D convolution over (time, height): `[b, t, h, c_in] -> [b, t', h', filters]`.

    Parameters: `kernel [kt, kh, c_in / groups, filters]`, `bias [filters]`.
    Steppable when `time_padding` is steppable (see Conv1D).
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        """Config for Conv2D."""

        # Output channels.
        filters: int
        # Taps along (time, height); an int applies to both.
        kernel_size: int | tuple[int, int]
        # Strides along (time, height).
        strides: int | tuple[int, int] = 1
        # Dilation along (time, height).
        dilation_rate: int | tuple[int, int] = 1
        # Time padding mode (types.PaddingMode).
        time_padding: str = "valid"
        # Height padding: a padding mode or explicit (left, right).
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
            _post_init_nd(self, 2, "Conv2D")
            object.__setattr__(
                self, "spatial_padding", validate_spatial_padding(self.spatial_padding)
            )

        def make(self) -> Conv2D:
            return Conv2D(self, name=self.name)

    config: Config

    @property
    def _paddings(self) -> tuple[Any, ...]:
        return (self.config.time_padding, self.config.spatial_padding)


class Conv3D(_ConvND):
    """3D convolution over (time, height, width):
    `[b, t, h, w, c_in] -> [b, t', h', w', filters]`.

    Parameters: `kernel [kt, kh, kw, c_in / groups, filters]`, `bias [filters]`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        """Config for Conv3D."""

        # Output channels.
        filters: int
        # Taps along (time, height, width); an int applies to all.
        kernel_size: int | tuple[int, int, int]
        # Strides along (time, height, width).
        strides: int | tuple[int, int, int] = 1
        # Dilation along (time, height, width).
        dilation_rate: int | tuple[int, int, int] = 1
        # Time padding mode (types.PaddingMode).
        time_padding: str = "valid"
        # (height, width) paddings: each a padding mode or explicit (left, right).
        spatial_padding: tuple[str | tuple[int, int], str | tuple[int, int]] = ("same", "same")
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
            _post_init_nd(self, 3, "Conv3D")
            if isinstance(self.spatial_padding, str) or len(self.spatial_padding) != 2:
                raise ValueError(
                    f"Conv3D: spatial_padding must hold 2 paddings (height, width), "
                    f"got {self.spatial_padding!r}."
                )
            object.__setattr__(
                self,
                "spatial_padding",
                tuple(validate_spatial_padding(p) for p in self.spatial_padding),
            )

        def make(self) -> Conv3D:
            return Conv3D(self, name=self.name)

    config: Config

    @property
    def _paddings(self) -> tuple[Any, ...]:
        return (self.config.time_padding, *self.config.spatial_padding)
