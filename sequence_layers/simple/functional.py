"""`Lambda`: wraps a user function as a stateless layer."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import MASK_DTYPE, ChannelSpec, Sequence
from sequence_layers.simple._common import CheckedStep

__all__ = ["Lambda"]


class Lambda(CheckedStep, types.Stateless):
    """Applies `fn` to the values `[b, t, ...]` (or, with `sequence_input`, to
    the whole `Sequence`). `fn` must be pure and act on each frame on its own
    (receptive field (0, 0)); it may change the channel shape and dtype but
    not batch or time.

    Example:
        >>> layer = Lambda.Config(lambda v: v * 2, mask_required=False).make()
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # `values -> values`, or `Sequence -> Sequence` with `sequence_input`.
        fn: Callable[[Any], Any]
        # `fn` takes and returns a Sequence.
        sequence_input: bool = False
        # Whether `fn` may turn zero (invalid) frames non-zero; if False a
        # masked input stays masked.
        mask_required: bool = True
        # Input spec used by `get_output_shape` / `get_output_dtype`, which
        # see only half of it (`get_output_spec` needs none).
        expected_input_spec: ChannelSpec | None = None
        # Optional layer name.
        name: str | None = None

        def make(self) -> Lambda:
            return Lambda(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_spec(
        self, input_spec: ChannelSpec, *, constants: types.Constants | None = None
    ) -> ChannelSpec:
        values = jax.ShapeDtypeStruct((1, 1, *input_spec.shape), input_spec.dtype)
        if self.config.sequence_input:
            mask = jax.ShapeDtypeStruct((1, 1), MASK_DTYPE)
            out = jax.eval_shape(lambda v, m: self.config.fn(Sequence(v, m)).values, values, mask)
        else:
            out = jax.eval_shape(self.config.fn, values)
        return ChannelSpec(tuple(out.shape[2:]), out.dtype)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        # The shape rarely depends on the dtype; without an expected spec,
        # probe with float32.
        spec = self.config.expected_input_spec
        dtype = spec.dtype if spec is not None else jnp.float32
        return tuple(self.get_output_spec(ChannelSpec(tuple(input_shape), dtype)).shape)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        spec = self.config.expected_input_spec
        if spec is None:
            raise ValueError(
                "Lambda.get_output_dtype needs Config.expected_input_spec (the output dtype "
                "may depend on the input shape); or call get_output_spec(input_spec)."
            )
        return self.get_output_spec(ChannelSpec(tuple(spec.shape), input_dtype)).dtype

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        if self.config.sequence_input:
            y = self.config.fn(x)
            values, mask = y.values, y.mask
        else:
            values, mask = self.config.fn(x.values), x.mask
        if tuple(values.shape[:2]) != tuple(x.shape[:2]):
            raise ValueError(
                f"Lambda fn={self.config.fn} must keep batch and time: input {x.shape} gave "
                f"output {values.shape}."
            )
        if self.config.sequence_input:
            return y
        return type(x)(values, mask) if not self.config.mask_required else Sequence(values, mask)
