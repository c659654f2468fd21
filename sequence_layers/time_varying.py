"""Time-varying layers: separate parameters for each time step index.

`SequenceEmbedding`, `SequenceDense` and `MaskedDense` pick their weights by
the frame's step index `t` (counted in physical frames from the start of the
stream, for `t < num_steps`; later frames give NaN). Unlike the reference,
which keeps one scalar step counter for the whole batch, the counter here is
per batch row (`[b]`), so a server can batch unrelated streams and reset rows
independently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sequence_layers import types
from sequence_layers.sequence import ChannelSpec, Sequence
from sequence_layers.types import Constants, ReceptiveField, State

__all__ = ["MaskedDense", "SequenceDense", "SequenceEmbedding"]


def _promoted_dtype(input_dtype: Any, param_dtype: Any, dtype: Any) -> Any:
    if dtype is not None:
        return dtype
    out = jnp.result_type(input_dtype, param_dtype)
    return out if jnp.issubdtype(out, jnp.inexact) else jnp.promote_types(out, jnp.float32)


def _steps(state: jax.Array, time: int) -> jax.Array:
    """Per-row step indices `[b, time]` of a block starting at `state [b]`."""
    return state[:, None] + jnp.arange(time, dtype=jnp.int32)[None, :]


def _nan_outside(values: jax.Array, steps: jax.Array, num_steps: int) -> jax.Array:
    """NaN on frames whose step index has no weights (`>= num_steps`)."""
    inside = (steps >= 0) & (steps < num_steps)
    inside = inside.reshape(inside.shape + (1,) * (values.ndim - 2))
    return jnp.where(inside, values, jnp.asarray(jnp.nan, values.dtype))


def _check_rank3(layer: types.SequenceLayer, shape: tuple[int, ...]) -> None:
    if len(shape) != 1:
        raise ValueError(
            f"{type(layer).__name__} needs [b, t, features] inputs, got channel shape {shape}."
        )


class SequenceEmbedding(types.SequenceLayer):
    """Embeds integer codes with a different table per step:
    `[b, t, ...]` ints -> `[b, t, ..., dimension]`.

    Codes at step t must lie in `[0, num_embeddings_per_step[t])`; others give
    NaN. All tables live in one `embedding [sum(num_embeddings), dimension]`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Embedding size.
        dimension: int
        # Table size per step: one int for all steps, or one per step.
        num_embeddings_per_step: tuple[int, ...] | int
        # Number of steps with their own table.
        num_steps: int
        # Output dtype; None means param_dtype.
        dtype: Any = None
        # Dtype of the embedding table.
        param_dtype: Any = jnp.float32
        # Embedding initializer.
        embedding_init: Callable[..., Any] = nn.linear.default_embed_init
        # Accepted for reference compatibility; unused.
        embedding_sharding: Any = None
        # Round the total table size up to a multiple of this (TPU-friendly).
        round_num_embeddings_to_multiple_of: int | None = None
        # Optional module name.
        name: str | None = None

        def __post_init__(self) -> None:
            if not isinstance(self.num_embeddings_per_step, int):
                sizes = tuple(int(n) for n in self.num_embeddings_per_step)
                if len(sizes) != self.num_steps:
                    raise ValueError(
                        f"num_embeddings_per_step has {len(sizes)} entries; it needs "
                        f"num_steps={self.num_steps}."
                    )
                object.__setattr__(self, "num_embeddings_per_step", sizes)
            if self.total_embeddings <= 0:
                raise ValueError(
                    f"num_embeddings_per_step={self.num_embeddings_per_step} must be positive."
                )

        @property
        def total_embeddings(self) -> int:
            if isinstance(self.num_embeddings_per_step, int):
                total = self.num_embeddings_per_step * self.num_steps
            else:
                total = sum(self.num_embeddings_per_step)
            if multiple := self.round_num_embeddings_to_multiple_of:
                total = -(-total // multiple) * multiple
            return total

        def make(self) -> SequenceEmbedding:
            return SequenceEmbedding(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            self.config.embedding_init,
            (self.config.total_embeddings, self.config.dimension),
            self.config.param_dtype,
        )

    @nn.nowrap
    def get_output_shape(
        self, input_shape: tuple[int, ...] | list[int], *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        return (*tuple(input_shape), self.config.dimension)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        if not jnp.issubdtype(jnp.dtype(input_dtype), jnp.integer):
            raise ValueError(f"SequenceEmbedding needs integer codes, got {input_dtype}.")
        return self.config.dtype or self.config.param_dtype

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        # Per-row step counter.
        return jnp.zeros((batch_size,), jnp.int32)

    @nn.nowrap
    def _embed(self, x: Sequence, steps: jax.Array) -> Sequence:
        cfg = self.config
        table = self.embedding.astype(self.get_output_dtype(x.dtype))
        clipped = jnp.clip(steps, 0, cfg.num_steps - 1)
        if isinstance(cfg.num_embeddings_per_step, int):
            offsets = cfg.num_embeddings_per_step * clipped
            limits = jnp.full_like(clipped, cfg.num_embeddings_per_step)
        else:
            starts = np.cumsum((0, *cfg.num_embeddings_per_step[:-1]))
            offsets = jnp.take(jnp.asarray(starts, jnp.int32), clipped)
            limits = jnp.take(jnp.asarray(cfg.num_embeddings_per_step, jnp.int32), clipped)
        expand = (1,) * (x.ndim - 2)
        offsets, limits = (
            offsets.reshape(offsets.shape + expand),
            limits.reshape(limits.shape + expand),
        )
        in_range = (steps >= 0) & (steps < cfg.num_steps)
        ok = (x.values >= 0) & (x.values < limits) & in_range.reshape(in_range.shape + expand)
        # Out-of-range codes or steps read past the table: NaN.
        index = jnp.where(ok, x.values + offsets, table.shape[0])
        values = jnp.take(table, index, axis=0, mode="fill", fill_value=jnp.nan)
        return Sequence(values, x.mask)

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        return self._embed(x, _steps(state, x.shape[1])), state + x.shape[1]

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        steps = jnp.zeros((x.shape[0],), jnp.int32)
        return self._embed(x, _steps(steps, x.shape[1]))


class _TimeVaryingDense(types.SequenceLayer):
    """Shared config plumbing of SequenceDense and MaskedDense."""

    config: Any

    @nn.nowrap
    def get_output_shape(
        self, input_shape: tuple[int, ...] | list[int], *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        _check_rank3(self, tuple(input_shape))
        return (self.config.features,)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return _promoted_dtype(input_dtype, self.config.param_dtype, self.config.dtype)

    @nn.nowrap
    def _finish(self, y: jax.Array, bias: jax.Array | None, steps: jax.Array) -> jax.Array:
        if bias is not None:
            y = y + bias
        if self.config.activation is not None:
            y = self.config.activation(y)
        return _nan_outside(y, steps, self.config.num_steps)


class SequenceDense(_TimeVaryingDense):
    """A Dense layer per step: `y[t] = x[t] @ kernel[t] + bias[t]`;
    `[b, t, i]` -> `[b, t, features]`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Output features.
        features: int
        # Number of steps with their own weights.
        num_steps: int
        # Add a per-step bias.
        use_bias: bool = True
        # Optional activation after the affine map.
        activation: Callable[[jax.Array], jax.Array] | None = None
        # Compute dtype; None promotes input and params.
        dtype: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Precision of the einsum.
        precision: Any = None
        # Kernel initializer (applied per step).
        kernel_init: Callable[..., Any] = nn.linear.default_kernel_init
        # Accepted for reference compatibility; unused.
        kernel_sharding: Any = None
        # Bias initializer.
        bias_init: Callable[..., Any] = nn.initializers.zeros
        # Accepted for reference compatibility; unused.
        bias_sharding: Any = None
        # Optional module name.
        name: str | None = None

        def make(self) -> SequenceDense:
            return SequenceDense(self, name=self.name)

    config: Config

    @nn.compact
    def _params(self, input_dim: int) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        kernel = self.param(
            "kernel", cfg.kernel_init, (cfg.num_steps, input_dim, cfg.features), cfg.param_dtype
        )
        bias = None
        if cfg.use_bias:
            bias = self.param("bias", cfg.bias_init, (cfg.num_steps, cfg.features), cfg.param_dtype)
        return kernel, bias

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        _check_rank3(self, tuple(input_spec.shape))
        return jnp.zeros((batch_size,), jnp.int32)

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        _check_rank3(self, x.channel_shape)
        kernel, bias = self._params(x.shape[-1])
        steps = _steps(state, x.shape[1])
        index = jnp.clip(steps, 0, self.config.num_steps - 1)
        inputs, kernel, bias = nn.dtypes.promote_dtype(
            x.values, kernel, bias, dtype=self.config.dtype
        )
        # Rows may sit at different steps: gather each frame's kernel.
        y = jnp.einsum("bti,btio->bto", inputs, kernel[index], precision=self.config.precision)
        y = self._finish(y, None if bias is None else bias[index], steps)
        return Sequence(y, x.mask), state + x.shape[1]

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        _check_rank3(self, x.channel_shape)
        kernel, bias = self._params(x.shape[-1])
        time, num_steps = x.shape[1], self.config.num_steps
        steps = _steps(jnp.zeros((x.shape[0],), jnp.int32), time)
        index = np.minimum(np.arange(time), num_steps - 1)
        inputs, kernel, bias = nn.dtypes.promote_dtype(
            x.values, kernel, bias, dtype=self.config.dtype
        )
        y = jnp.einsum("bti,tio->bto", inputs, kernel[index], precision=self.config.precision)
        y = self._finish(y, None if bias is None else bias[index][None], steps)
        return Sequence(y, x.mask)


class MaskedDense(_TimeVaryingDense):
    """Causal per-step Dense: `y[t] = sum_{s <= t} x[s] @ kernel[s, t] + bias[t]`;
    `[b, t, i]` -> `[b, t, features]`.

    The kernel is `[num_steps, num_steps, i, features]` with its lower
    triangle (s > t) masked off, so half of it is unused. State: the per-row
    step `[b]` and the row's inputs so far, `[b, num_steps, i]`.
    Receptive field `(-num_steps + 1, 0)`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Output features.
        features: int
        # Number of steps (the longest sequence).
        num_steps: int
        # Add a per-step bias.
        use_bias: bool = True
        # Optional activation after the affine map.
        activation: Callable[[jax.Array], jax.Array] | None = None
        # Compute dtype; None promotes input and params.
        dtype: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Precision of the einsum.
        precision: Any = None
        # Kernel initializer.
        kernel_init: Callable[..., Any] = nn.linear.default_kernel_init
        # Accepted for reference compatibility; unused.
        kernel_sharding: Any = None
        # Bias initializer.
        bias_init: Callable[..., Any] = nn.initializers.zeros
        # Accepted for reference compatibility; unused.
        bias_sharding: Any = None
        # Optional module name.
        name: str | None = None

        def make(self) -> MaskedDense:
            return MaskedDense(self, name=self.name)

    config: Config

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return {0: (-self.config.num_steps + 1, 0)}

    @nn.compact
    def _params(self, input_dim: int) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        n = cfg.num_steps
        kernel = self.param(
            "kernel", cfg.kernel_init, (n, n, input_dim, cfg.features), cfg.param_dtype
        )
        bias = None
        if cfg.use_bias:
            bias = self.param("bias", cfg.bias_init, (n, cfg.features), cfg.param_dtype)
        # Input step s reaches output step t only if s <= t.
        causal = np.triu(np.ones((n, n), np.float32))[:, :, None, None]
        return kernel * jnp.asarray(causal, kernel.dtype), bias

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        _check_rank3(self, tuple(input_spec.shape))
        inputs = jnp.zeros((batch_size, self.config.num_steps, *input_spec.shape), input_spec.dtype)
        return jnp.zeros((batch_size,), jnp.int32), inputs

    @types.check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        _check_rank3(self, x.channel_shape)
        start, inputs = state
        time, num_steps = x.shape[1], self.config.num_steps
        kernel, bias = self._params(x.shape[-1])
        # Write the block into each row's inputs at its own steps.
        offset = jnp.arange(num_steps)[None, :] - start[:, None]  # [b, num_steps]
        written = (offset >= 0) & (offset < time)
        block = jnp.take_along_axis(
            x.mask_invalid().values, jnp.clip(offset, 0, time - 1)[:, :, None], axis=1
        )
        inputs = jnp.where(written[:, :, None], block.astype(inputs.dtype), inputs)
        steps = _steps(start, time)
        index = jnp.clip(steps, 0, num_steps - 1)
        values, kernel, bias = nn.dtypes.promote_dtype(
            inputs, kernel, bias, dtype=self.config.dtype
        )
        # Future steps of `inputs` are zero and masked off by the kernel anyway.
        y = jnp.einsum("bsi,sbtio->bto", values, kernel[:, index], precision=self.config.precision)
        y = self._finish(y, None if bias is None else bias[index], steps)
        return Sequence(y, x.mask), (start + time, inputs)

    @types.check_layer
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        _check_rank3(self, x.channel_shape)
        time, num_steps = x.shape[1], self.config.num_steps
        kernel, bias = self._params(x.shape[-1])
        used = min(time, num_steps)
        values = x.mask_invalid().values[:, :used]
        values, kernel, bias = nn.dtypes.promote_dtype(
            values, kernel, bias, dtype=self.config.dtype
        )
        index = np.minimum(np.arange(time), num_steps - 1)
        y = jnp.einsum(
            "bsi,stio->bto", values, kernel[:used][:, index], precision=self.config.precision
        )
        steps = _steps(jnp.zeros((x.shape[0],), jnp.int32), time)
        y = self._finish(y, None if bias is None else bias[index][None], steps)
        return Sequence(y, x.mask)
