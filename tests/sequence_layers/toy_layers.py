"""Small layers built directly on the core, for testing the core and the harness.

- `ToyConv`: a 1D convolution over time with any steppable padding mode
  (a stand-in for `Conv1D`).
- `RunningSum`: a stateful cumulative sum over valid frames, receptive field
  `(-inf, 0)`.
- `ToyLookahead`: `y[t] = x[t + n]` with output latency `n`, like `Lookahead`.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types, utils
from sequence_layers.sequence import Sequence


class ToyConv(types.PreservesType, types.SequenceLayer):
    """Convolution over time, `[b, t, c] -> [b, t / stride, c]`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Kernel size in frames.
        kernel_size: int
        # Stride in frames (also the block size).
        stride: int = 1
        # A padding mode from REFERENCE section 2.
        padding: str = "causal"
        name: str | None = None

        def make(self) -> ToyConv:
            return ToyConv(self, name=self.name)

    config: Config

    @property
    def block_size(self) -> int:
        return self.config.stride

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(1, self.config.stride)

    @property
    def supports_step(self) -> bool:
        return self.config.padding in utils.STEPPABLE_CONV_PADDINGS

    @property
    def input_latency(self) -> int:
        return utils.conv_input_latency(self.config.padding, self.config.kernel_size)

    @property
    def output_latency(self) -> int:
        c = self.config
        return utils.conv_output_latency(c.padding, c.kernel_size, c.stride)

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        c = self.config
        return utils.conv_receptive_field_per_step(c.kernel_size, c.stride, 1, c.padding)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return tuple(input_shape)

    def _conv(self, values: jax.Array) -> jax.Array:
        c = self.config
        channels = values.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.normal(1.0), (c.kernel_size, channels, channels)
        )
        return jax.lax.conv_general_dilated(
            values, kernel, (c.stride,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
        )

    @nn.compact
    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        c = self.config
        x = x.mask_invalid()
        left, right = utils.convolution_explicit_padding(c.padding, c.kernel_size, c.stride)
        values = jnp.pad(x.values, ((0, 0), (left, right), (0, 0)))
        mask = utils.compute_conv_mask(x.mask, c.kernel_size, c.stride, 1, c.padding, False)
        return Sequence(self._conv(values), mask)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: types.ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> types.State:
        c = self.config
        width = utils.conv_buffer_width(c.padding, c.kernel_size, c.stride)
        return types.zeros_state(
            batch_size, width, input_spec, utils.conv_initial_buffer_valid(c.padding)
        )

    @nn.compact
    @types.check_step
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        c = self.config
        ext = state.concatenate(x.mask_invalid())
        mask = utils.compute_conv_mask(ext.mask, c.kernel_size, c.stride, 1, c.padding, True)
        y = Sequence(self._conv(ext.values), mask)
        keep = ext.shape[1] - utils.conv_buffer_width(c.padding, c.kernel_size, c.stride)
        return y, Sequence(ext.values[:, keep:], ext.mask[:, keep:])


class RunningSum(types.PreservesType, types.PreservesShape, types.SequenceLayer):
    """`y[t] = sum of valid x[s], s <= t`; invalid frames stay invalid.

    State: the running sum `[b, *c]`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        name: str | None = None

        def make(self) -> RunningSum:
            return RunningSum(self, name=self.name)

    config: Config

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return {0: (-float("inf"), 0)}

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        x = x.mask_invalid()
        return Sequence(jnp.cumsum(x.values, axis=1), x.mask).mask_invalid()

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: types.ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> types.State:
        return jnp.zeros((batch_size, *input_spec.shape), input_spec.dtype)

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        x = x.mask_invalid()
        sums = state[:, None] + jnp.cumsum(x.values, axis=1)
        return Sequence(sums, x.mask).mask_invalid(), sums[:, -1]


class ToyLookahead(types.PreservesType, types.PreservesShape, types.SequenceLayer):
    """`y[t] = x[t + n]`: drops the first n frames (the last n are invalid).

    Step-wise it passes frames through but marks the first n invalid (they are
    the `output_latency` outputs to drop). State: frames seen `[b]` int32.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Frames of lookahead.
        length: int = 2
        name: str | None = None

        def make(self) -> ToyLookahead:
            return ToyLookahead(self, name=self.name)

    config: Config

    @property
    def output_latency(self) -> int:
        return self.config.length

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return {0: (self.config.length, self.config.length)}

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        n = self.config.length
        return x[:, n:].pad_time(0, min(n, x.shape[1]), valid=False)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: types.ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> types.State:
        return jnp.zeros((batch_size,), jnp.int32)

    def leading_mask(self, x: Sequence, state: Any) -> jax.Array:
        """True for frames at or after position n of the stream."""
        positions = state[:, None] + jnp.arange(x.shape[1])[None, :]
        return positions >= self.config.length

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        mask = x.mask & self.leading_mask(x, state)
        return Sequence(x.values, mask).mask_invalid(), state + x.shape[1]
