"""Random layers: `Dropout` and `AddNoise`. Both draw from a Flax RNG stream
on every call and are the identity when not training (AddNoise only with
`training_only=True`), which is when step == layer holds."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence as PySequence
from typing import Any

import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import ChannelSpec, Sequence
from sequence_layers.simple._common import CheckedStep, normalize_axes

__all__ = ["AddNoise", "Dropout"]


class Dropout(CheckedStep, types.PreservesType, types.StatelessPointwise):
    """Zeroes each value with probability `rate` and scales the rest by
    `1 / (1 - rate)` when training; the identity otherwise.

    Needs the `rng_collection` RNG (default `'dropout'`) when training, e.g.
    `module.apply(variables, x, training=True, rngs={'dropout': key})`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Probability of dropping each value, in [0, 1].
        rate: float = 0.0
        # Axes of `[b, t, ...]` along which one draw is shared (e.g. (1,) drops
        # the same channels in every frame).
        broadcast_dims: PySequence[int] = ()
        # Flax RNG stream to draw from.
        rng_collection: str = "dropout"
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "broadcast_dims", normalize_axes(self.broadcast_dims))
            if not 0.0 <= self.rate <= 1.0:
                raise ValueError(f"Dropout rate must be in [0, 1], got {self.rate=}.")

        def make(self) -> Dropout:
            return Dropout(self, name=self.name)

    config: Config

    def _dropout(self, values: jax.Array, training: bool) -> jax.Array:
        rate = self.config.rate
        if not training or rate == 0.0:
            return values
        if rate == 1.0:
            # Avoids 0 / 0 in the scale (and NaN gradients).
            return jnp.zeros_like(values)
        shape = list(values.shape)
        for axis in self.config.broadcast_dims:
            shape[axis] = 1
        keep = jax.random.bernoulli(self.make_rng(self.config.rng_collection), 1.0 - rate, shape)
        keep = jnp.broadcast_to(keep, values.shape)
        if jnp.issubdtype(values.dtype, jnp.inexact):
            scale = jnp.asarray(1.0 / (1.0 - rate), values.dtype)
            return jnp.where(keep, values * scale, jnp.zeros_like(values))
        return jnp.where(keep, values, jnp.zeros_like(values))

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        # Dropping only writes zeros: masked inputs stay masked.
        return x.apply_values_masked(self._dropout, training)

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        if training and self.config.rate > 0.0:
            raise ValueError(
                "Dropout cannot step with training=True: per-block draws would not match "
                "layer(). Step with training=False, or train layer-wise."
            )
        return self.layer(x, training=training, constants=constants), state


class AddNoise(CheckedStep, types.PreservesType, types.StatelessPointwise):
    """Adds noise from `sampler` to every value (valid or not).

    With `training_only=True` it is the identity unless training. Draws from
    the `rng_collection` stream (default `'params'`).
    """

    class NoiseSampler(abc.ABC):
        """Draws noise of a given shape and dtype."""

        @abc.abstractmethod
        def sample(self, spec: ChannelSpec, rng: jax.Array) -> jax.Array: ...

    @dataclasses.dataclass(frozen=True)
    class Uniform(NoiseSampler):
        """Uniform in [minval, maxval)."""

        minval: float
        maxval: float

        def sample(self, spec: ChannelSpec, rng: jax.Array) -> jax.Array:
            lo, hi = jnp.asarray(self.minval, spec.dtype), jnp.asarray(self.maxval, spec.dtype)
            return jax.random.uniform(rng, spec.shape, spec.dtype, lo, hi)

    @dataclasses.dataclass(frozen=True)
    class Normal(NoiseSampler):
        """Gaussian with `mean` and `stddev`."""

        mean: float
        stddev: float

        def sample(self, spec: ChannelSpec, rng: jax.Array) -> jax.Array:
            noise = jax.random.normal(rng, spec.shape, spec.dtype)
            return noise * jnp.asarray(self.stddev, spec.dtype) + jnp.asarray(self.mean, spec.dtype)

    @dataclasses.dataclass(frozen=True)
    class TruncatedNormal(NoiseSampler):
        """Gaussian truncated to +-2 standard deviations."""

        mean: float
        stddev: float

        def sample(self, spec: ChannelSpec, rng: jax.Array) -> jax.Array:
            noise = jax.random.truncated_normal(rng, -2.0, 2.0, spec.shape, spec.dtype)
            return noise * jnp.asarray(self.stddev, spec.dtype) + jnp.asarray(self.mean, spec.dtype)

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Draws the noise (AddNoise.Uniform, .Normal or .TruncatedNormal).
        sampler: Any
        # Only add noise when training.
        training_only: bool
        # Flax RNG stream to draw from.
        rng_collection: str = "params"
        # Optional layer name.
        name: str | None = None

        def make(self) -> AddNoise:
            return AddNoise(self, name=self.name)

    config: Config

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        if self.config.training_only and not training:
            return x
        rng = self.make_rng(self.config.rng_collection)
        noise = self.config.sampler.sample(ChannelSpec(x.shape, x.dtype), rng)
        return Sequence(x.values + noise, x.mask)
