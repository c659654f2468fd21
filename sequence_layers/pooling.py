"""Pooling over time (and spatial axes): {Min,Max,Average}Pooling{1,2,3}D.

Pooling windows follow the convolution time rules (`TimeWindowedLayer`):
same padding modes, latencies and receptive fields. Invalid frames never
affect a pooled value: before pooling they are replaced by the reduction's
identity (+inf for min, -inf for max, 0 for average), which is also what the
time and spatial padding hold. Average pooling divides by the pool size, or
with `masked_average=True` by the number of valid frames in the window.

Steppable for time padding reverse_causal_valid, causal, reverse_causal and
semicausal (not causal_valid, as in the reference).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import types
from sequence_layers.convolution import (
    TimeWindowedLayer,
    normalize_tuple,
    spatial_output_size,
    validate_spatial_padding,
)
from sequence_layers.sequence import ChannelSpec, Sequence

__all__ = [
    "AveragePooling1D",
    "AveragePooling2D",
    "AveragePooling3D",
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "MinPooling1D",
    "MinPooling2D",
    "MinPooling3D",
]

POOLING_STEPPABLE_PADDINGS = ("reverse_causal_valid", "causal", "reverse_causal", "semicausal")


def _identity(kind: str, dtype: Any) -> Any:
    """The reduction's identity for `dtype`: what invalid frames and padding hold."""
    dtype = jnp.dtype(dtype)
    if kind == "average":
        return np.zeros((), dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return np.array(-np.inf if kind == "max" else np.inf, dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        return np.array(info.min if kind == "max" else info.max, dtype)
    if dtype == jnp.bool_:
        return np.array(kind == "min", dtype)
    raise ValueError(f"{kind} pooling does not support dtype {dtype}.")


class BasePooling(types.PreservesType, TimeWindowedLayer):
    """Shared pooling logic; subclasses set `_kind` and the config fields
    `pool_size`, `strides`, `dilation_rate` and padding(s)."""

    _kind: ClassVar[str] = ""
    _steppable_paddings: ClassVar[tuple[str, ...]] = POOLING_STEPPABLE_PADDINGS

    @property
    def _rank(self) -> int:
        raise NotImplementedError

    @property
    def _kernel_size(self) -> tuple[int, ...]:
        return normalize_tuple(self.config.pool_size, self._rank, "pool_size")

    @property
    def _strides(self) -> tuple[int, ...]:
        return normalize_tuple(self.config.strides, self._rank, "strides")

    @property
    def _dilation_rate(self) -> tuple[int, ...]:
        return normalize_tuple(self.config.dilation_rate, self._rank, "dilation_rate")

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        input_shape = tuple(input_shape)
        n_spatial = self._rank - 1
        if len(input_shape) < n_spatial:
            raise ValueError(
                f"{type(self).__name__} pools {n_spatial} spatial axes after time, got "
                f"channel shape {input_shape}."
            )
        spatial = tuple(
            spatial_output_size(size, p, k, s, d)
            for size, p, k, s, d in zip(
                input_shape[:n_spatial],
                self._paddings[1:],
                self._kernel_size[1:],
                self._strides[1:],
                self._dilation_rate[1:],
                strict=True,
            )
        )
        return (*spatial, *input_shape[n_spatial:])

    def _check_input_rank(self, channel_shape: tuple[int, ...]) -> None:
        self.get_output_shape(channel_shape)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> Sequence:
        return self._initial_buffer(batch_size, input_spec, _identity(self._kind, input_spec.dtype))

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self._check_input_rank(x.channel_shape)
        x = x.mask_invalid(_identity(self._kind, x.dtype))
        paddings = (self._time_explicit_padding(), *self._spatial_explicit_paddings())
        values = self._pool(x.values, x.mask, paddings)
        return Sequence(values, self._window_mask(x.mask, is_step=False))

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: Sequence,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, Sequence]:
        self._check_input_rank(x.channel_shape)
        # The buffer stands in for the time padding `layer` adds.
        window = state.concatenate(x.mask_invalid(_identity(self._kind, x.dtype)))
        paddings = ((0, 0), *self._spatial_explicit_paddings())
        values = self._pool(window.values, window.mask, paddings)
        y = Sequence(values, self._window_mask(window.mask, is_step=True))
        keep = window.shape[1] - self._buffer_width
        return y, Sequence(window.values[:, keep:], window.mask[:, keep:])

    def _reduce(
        self,
        values: jax.Array,
        init: Any,
        op: Callable[[jax.Array, jax.Array], jax.Array],
        paddings: tuple[tuple[int, int], ...],
        n_axes: int,
    ) -> jax.Array:
        """reduce_window over time + the first `n_axes - 1` spatial axes."""
        trailing = values.ndim - 1 - n_axes

        def pack(window: tuple[Any, ...], default: Any) -> tuple[Any, ...]:
            return (default, *window[:n_axes], *(default,) * trailing)

        return jax.lax.reduce_window(
            values,
            np.asarray(init, dtype=values.dtype),
            op,
            pack(self._kernel_size, 1),
            pack(self._strides, 1),
            pack(paddings, (0, 0)),
            window_dilation=pack(self._dilation_rate, 1),
        )

    def _reduce_by_taps(
        self,
        values: jax.Array,
        init: Any,
        op: Callable[[jax.Array, jax.Array], jax.Array],
        paddings: tuple[tuple[int, int], ...],
    ) -> jax.Array:
        """`_reduce` as an elementwise `op` over one strided slice per tap."""
        n_axes = self._rank
        widths = [(0, 0), *paddings, *[(0, 0)] * (values.ndim - 1 - n_axes)]
        padded = jnp.pad(values, widths, constant_values=jnp.asarray(init, values.dtype))
        windows = list(zip(self._kernel_size, self._strides, self._dilation_rate, strict=True))
        n_out = [
            max(0, (padded.shape[1 + i] - ((k - 1) * d + 1)) // s + 1)
            for i, (k, s, d) in enumerate(windows)
        ]
        result = None
        for taps in itertools.product(*(range(k) for k, _, _ in windows)):
            index = [slice(None)]
            for tap, (_, s, d), n in zip(taps, windows, n_out, strict=True):
                index.append(slice(tap * d, tap * d + (n - 1) * s + 1 if n else tap * d, s))
            piece = padded[tuple(index)]
            result = piece if result is None else op(result, piece)
        assert result is not None
        return result

    def _pool(
        self, values: jax.Array, mask: jax.Array, paddings: tuple[tuple[int, int], ...]
    ) -> jax.Array:
        identity = _identity(self._kind, values.dtype)
        if self._kind in ("max", "min"):
            op = jax.lax.max if self._kind == "max" else jax.lax.min
            if not any(d > 1 for d in self._dilation_rate):
                return self._reduce(values, identity, op, paddings, self._rank)
            # jax has no VJP for dilated max/min reduce_window.
            pooled = self._reduce_by_taps(values, identity, op, paddings)
            if self._time_padding not in ("same", "semicausal"):
                return pooled
            # With dilation, same/semicausal windows may skip their own frame, so
            # a valid output can read no valid frame; give it 0, not +-inf.
            any_valid = self._reduce(mask.astype(jnp.int32), 0, jax.lax.max, paddings[:1], 1)
            any_valid = any_valid.reshape(any_valid.shape + (1,) * (pooled.ndim - 2)) > 0
            return jnp.where(any_valid, pooled, jnp.zeros_like(pooled))
        total = self._reduce(values, identity, jax.lax.add, paddings, self._rank)
        if self.config.masked_average:
            # Valid frames per time window, times the spatial window size.
            count = self._reduce(mask.astype(values.dtype), 0, jax.lax.add, paddings[:1], 1)
            count = count.reshape(count.shape + (1,) * (total.ndim - 2))
            count = count * int(np.prod(self._kernel_size[1:]))
        else:
            count = jnp.asarray(int(np.prod(self._kernel_size)), values.dtype)
        if jnp.issubdtype(values.dtype, jnp.integer):
            return jnp.where(count == 0, 0, total // jnp.maximum(count, 1))
        # A window with no valid frame averages to 0 (its output is invalid
        # anyway); keep 0/0 out of values and gradients.
        safe = jnp.where(count == 0, jnp.ones_like(count), count)
        return jnp.where(count == 0, jnp.zeros_like(total), total / safe)


# 1D ------------------------------------------------------------------------


def _post_init_1d(cfg: Any) -> None:
    object.__setattr__(cfg, "padding", types.validate_padding(cfg.padding))
    for what in ("pool_size", "strides", "dilation_rate"):
        if getattr(cfg, what) < 1:
            raise ValueError(f"{what} must be >= 1, got {getattr(cfg, what)}.")


# The field blocks below are shared by the Min/Max/Average configs of one rank.
# They stay abstract (no `make`), so serialization never lists them as types;
# each concrete Config adds its own trailing fields and `name` last, keeping
# the field order (and positional construction) of the original configs.
@dataclasses.dataclass(frozen=True)
class _Pooling1DFields(types.SequenceLayerConfig):
    # Window length in frames.
    pool_size: int
    # Time stride (also the step block size).
    strides: int = 1
    # Spacing between pooled frames.
    dilation_rate: int = 1
    # Time padding mode (types.PaddingMode).
    padding: str = "valid"

    def __post_init__(self) -> None:
        _post_init_1d(self)


class _Pooling1D(BasePooling):
    @property
    def _rank(self) -> int:
        return 1

    @property
    def _paddings(self) -> tuple[Any, ...]:
        return (self.config.padding,)


class MinPooling1D(_Pooling1D):
    """Minimum over time windows: `[b, t, ...] -> [b, t', ...]`."""

    _kind: ClassVar[str] = "min"

    @dataclasses.dataclass(frozen=True)
    class Config(_Pooling1DFields):
        """Config for MinPooling1D."""

        # Module name.
        name: str | None = None

        def make(self) -> MinPooling1D:
            return MinPooling1D(self, name=self.name)

    config: Config


class MaxPooling1D(_Pooling1D):
    """Maximum over time windows: `[b, t, ...] -> [b, t', ...]`."""

    _kind: ClassVar[str] = "max"

    @dataclasses.dataclass(frozen=True)
    class Config(_Pooling1DFields):
        """Config for MaxPooling1D."""

        # Module name.
        name: str | None = None

        def make(self) -> MaxPooling1D:
            return MaxPooling1D(self, name=self.name)

    config: Config


class AveragePooling1D(_Pooling1D):
    """Mean over time windows: `[b, t, ...] -> [b, t', ...]`. Invalid frames
    count as zeros unless `masked_average`."""

    _kind: ClassVar[str] = "average"

    @dataclasses.dataclass(frozen=True)
    class Config(_Pooling1DFields):
        """Config for AveragePooling1D."""

        # Divide by the number of valid frames in the window, not pool_size.
        masked_average: bool = False
        # Module name.
        name: str | None = None

        def make(self) -> AveragePooling1D:
            return AveragePooling1D(self, name=self.name)

    config: Config


# 2D / 3D --------------------------------------------------------------------


def _post_init_nd(cfg: Any, rank: int) -> None:
    object.__setattr__(cfg, "time_padding", types.validate_padding(cfg.time_padding))
    for what in ("pool_size", "strides", "dilation_rate"):
        value = normalize_tuple(getattr(cfg, what), rank, what)
        if any(v < 1 for v in value):
            raise ValueError(f"{what} must be >= 1, got {value}.")
        object.__setattr__(cfg, what, value)
    if rank == 2:
        padding = validate_spatial_padding(cfg.spatial_padding)
    else:
        if isinstance(cfg.spatial_padding, str) or len(cfg.spatial_padding) != 2:
            raise ValueError(
                f"spatial_padding must hold 2 paddings (height, width), got "
                f"{cfg.spatial_padding!r}."
            )
        padding = tuple(validate_spatial_padding(p) for p in cfg.spatial_padding)
    object.__setattr__(cfg, "spatial_padding", padding)


@dataclasses.dataclass(frozen=True)
class _Pooling2DFields(types.SequenceLayerConfig):
    # Window along (time, height); an int applies to every axis.
    pool_size: int | tuple[int, ...]
    # Strides along (time, height); the time stride is the step block size.
    strides: int | tuple[int, ...] = 1
    # Dilation along (time, height).
    dilation_rate: int | tuple[int, ...] = 1
    # Time padding mode (types.PaddingMode).
    time_padding: str = "valid"
    # Height padding: a padding mode or explicit (left, right).
    spatial_padding: str | tuple[int, int] = "same"

    def __post_init__(self) -> None:
        _post_init_nd(self, 2)


@dataclasses.dataclass(frozen=True)
class _Pooling3DFields(types.SequenceLayerConfig):
    # Window along (time, height, width); an int applies to every axis.
    pool_size: int | tuple[int, ...]
    # Strides along (time, height, width); the time stride is the step block size.
    strides: int | tuple[int, ...] = 1
    # Dilation along (time, height, width).
    dilation_rate: int | tuple[int, ...] = 1
    # Time padding mode (types.PaddingMode).
    time_padding: str = "valid"
    # (height, width) paddings: each a padding mode or explicit (left, right).
    spatial_padding: tuple[str | tuple[int, int], str | tuple[int, int]] = ("same", "same")

    def __post_init__(self) -> None:
        _post_init_nd(self, 3)


class _Pooling2D(BasePooling):
    @property
    def _rank(self) -> int:
        return 2

    @property
    def _paddings(self) -> tuple[Any, ...]:
        return (self.config.time_padding, self.config.spatial_padding)


class _Pooling3D(BasePooling):
    @property
    def _rank(self) -> int:
        return 3

    @property
    def _paddings(self) -> tuple[Any, ...]:
        return (self.config.time_padding, *self.config.spatial_padding)


class MinPooling2D(_Pooling2D):
    """Minimum over (time, height) windows: `[b, t, h, ...] -> [b, t', h', ...]`."""

    _kind: ClassVar[str] = "min"

    @dataclasses.dataclass(frozen=True)
    class Config(_Pooling2DFields):
        """Config for MinPooling2D."""

        # Module name.
        name: str | None = None

        def make(self) -> MinPooling2D:
            return MinPooling2D(self, name=self.name)

    config: Config


class MaxPooling2D(_Pooling2D):
    """Maximum over (time, height) windows: `[b, t, h, ...] -> [b, t', h', ...]`."""

    _kind: ClassVar[str] = "max"

    @dataclasses.dataclass(frozen=True)
    class Config(_Pooling2DFields):
        """Config for MaxPooling2D."""

        # Module name.
        name: str | None = None

        def make(self) -> MaxPooling2D:
            return MaxPooling2D(self, name=self.name)

    config: Config


class AveragePooling2D(_Pooling2D):
    """Mean over (time, height) windows: `[b, t, h, ...] -> [b, t', h', ...]`."""

    _kind: ClassVar[str] = "average"

    @dataclasses.dataclass(frozen=True)
    class Config(_Pooling2DFields):
        """Config for AveragePooling2D."""

        # Divide by the number of valid frames in the window, not the pool size.
        masked_average: bool = False
        # Module name.
        name: str | None = None

        def make(self) -> AveragePooling2D:
            return AveragePooling2D(self, name=self.name)

    config: Config


class MinPooling3D(_Pooling3D):
    """Minimum over (time, height, width) windows: `[b, t, h, w, ...] -> [b, t', h', w', ...]`."""

    _kind: ClassVar[str] = "min"

    @dataclasses.dataclass(frozen=True)
    class Config(_Pooling3DFields):
        """Config for MinPooling3D."""

        # Module name.
        name: str | None = None

        def make(self) -> MinPooling3D:
            return MinPooling3D(self, name=self.name)

    config: Config


class MaxPooling3D(_Pooling3D):
    """Maximum over (time, height, width) windows: `[b, t, h, w, ...] -> [b, t', h', w', ...]`."""

    _kind: ClassVar[str] = "max"

    @dataclasses.dataclass(frozen=True)
    class Config(_Pooling3DFields):
        """Config for MaxPooling3D."""

        # Module name.
        name: str | None = None

        def make(self) -> MaxPooling3D:
            return MaxPooling3D(self, name=self.name)

    config: Config


class AveragePooling3D(_Pooling3D):
    """Mean over (time, height, width) windows: `[b, t, h, w, ...] -> [b, t', h', w', ...]`."""

    _kind: ClassVar[str] = "average"

    @dataclasses.dataclass(frozen=True)
    class Config(_Pooling3DFields):
        """Config for AveragePooling3D."""

        # Divide by the number of valid frames in the window, not the pool size.
        masked_average: bool = False
        # Module name.
        name: str | None = None

        def make(self) -> AveragePooling3D:
            return AveragePooling3D(self, name=self.name)

    config: Config
