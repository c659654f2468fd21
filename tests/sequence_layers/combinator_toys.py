"""Small self-contained layers for the combinator tests, so they do not depend
on the real layer families (written in parallel)."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types, utils
from sequence_layers.sequence import ChannelSpec, Sequence
from sequence_layers.types import Constants, ReceptiveField, State


class ToyConv(types.PreservesType, types.SequenceLayer):
    """A convolution with `c -> c` channels following the padding rules."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        kernel_size: int
        strides: int = 1
        padding: str = "causal"
        name: str | None = None

        def make(self) -> ToyConv:
            return ToyConv(self, name=self.name)

    config: Config

    @property
    def supports_step(self) -> bool:
        return self.config.padding in utils.STEPPABLE_CONV_PADDINGS

    @property
    def block_size(self) -> int:
        return self.config.strides

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(1, self.config.strides)

    @property
    def input_latency(self) -> int:
        return utils.conv_input_latency(self.config.padding, self.config.kernel_size)

    @property
    def output_latency(self) -> int:
        c = self.config
        return utils.conv_output_latency(c.padding, c.kernel_size, c.strides)

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        c = self.config
        return utils.conv_receptive_field_per_step(c.kernel_size, c.strides, 1, c.padding)

    @nn.nowrap
    def get_output_shape(self, input_shape: Any, *, constants: Any = None) -> tuple[int, ...]:
        return tuple(input_shape)

    def _conv(self, v: jax.Array) -> jax.Array:
        c = self.config
        w = self.param(
            "kernel", nn.initializers.normal(0.5), (c.kernel_size, v.shape[-1], v.shape[-1])
        )
        return jax.lax.conv_general_dilated(
            v, w, (c.strides,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
        )

    @nn.compact
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        c = self.config
        x = x.mask_invalid()
        left, right = utils.convolution_explicit_padding(c.padding, c.kernel_size, c.strides)
        v = jnp.pad(x.values, ((0, 0), (left, right), (0, 0)))
        mask = utils.compute_conv_mask(x.mask, c.kernel_size, c.strides, 1, c.padding, False)
        return Sequence(self._conv(v), mask)

    def get_initial_state(
        self, batch_size: int, input_spec: ChannelSpec, *, training: bool, constants: Any = None
    ) -> State:
        c = self.config
        width = utils.conv_buffer_width(c.padding, c.kernel_size, c.strides)
        return types.zeros_state(
            batch_size, width, input_spec, utils.conv_initial_buffer_valid(c.padding)
        )

    @nn.compact
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        c = self.config
        ext = state.concatenate(x.mask_invalid())
        mask = utils.compute_conv_mask(ext.mask, c.kernel_size, c.strides, 1, c.padding, True)
        width = utils.conv_buffer_width(c.padding, c.kernel_size, c.strides)
        keep = ext.shape[1] - width
        return Sequence(self._conv(ext.values), mask), Sequence(
            ext.values[:, keep:], ext.mask[:, keep:]
        )


class ToyDense(types.Stateless):
    """Per-frame projection to `features` channels (params `kernel`, `bias`)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        features: int
        name: str | None = None

        def make(self) -> ToyDense:
            return ToyDense(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(self, input_shape: Any, *, constants: Any = None) -> tuple[int, ...]:
        return (*tuple(input_shape)[:-1], self.config.features)

    @nn.compact
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        kernel = self.param(
            "kernel", nn.initializers.normal(0.5), (x.shape[-1], self.config.features)
        )
        bias = self.param("bias", nn.initializers.normal(0.1), (self.config.features,))
        return Sequence(x.values @ kernel + bias, x.mask)


class ToyScale(types.StatelessPointwise):
    """`y = factor * x` (no parameters)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        factor: float = 2.0
        name: str | None = None

        def make(self) -> ToyScale:
            return ToyScale(self, name=self.name)

    config: Config

    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        return x.apply_values_masked(lambda v: v * self.config.factor)


class ToyAddConstant(types.StatelessPointwise):
    """`y = x + constants[key]`, the constant broadcast as `[b, 1, *c]`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        key: str = "bias"
        name: str | None = None

        def make(self) -> ToyAddConstant:
            return ToyAddConstant(self, name=self.name)

    config: Config

    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        if constants is None or self.config.key not in constants:
            raise ValueError(f"ToyAddConstant needs constants[{self.config.key!r}].")
        c = jnp.asarray(constants[self.config.key])
        return Sequence(x.values + c[:, None], x.mask)


class ToyEmit(types.StatelessEmitting, types.StatelessPointwise):
    """Identity that emits its input."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        name: str | None = None

        def make(self) -> ToyEmit:
            return ToyEmit(self, name=self.name)

    config: Config

    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Any]:
        return x, x


class ToyCumsum(types.PreservesShape, types.PreservesType, types.SequenceLayer):
    """A recurrence `h = decay * h + x` over valid frames (state `[b, *c]`)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        decay: float = 0.5
        name: str | None = None

        def make(self) -> ToyCumsum:
            return ToyCumsum(self, name=self.name)

    config: Config

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return {0: (-math.inf, 0)}

    def get_initial_state(
        self, batch_size: int, input_spec: ChannelSpec, *, training: bool, constants: Any = None
    ) -> State:
        return jnp.zeros((batch_size, *input_spec.shape), input_spec.dtype)

    def _run(self, x: Sequence, h: jax.Array) -> tuple[Sequence, jax.Array]:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x = x.mask_invalid()

        def f(h: jax.Array, inp: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            v, m = inp
            m = m.reshape(m.shape + (1,) * (v.ndim - 1))
            h = jnp.where(m, self.config.decay * h + v * scale, h)
            return h, h

        h, ys = jax.lax.scan(f, h, (jnp.moveaxis(x.values, 1, 0), x.mask.T))
        return Sequence(jnp.moveaxis(ys, 0, 1), x.mask).mask_invalid(), h

    @nn.compact
    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        h = self.get_initial_state(x.shape[0], x.channel_spec, training=training)
        return self._run(x, h)[0]

    @nn.compact
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        return self._run(x, state)
