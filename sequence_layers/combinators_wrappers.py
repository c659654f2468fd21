"""Combinators around one child (or a forward/backward pair): `Repeat`,
`CheckpointGradient`, `Blockwise`, `ParallelChannels`, `Bidirectional`.

Re-exported from `sequence_layers.combinators`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sequence_layers import types, utils
from sequence_layers.combinators_common import (
    CombinationMode,
    as_combination_mode,
    child_constants,
    combine_output_dtype,
    combine_output_shape,
    combine_sequences,
    mirror_receptive_field_per_step,
    split_channels,
)
from sequence_layers.sequence import ChannelSpec, MaskedSequence, Sequence
from sequence_layers.types import Constants, Emits, ReceptiveField, SequenceLayer, State

__all__ = ["Bidirectional", "Blockwise", "CheckpointGradient", "ParallelChannels", "Repeat"]


class _WrapperProperties(SequenceLayer):
    """Structural properties and output spec equal to the child's
    (`self.config.<child_field>`)."""

    _child_field = "child_layer"

    def _child(self) -> SequenceLayer:
        return types.detached(getattr(self.config, self._child_field))  # type: ignore[attr-defined]

    @property
    def supports_step(self) -> bool:
        return self._child().supports_step

    @property
    def block_size(self) -> int:
        return self._child().block_size

    @property
    def output_ratio(self) -> Fraction:
        return self._child().output_ratio

    @property
    def input_latency(self) -> int:
        return self._child().input_latency

    @property
    def output_latency(self) -> int:
        return self._child().output_latency

    def get_accumulated_input_latency(self, input_latency: int) -> int:
        return self._child().get_accumulated_input_latency(input_latency)

    def get_accumulated_output_latency(self, output_latency: int) -> int:
        return self._child().get_accumulated_output_latency(output_latency)

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return self._child().receptive_field_per_step

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        return tuple(self._child().get_output_shape(input_shape, constants=constants))

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return self._child().get_output_dtype(input_dtype)


# Repeat -------------------------------------------------------------------


class _StackedSequence(flax.struct.PyTreeNode):
    """A `Sequence` inside a `Repeat` state or emits, stacked on a repeats
    axis. `Sequence` insists on a `[b, t]` mask, so stacked ones travel as
    this unvalidated node and become `Sequence`s again per repeat."""

    values: jax.Array
    mask: jax.Array
    masked: bool = flax.struct.field(pytree_node=False, default=False)


def _is_sequence(x: Any) -> bool:
    return isinstance(x, Sequence | _StackedSequence)


def _to_stackable(tree: Any) -> Any:
    def convert(x: Any) -> Any:
        if isinstance(x, Sequence):
            return _StackedSequence(x.values, x.mask, isinstance(x, MaskedSequence))
        return x

    return jax.tree.map(convert, tree, is_leaf=_is_sequence)


def _from_stackable(tree: Any) -> Any:
    def convert(x: Any) -> Any:
        if isinstance(x, _StackedSequence):
            return (MaskedSequence if x.masked else Sequence)(x.values, x.mask)
        return x

    return jax.tree.map(convert, tree, is_leaf=_is_sequence)


def _unstack(tree: Any, n: int, axis: int) -> tuple[Any, ...]:
    return tuple(
        _from_stackable(jax.tree.map(lambda a, i=i: jnp.take(a, i, axis=axis), tree))
        for i in range(n)
    )


class Repeat(types.Emitting):
    """Applies `layer` `num_repeats` times in a loop (`nn.scan`), compiling it
    once. `[b, t, *c] -> [b, t, *c]`.

    The child must have output ratio 1 and preserve its input's shape and
    dtype. Its parameters live under `child_layer`, each stacked on a leading
    `num_repeats` axis. Latencies fold the child's `num_repeats` times (three
    `reverse_causal` k=3 convs: 6, where the reference reports 4).

    State: the child's state with every leaf stacked on axis 1, i.e.
    `[b, num_repeats, ...]`, so it stays batch-major like every other state.
    `Sequence` buffers in it are carried as `_StackedSequence` nodes (same
    `values` / `mask` fields). Emits: a tuple with one entry per repeat.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The layer to repeat; ratio 1, same output shape and dtype as input.
        layer: types.SequenceLayerConfig
        # How many times to apply it (each with its own parameters).
        num_repeats: int
        # Recompute each repeat's activations in the backward pass (saves memory).
        remat: bool = False
        # Unroll the loop fully in layer(): faster to run, slower to compile.
        unroll_layer: bool = False
        # Unroll the loop fully in step().
        unroll_step: bool = False
        # Optional name of the layer.
        name: str | None = None

        def __post_init__(self) -> None:
            if not isinstance(self.layer, types.SequenceLayerConfig):
                raise TypeError(f"Repeat.Config.layer must be a layer config, got {self.layer!r}.")
            if self.num_repeats < 1:
                raise ValueError(f"Repeat needs num_repeats >= 1, got {self.num_repeats}.")

        def make(self) -> Repeat:
            return Repeat(self, name=self.name)

    config: Config

    def setup(self) -> None:
        ratio = self._child().output_ratio
        if ratio != 1:
            raise ValueError(
                f"Repeat needs a child with output_ratio 1 (its output feeds its input), "
                f"got {ratio} from {self.config.layer}."
            )
        self.child_layer = self.config.layer.make()

    def _child(self) -> SequenceLayer:
        return types.detached(self.config.layer)

    def _copies(self) -> list[SequenceLayer]:
        return [self._child()] * self.config.num_repeats

    @property
    def supports_step(self) -> bool:
        return self._child().supports_step

    @property
    def block_size(self) -> int:
        return utils.serial_block_size(self._copies())

    @property
    def output_ratio(self) -> Fraction:
        return utils.serial_output_ratio(self._copies())

    @property
    def input_latency(self) -> int:
        return utils.serial_input_latency(self._copies())

    @property
    def output_latency(self) -> int:
        return utils.serial_output_latency(self._copies())

    def get_accumulated_input_latency(self, input_latency: int) -> int:
        for child in self._copies():
            input_latency = child.get_accumulated_input_latency(input_latency)
        return input_latency

    def get_accumulated_output_latency(self, output_latency: int) -> int:
        for child in self._copies():
            output_latency = child.get_accumulated_output_latency(output_latency)
        return output_latency

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return utils.serial_receptive_field_per_step(self._copies())

    @nn.nowrap
    def _check_spec(self, input_spec: ChannelSpec, constants: Constants | None) -> None:
        out = self._child().get_output_spec(input_spec, constants=constants)
        if tuple(out.shape) != tuple(input_spec.shape) or out.dtype != input_spec.dtype:
            raise ValueError(
                f"Repeat's child must map its input spec to itself (its output is the next "
                f"repeat's input): input {tuple(input_spec.shape)} {input_spec.dtype}, output "
                f"{tuple(out.shape)} {out.dtype}. Project inside the repeated layer."
            )

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        out = tuple(self._child().get_output_shape(input_shape, constants=constants))
        if out != tuple(input_shape):
            raise ValueError(
                f"Repeat's child must preserve the channel shape: {tuple(input_shape)} -> {out}."
            )
        return out

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return input_dtype

    def _scan(self, fn: Callable[..., Any], in_axes: Any, out_axes: Any, unroll: bool) -> Any:
        if self.config.remat:
            # Inside a scan, CSE cannot merge the recomputation away.
            fn = nn.remat(fn, prevent_cse=False)
        return nn.scan(
            fn,
            variable_axes={True: 0},
            variable_broadcast=False,
            # Fresh parameters per repeat at init; per-repeat dropout noise.
            split_rngs={"params": self.is_initializing(), nn.DenyList(("params",)): True},
            in_axes=in_axes,
            out_axes=out_axes,
            length=self.config.num_repeats,
            unroll=self.config.num_repeats if unroll else 1,
            metadata_params={nn.PARTITION_NAME: None},
        )

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        self._check_spec(x.channel_spec, constants)

        def body(child: SequenceLayer, carry: Sequence, _: Any) -> tuple[Sequence, Emits]:
            y, emits = child.layer_with_emits(
                carry, training=training, constants=child_constants(constants)
            )
            # The carry's pytree type must not change between iterations.
            return y.unmask(), _to_stackable(emits)

        scan = self._scan(body, in_axes=0, out_axes=0, unroll=self.config.unroll_layer)
        y, emits = scan(self.child_layer, x.unmask(), None)
        return y, _unstack(emits, self.config.num_repeats, axis=0)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        self._check_spec(input_spec, constants)

        def body(child: SequenceLayer, carry: Any, _: Any) -> tuple[Any, State]:
            state = child.get_initial_state(
                batch_size, input_spec, training=training, constants=child_constants(constants)
            )
            return carry, _to_stackable(state)

        _, state = self._scan(body, in_axes=0, out_axes=1, unroll=False)(self.child_layer, (), None)
        return state

    @types.check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        self._check_spec(x.channel_spec, constants)

        def body(
            child: SequenceLayer, carry: Sequence, child_state: State
        ) -> tuple[Sequence, tuple[State, Emits]]:
            y, child_state, emits = child.step_with_emits(
                carry,
                _from_stackable(child_state),
                training=training,
                constants=child_constants(constants),
            )
            return y.unmask(), (_to_stackable(child_state), _to_stackable(emits))

        scan = self._scan(body, in_axes=1, out_axes=1, unroll=self.config.unroll_step)
        y, (state, emits) = scan(self.child_layer, x.unmask(), state)
        return y, state, _unstack(emits, self.config.num_repeats, axis=1)


# CheckpointGradient --------------------------------------------------------


class CheckpointGradient(_WrapperProperties, types.Emitting):
    """Runs `layer` under a gradient checkpoint (`nn.remat`): its activations
    are recomputed in the backward pass instead of stored. Same outputs,
    properties and state as the child, whose parameters sit under
    `child_layer`."""

    _child_field = "layer"

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The layer to checkpoint.
        layer: types.SequenceLayerConfig
        # Prevent XLA from merging the recomputation away; unneeded inside a scan.
        prevent_cse: bool = True
        # A jax.checkpoint policy (what may be saved); None recomputes everything.
        policy: Callable[..., bool] | None = None
        # Optional name of the layer.
        name: str | None = None

        def make(self) -> CheckpointGradient:
            return CheckpointGradient(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.child_layer = self.config.layer.make()

    def _checkpoint(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return nn.checkpoint(fn, prevent_cse=self.config.prevent_cse, policy=self.config.policy)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        return self.child_layer.get_initial_state(
            batch_size, input_spec, training=training, constants=constants
        )

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        def run(child: SequenceLayer, x: Sequence, constants: Constants | None) -> Any:
            return child.layer_with_emits(x, training=training, constants=constants)

        return self._checkpoint(run)(self.child_layer, x, constants)

    @types.check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        def run(child: SequenceLayer, x: Sequence, state: State, constants: Any) -> Any:
            return child.step_with_emits(x, state, training=training, constants=constants)

        return self._checkpoint(run)(self.child_layer, x, state, constants)


# Blockwise ---------------------------------------------------------------


class Blockwise(_WrapperProperties, types.Emitting):
    """`child_layer` stepped in blocks of `block_size` frames (a multiple of
    the child's own block size). Only `block_size` changes; the child's
    parameters sit directly in this layer's scope."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The wrapped layer.
        child_layer: types.SequenceLayerConfig
        # Frames per step; a multiple of the child's block size.
        block_size: int
        # Optional name of the layer.
        name: str | None = None

        def __post_init__(self) -> None:
            child_block = types.detached(self.child_layer).block_size
            if self.block_size < 1 or self.block_size % child_block:
                raise ValueError(
                    f"Blockwise block_size={self.block_size} must be a positive multiple of "
                    f"the child's block_size={child_block}."
                )

        def make(self) -> Blockwise:
            return Blockwise(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.child_layer = self.config.child_layer.make()
        nn.share_scope(self, self.child_layer)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        return self.child_layer.get_initial_state(
            batch_size, input_spec, training=training, constants=constants
        )

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        return self.child_layer.layer_with_emits(x, training=training, constants=constants)

    @types.check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        return self.child_layer.step_with_emits(x, state, training=training, constants=constants)


# ParallelChannels ----------------------------------------------------------


class ParallelChannels(_WrapperProperties, types.Emitting):
    """Splits the last channel axis into `num_groups` equal groups, runs
    `child_layer` (one set of parameters, in this layer's scope) on each and
    combines the results: `[b, t, ..., c] -> [b, t * ratio, *combined]`. Like
    a grouped convolution, for any layer. State and emits: one per group."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The layer applied to every channel group.
        child_layer: types.SequenceLayerConfig
        # Number of groups; must divide the input's last channel dimension.
        num_groups: int
        # How group outputs are merged.
        combination: CombinationMode = CombinationMode.STACK
        # Optional name of the layer.
        name: str | None = None

        def __post_init__(self) -> None:
            if self.num_groups < 1:
                raise ValueError(f"ParallelChannels needs num_groups >= 1, got {self.num_groups}.")
            object.__setattr__(self, "combination", as_combination_mode(self.combination))

        def make(self) -> ParallelChannels:
            return ParallelChannels(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.child_layer = self.config.child_layer.make()
        nn.share_scope(self, self.child_layer)

    @nn.nowrap
    def _group_shape(self, input_shape: types.ShapeLike) -> tuple[int, ...]:
        shape = tuple(input_shape)
        groups = self.config.num_groups
        if not shape or shape[-1] % groups:
            raise ValueError(
                f"ParallelChannels needs a last channel dimension divisible by num_groups="
                f"{groups}, got channel shape {shape}."
            )
        return (*shape[:-1], shape[-1] // groups)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        group = tuple(
            self._child().get_output_shape(self._group_shape(input_shape), constants=constants)
        )
        return combine_output_shape(self.config.combination, [group] * self.config.num_groups)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        spec = ChannelSpec(self._group_shape(input_spec.shape), input_spec.dtype)
        state = self.child_layer.get_initial_state(
            batch_size, spec, training=training, constants=constants
        )
        return (state,) * self.config.num_groups

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        self._group_shape(x.channel_shape)
        ys, emits = [], []
        for x_group in split_channels(x, self.config.num_groups):
            y, e = self.child_layer.layer_with_emits(
                x_group, training=training, constants=child_constants(constants)
            )
            ys.append(y)
            emits.append(e)
        return combine_sequences(self.config.combination, ys), tuple(emits)

    @types.check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        self._group_shape(x.channel_shape)
        ys, states, emits = [], [], []
        groups = split_channels(x, self.config.num_groups)
        for x_group, group_state in zip(groups, state, strict=True):
            y, group_state, e = self.child_layer.step_with_emits(
                x_group, group_state, training=training, constants=child_constants(constants)
            )
            ys.append(y)
            states.append(group_state)
            emits.append(e)
        return combine_sequences(self.config.combination, ys), tuple(states), tuple(emits)


# Bidirectional -------------------------------------------------------------


class Bidirectional(types.Emitting):
    """Runs `forward` on the input and `backward` on the time-reversed input
    (then reverses its output back), and combines both:
    `[b, t, *c] -> [b, t * ratio, *combined]`.

    The reversal is physical: padding frames at the end come first for the
    backward layer, which must therefore treat invalid frames as absent (as
    masking layers do). Never steppable, since the backward direction needs
    the whole sequence. Emits: `(forward_emits, backward_emits)`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The layer run on the input as is.
        forward: types.SequenceLayerConfig
        # The layer run on the time-reversed input.
        backward: types.SequenceLayerConfig
        # How the two outputs are merged.
        combination: CombinationMode = CombinationMode.STACK
        # Optional name of the layer.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "combination", as_combination_mode(self.combination))
            fwd, bwd = types.detached(self.forward), types.detached(self.backward)
            if fwd.output_ratio != bwd.output_ratio:
                raise ValueError(
                    f"Bidirectional forward and backward need equal output ratios, got "
                    f"forward={fwd.output_ratio} backward={bwd.output_ratio}."
                )

        def make(self) -> Bidirectional:
            return Bidirectional(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.forward = self.config.forward.make()
        self.backward = self.config.backward.make()

    @property
    def supports_step(self) -> bool:
        return False

    @property
    def output_ratio(self) -> Fraction:
        return types.detached(self.config.forward).output_ratio

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return mirror_receptive_field_per_step(
            types.detached(self.config.forward).receptive_field_per_step,
            types.detached(self.config.backward).receptive_field_per_step,
        )

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        shapes = [
            tuple(types.detached(c).get_output_shape(input_shape, constants=constants))
            for c in (self.config.forward, self.config.backward)
        ]
        return combine_output_shape(self.config.combination, shapes)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return combine_output_dtype(
            types.detached(c).get_output_dtype(input_dtype)
            for c in (self.config.forward, self.config.backward)
        )

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        # Returned for API symmetry; step() always raises.
        return (
            self.forward.get_initial_state(
                batch_size, input_spec, training=training, constants=child_constants(constants)
            ),
            self.backward.get_initial_state(
                batch_size, input_spec, training=training, constants=child_constants(constants)
            ),
        )

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        y_fwd, fwd_emits = self.forward.layer_with_emits(
            x, training=training, constants=child_constants(constants)
        )
        y_bwd, bwd_emits = self.backward.layer_with_emits(
            x.reverse_time(), training=training, constants=child_constants(constants)
        )
        y = combine_sequences(self.config.combination, [y_fwd, y_bwd.reverse_time()])
        return y, (fwd_emits, bwd_emits)

    @types.check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        # check_step_with_emits raises first (supports_step is False); this
        # guards direct calls of an undecorated override.
        raise ValueError("Bidirectional does not support step(); use layer().")
