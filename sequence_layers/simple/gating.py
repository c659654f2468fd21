"""Gated units: split the last channel axis in halves `(feature, gate)` and
return `f(feature) * g(gate)`, so `[b, t, ..., 2c] -> [b, t, ..., c]`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import Sequence
from sequence_layers.simple._common import CheckedStep

__all__ = ["GatedLinearUnit", "GatedTanhUnit", "GatedUnit"]

Activation = Callable[[jax.Array], jax.Array] | None


class GatedUnit(CheckedStep, types.PreservesType, types.Stateless):
    """`feature_activation(x[..., :c]) * gate_activation(x[..., c:])`; a None
    activation is the identity."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Applied to the first half of the channels (None: identity).
        feature_activation: Activation
        # Applied to the second half of the channels (None: identity).
        gate_activation: Activation
        # Optional layer name.
        name: str | None = None

        def make(self) -> GatedUnit:
            return GatedUnit(self, name=self.name)

    config: Config

    @property
    def _activations(self) -> tuple[Activation, Activation]:
        return self.config.feature_activation, self.config.gate_activation

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        if not input_shape or input_shape[-1] % 2:
            raise ValueError(
                f"{type(self).__name__} needs an even last channel dimension to split "
                f"into feature and gate halves, got input channel shape {tuple(input_shape)}."
            )
        return (*input_shape[:-1], input_shape[-1] // 2)

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self.get_output_shape(x.channel_shape)
        feature, gate = jnp.split(x.values, 2, axis=-1)
        feature_activation, gate_activation = self._activations
        if feature_activation is not None:
            feature = feature_activation(feature)
        if gate_activation is not None:
            gate = gate_activation(gate)
        return Sequence(feature * gate, x.mask)


class GatedLinearUnit(GatedUnit):
    """GLU: `x[..., :c] * sigmoid(x[..., c:])`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Optional layer name.
        name: str | None = None

        def make(self) -> GatedLinearUnit:
            return GatedLinearUnit(self, name=self.name)

    config: Config  # type: ignore[assignment]

    @property
    def _activations(self) -> tuple[Activation, Activation]:
        return None, jax.nn.sigmoid


class GatedTanhUnit(GatedUnit):
    """GTU: `tanh(x[..., :c]) * sigmoid(x[..., c:])`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Optional layer name.
        name: str | None = None

        def make(self) -> GatedTanhUnit:
            return GatedTanhUnit(self, name=self.name)

    config: Config  # type: ignore[assignment]

    @property
    def _activations(self) -> tuple[Activation, Activation]:
        return jnp.tanh, jax.nn.sigmoid
