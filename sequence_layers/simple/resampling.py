"""Time resampling by whole factors: `Downsample1D` keeps every `rate`-th
frame, `Upsample1D` / `Upsample2D` repeat frames (and channels)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as PySequence
from fractions import Fraction

import flax.linen as nn
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import Sequence
from sequence_layers.simple._common import CheckedStep

__all__ = ["Downsample1D", "Upsample1D", "Upsample2D"]


def _check_rate(layer_name: str, rate: int) -> None:
    if not isinstance(rate, int) or rate < 1:
        raise ValueError(f"{layer_name} needs an integer rate >= 1, got {rate=}.")


class Downsample1D(CheckedStep, types.PreservesType, types.PreservesShape, types.Stateless):
    """Keeps frames `0, rate, 2*rate, ...`: `[b, t, ...] -> [b, ceil(t / rate), ...]`.

    Steps blocks of `rate` frames (output ratio `1/rate`), keeping each
    block's first frame. Input latency `rate - 1` (as the reference), output
    latency 0; output `j` reads input `j * rate` only.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Keep one frame in `rate`.
        rate: int
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            _check_rate("Downsample1D", self.rate)

        def make(self) -> Downsample1D:
            return Downsample1D(self, name=self.name)

    config: Config

    @property
    def block_size(self) -> int:
        return self.config.rate

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(1, self.config.rate)

    @property
    def input_latency(self) -> int:
        return self.config.rate - 1

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        return x[:, :: self.config.rate]


class Upsample1D(CheckedStep, types.PreservesType, types.PreservesShape, types.Stateless):
    """Repeats every frame `rate` times: `[b, t, ...] -> [b, t * rate, ...]`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Copies of each frame.
        rate: int
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            _check_rate("Upsample1D", self.rate)

        def make(self) -> Upsample1D:
            return Upsample1D(self, name=self.name)

    config: Config

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(self.config.rate)

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return {s: (0, 0) for s in range(self.config.rate)}

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        rate = self.config.rate
        return type(x)(jnp.repeat(x.values, rate, axis=1), jnp.repeat(x.mask, rate, axis=1))


class Upsample2D(CheckedStep, types.PreservesType, types.Stateless):
    """Repeats frames `rate[0]` times and the first channel axis `rate[1]`
    times: `[b, t, h, c] -> [b, t * rate[0], h * rate[1], c]`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # (time rate, first-channel-axis rate); an int means both.
        rate: int | PySequence[int]
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            rate = (self.rate, self.rate) if isinstance(self.rate, int) else tuple(self.rate)
            if len(rate) != 2:
                raise ValueError(f"Upsample2D rate must be an int or a pair, got {self.rate=}.")
            for r in rate:
                _check_rate("Upsample2D", r)
            object.__setattr__(self, "rate", rate)

        def make(self) -> Upsample2D:
            return Upsample2D(self, name=self.name)

    config: Config

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(self.config.rate[0])

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return {s: (0, 0) for s in range(self.config.rate[0])}

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        if len(input_shape) != 2:
            raise ValueError(
                f"Upsample2D needs a [b, t, h, c] input, got channel shape {tuple(input_shape)}."
            )
        return (input_shape[0] * self.config.rate[1], input_shape[1])

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self.get_output_shape(x.channel_shape)
        time_rate, height_rate = self.config.rate
        values = jnp.repeat(jnp.repeat(x.values, time_rate, axis=1), height_rate, axis=2)
        return type(x)(values, jnp.repeat(x.mask, time_rate, axis=1))
