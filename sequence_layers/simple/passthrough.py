"""Layers that pass their input through unchanged, adding a side effect:
masking, gradient control, sharding, checkpoint names, logging, emits."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np

from sequence_layers import types
from sequence_layers.sequence import ChannelSpec, Sequence
from sequence_layers.simple._common import CheckedStep, Sharding, as_tuple, shard

__all__ = [
    "ApplySharding",
    "CheckpointName",
    "Emit",
    "GradientClipping",
    "Identity",
    "Logging",
    "MaskInvalid",
    "NamedEmit",
    "OptimizationBarrier",
    "StopGradient",
]

_logger = logging.getLogger("sequence_layers")


class Identity(CheckedStep, types.PreservesType, types.StatelessPointwise):
    """Returns its input `[b, t, ...]` unchanged."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Optional layer name.
        name: str | None = None

        def make(self) -> Identity:
            return Identity(self, name=self.name)

    config: Config

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        return x


class MaskInvalid(CheckedStep, types.PreservesType, types.StatelessPointwise):
    """Zeroes invalid frames, returning a `MaskedSequence`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Optional layer name.
        name: str | None = None

        def make(self) -> MaskInvalid:
            return MaskInvalid(self, name=self.name)

    config: Config

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        return x.mask_invalid()


class StopGradient(CheckedStep, types.PreservesType, types.StatelessPointwise):
    """Identity on values; no gradient flows back through it."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Optional layer name.
        name: str | None = None

        def make(self) -> StopGradient:
            return StopGradient(self, name=self.name)

    config: Config

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        return x.apply_values_masked(jax.lax.stop_gradient)


def _clip_gradient(values: jax.Array, clip_value: float) -> jax.Array:
    @jax.custom_vjp
    def identity(v: jax.Array) -> jax.Array:
        return v

    def fwd(v: jax.Array) -> tuple[jax.Array, None]:
        return v, None

    def bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
        return (jnp.clip(g, -clip_value, clip_value),)

    identity.defvjp(fwd, bwd)
    return identity(values)


class GradientClipping(CheckedStep, types.PreservesType, types.StatelessPointwise):
    """Identity on values; the gradient is clipped to `[-clip_value, clip_value]`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Bound on the absolute value of each gradient element; must be > 0.
        clip_value: float
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            if not self.clip_value > 0:
                raise ValueError(f"GradientClipping needs clip_value > 0, got {self.clip_value=}.")

        def make(self) -> GradientClipping:
            return GradientClipping(self, name=self.name)

    config: Config

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        return x.apply_values_masked(_clip_gradient, self.config.clip_value)


class OptimizationBarrier(CheckedStep, types.PreservesType, types.StatelessPointwise):
    """Identity wrapped in `jax.lax.optimization_barrier` (blocks XLA from
    moving computation across this point)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Also put the mask behind the barrier.
        apply_to_mask: bool = False
        # Optional layer name.
        name: str | None = None

        def make(self) -> OptimizationBarrier:
            return OptimizationBarrier(self, name=self.name)

    config: Config

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        values = jax.lax.optimization_barrier(x.values)
        mask = jax.lax.optimization_barrier(x.mask) if self.config.apply_to_mask else x.mask
        return type(x)(values, mask)


class ApplySharding(CheckedStep, types.PreservesType, types.StatelessPointwise):
    """Identity with sharding constraints on values and mask (no-op without an
    active mesh)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Mesh axis names per dimension of the values `[b, t, ...]`.
        values_sharding: Sharding = None
        # Mesh axis names for the mask `[b, t]`; defaults to the first two of
        # `values_sharding`.
        mask_sharding: Sharding = None
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "values_sharding", as_tuple(self.values_sharding))
            object.__setattr__(self, "mask_sharding", as_tuple(self.mask_sharding))

        def make(self) -> ApplySharding:
            return ApplySharding(self, name=self.name)

    config: Config

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        values_sharding = self.config.values_sharding
        mask_sharding = self.config.mask_sharding
        if values_sharding is not None and mask_sharding is None:
            mask_sharding = values_sharding[:2]
        return type(x)(shard(x.values, values_sharding), shard(x.mask, mask_sharding))


class CheckpointName(CheckedStep, types.PreservesType, types.StatelessPointwiseFunctor):
    """Tags the values with `jax.ad_checkpoint.checkpoint_name`, so a remat
    policy can save or recompute them by name."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The name remat policies refer to.
        checkpoint_name: str
        # Optional layer name.
        name: str | None = None

        def make(self) -> CheckpointName:
            return CheckpointName(self, name=self.name)

    config: Config

    @property
    def mask_required(self) -> bool:
        return False

    @nn.nowrap
    def fn(self, values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jax.ad_checkpoint.checkpoint_name(values, self.config.checkpoint_name), mask


def _as_spec(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array | np.ndarray):
        return ChannelSpec(leaf.shape, leaf.dtype)
    return leaf


class Logging(CheckedStep, types.PreservesType, types.StatelessPointwise):
    """Identity that logs (Python `logging`, logger `sequence_layers`, level
    INFO) the arguments of `layer`, `step` and `get_initial_state`.

    By default only shapes and dtypes are logged, at trace time; with
    `dump_tensors=True` the values are logged at run time through
    `jax.debug.callback`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Text put in front of every message (`{prefix}` in the formats).
        prefix: str = ""
        # Log array values at run time instead of shapes at trace time.
        dump_tensors: bool = False
        _: dataclasses.KW_ONLY
        # Message format for `layer`.
        layer_format_str: str = (
            "{prefix} layer():\n\tx={x}\n\ttraining={training}\n\tconstants={constants}"
        )
        # Message format for `get_initial_state`.
        get_initial_state_format_str: str = (
            "{prefix} get_initial_state():\n\tbatch_size={batch_size}\n\t"
            "input_spec={input_spec}\n\ttraining={training}\n\tconstants={constants}"
        )
        # Message format for `step`.
        step_format_str: str = (
            "{prefix} step():\n\tx={x}\n\tstate={state}\n\ttraining={training}\n\t"
            "constants={constants}"
        )
        # Optional layer name.
        name: str | None = None

        def make(self) -> Logging:
            return Logging(self, name=self.name)

    config: Config

    @nn.nowrap
    def _log(self, format_str: str, **kwargs: Any) -> None:
        prefix = self.config.prefix
        if not self.config.dump_tensors:
            kwargs = jax.tree.map(_as_spec, kwargs)
            _logger.info(format_str.format(prefix=prefix, **kwargs))
            return
        # jax.debug.callback only carries arrays; everything else is formatted
        # in directly.
        static = {k: v for k, v in kwargs.items() if not _is_array_tree(v)}
        dynamic = {k: v for k, v in kwargs.items() if k not in static}

        def callback(**values: Any) -> None:
            _logger.info(format_str.format(prefix=prefix, **static, **values))

        jax.debug.callback(callback, **dynamic)

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self._log(self.config.layer_format_str, x=x, training=training, constants=constants)
        return x

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> types.State:
        self._log(
            self.config.get_initial_state_format_str,
            batch_size=batch_size,
            input_spec=input_spec,
            training=training,
            constants=constants,
        )
        return ()

    @types.check_step
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        self._log(
            self.config.step_format_str, x=x, state=state, training=training, constants=constants
        )
        return x, state


def _is_array_tree(value: Any) -> bool:
    leaves = jax.tree.leaves(value)
    return bool(leaves) and all(isinstance(v, jax.Array | np.ndarray) for v in leaves)


class Emit(types.PreservesType, types.PreservesShape, types.StatelessEmitting):
    """Identity that also emits its input: emits = `x`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Optional layer name.
        name: str | None = None

        def make(self) -> Emit:
            return Emit(self, name=self.name)

    config: Config

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> tuple[Sequence, types.Emits]:
        return x, x

    @types.check_step_with_emits
    def step_with_emits(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State, types.Emits]:
        return x, state, x


class NamedEmit(types.PreservesType, types.PreservesShape, types.StatelessEmitting):
    """Identity that also emits its input as `{emit_name: x}`."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Key of the input in the emits dict.
        emit_name: str
        # Optional layer name.
        name: str | None = None

        def make(self) -> NamedEmit:
            return NamedEmit(self, name=self.name)

    config: Config

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> tuple[Sequence, types.Emits]:
        return x, {self.config.emit_name: x}

    @types.check_step_with_emits
    def step_with_emits(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State, types.Emits]:
        return x, state, {self.config.emit_name: x}
