"""Combinators: layers built from other layers.

- `Serial` / `SerialModules`: children one after another.
- `Parallel`: children side by side on the same input, outputs combined.
- `Residual`: `body(x) + shortcut(x)`.
- `Repeat`, `CheckpointGradient`, `Blockwise`, `Bidirectional`,
  `ParallelChannels` live in `combinators_wrappers.py` and are re-exported here.

Structural properties (latency, ratio, block size, receptive field) compose
the children's through the rules in `sequence_layers.utils`, reading them from
`types.detached(child_config)` so they work on unbound modules. Constants
reach every child as a shallow copy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence as PySequence
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from sequence_layers import types, utils
from sequence_layers.combinators_common import (
    CombinationMode,
    as_combination_mode,
    child_constants,
    combine_output_dtype,
    combine_output_shape,
    combine_sequences,
    insert_with_unique_key,
    normalize_share_scope,
    setup_shared_scope,
    tuple_of_configs,
)
from sequence_layers.combinators_wrappers import (
    Bidirectional,
    Blockwise,
    CheckpointGradient,
    ParallelChannels,
    Repeat,
)
from sequence_layers.sequence import ChannelSpec, Sequence
from sequence_layers.types import Constants, Emits, ReceptiveField, SequenceLayer, State

__all__ = [
    "Bidirectional",
    "Blockwise",
    "CheckpointGradient",
    "CombinationMode",
    "Parallel",
    "ParallelChannels",
    "Repeat",
    "Residual",
    "Serial",
    "SerialModules",
]


def _fold_input_latency(layers: PySequence[Any], input_latency: int) -> int:
    # utils.serial_input_latency starts from 0; an enclosing stack's latency
    # must go through each child's own rounding, back to front.
    for layer in reversed(layers):
        input_latency = layer.get_accumulated_input_latency(input_latency)
    return input_latency


def _fold_output_latency(layers: PySequence[Any], output_latency: int) -> int:
    for layer in layers:
        output_latency = layer.get_accumulated_output_latency(output_latency)
    return output_latency


class _SerialBase(types.Emitting):
    """Runs `self.layers` one after another. Subclasses say where the
    structural view of the children comes from (`_structure`). `self.layers`
    (the bound children) is set in `setup()` or is a field."""

    def _structure(self) -> list[Any]:
        raise NotImplementedError

    # Structural properties -----------------------------------------------

    @property
    def supports_step(self) -> bool:
        return all(layer.supports_step for layer in self._structure())

    @property
    def block_size(self) -> int:
        return utils.serial_block_size(self._structure())

    @property
    def output_ratio(self) -> Fraction:
        return utils.serial_output_ratio(self._structure())

    @property
    def input_latency(self) -> int:
        return utils.serial_input_latency(self._structure())

    @property
    def output_latency(self) -> int:
        return utils.serial_output_latency(self._structure())

    def get_accumulated_input_latency(self, input_latency: int) -> int:
        return _fold_input_latency(self._structure(), input_latency)

    def get_accumulated_output_latency(self, output_latency: int) -> int:
        return _fold_output_latency(self._structure(), output_latency)

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return utils.serial_receptive_field_per_step(self._structure())

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        shape = tuple(input_shape)
        for layer in self._structure():
            shape = tuple(layer.get_output_shape(shape, constants=constants))
        return shape

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        dtype = input_dtype
        for layer in self._structure():
            dtype = layer.get_output_dtype(dtype)
        return dtype

    # Running -------------------------------------------------------------

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        states = []
        spec = input_spec
        for layer in self.layers:
            states.append(
                layer.get_initial_state(
                    batch_size, spec, training=training, constants=child_constants(constants)
                )
            )
            spec = layer.get_output_spec(spec, constants=constants)
        return tuple(states)

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        return self._serial_layer(x, training=training, constants=constants)

    @types.check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        return self._serial_step(x, state, training=training, constants=constants)

    def _serial_layer(
        self, x: Sequence, *, training: bool, constants: Constants | None
    ) -> tuple[Sequence, Emits]:
        emits: dict[str, Emits] = {}
        for layer in self.layers:
            x, layer_emits = layer.layer_with_emits(
                x, training=training, constants=child_constants(constants)
            )
            insert_with_unique_key(emits, layer.name, layer_emits)
        return x, emits

    def _serial_step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None
    ) -> tuple[Sequence, State, Emits]:
        if len(state) != len(self.layers):
            raise ValueError(
                f"{type(self).__name__} {self.name!r} got a state with {len(state)} entries "
                f"for {len(self.layers)} layers; use get_initial_state() of this layer."
            )
        emits: dict[str, Emits] = {}
        new_state = []
        for layer, layer_state in zip(self.layers, state, strict=True):
            x, layer_state, layer_emits = layer.step_with_emits(
                x, layer_state, training=training, constants=child_constants(constants)
            )
            new_state.append(layer_state)
            insert_with_unique_key(emits, layer.name, layer_emits)
        return x, tuple(new_state), emits


class Serial(_SerialBase):
    """Runs `layers` one after another: `[b, t, *c] -> [b, t * ratio, *c']`
    with `ratio` the product of the children's ratios.

    Children are named `layers_0`, `layers_1`, ... in the parameter tree
    unless their config sets a name. State is a tuple of the children's
    states; emits a dict keyed by child name (`_1`, `_2` suffixes on clashes).

    Example:
        >>> model = sl.Serial.Config([
        ...     sl.Conv1D.Config(8, kernel_size=3, padding='causal'),
        ...     sl.Relu.Config(),
        ... ]).make()
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The child layers, applied in order.
        layers: PySequence[types.SequenceLayerConfig]
        # Merge these children's parameters into this layer's scope (no
        # `layers_i` level): one bool for all, or one per layer.
        share_scope: bool | PySequence[bool] = False
        # Optional name of the layer (its key in the parameter tree).
        name: str | None = None

        def __post_init__(self) -> None:
            layers = tuple_of_configs(self.layers, "Serial.Config.layers")
            object.__setattr__(self, "layers", layers)
            object.__setattr__(
                self, "share_scope", normalize_share_scope(self.share_scope, len(layers))
            )

        def make(self) -> Serial:
            return Serial(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.layers = [c.make() for c in self.config.layers]
        setup_shared_scope(self, self.layers, self.config.share_scope)

    def _structure(self) -> list[SequenceLayer]:
        return [types.detached(c) for c in self.config.layers]


class SerialModules(_SerialBase):
    """A `Serial` over modules that already exist and are owned elsewhere, e.g.
    an encoder and a decoder built in a parent's `setup()`; it adds no level to
    the parameter tree. Build it in `setup()` as `SerialModules((self.a, self.b))`.
    """

    layers: tuple[SequenceLayer, ...]

    def _structure(self) -> list[SequenceLayer]:
        return list(self.layers)


class Parallel(types.Emitting):
    """Runs every child on the same input and combines the outputs:
    `[b, t, *c] -> [b, t * ratio, *combined]` (see `CombinationMode`).

    Children must have equal output ratios and latencies, or step outputs
    would not line up. A frame is valid where every branch is valid. State is
    a tuple of the children's states; emits a dict keyed by child name.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The branches, all fed the same input.
        layers: PySequence[types.SequenceLayerConfig]
        # How branch outputs are merged: STACK, CONCAT, ADD, MEAN or PRODUCT.
        combination: CombinationMode = CombinationMode.STACK
        # Merge these children's parameters into this layer's scope.
        share_scope: bool | PySequence[bool] = False
        # Optional name of the layer.
        name: str | None = None

        def __post_init__(self) -> None:
            layers = tuple_of_configs(self.layers, "Parallel.Config.layers")
            object.__setattr__(self, "layers", layers)
            object.__setattr__(self, "combination", as_combination_mode(self.combination))
            object.__setattr__(
                self, "share_scope", normalize_share_scope(self.share_scope, len(layers))
            )

        def make(self) -> Parallel:
            return Parallel(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.layers = [c.make() for c in self.config.layers]
        setup_shared_scope(self, self.layers, self.config.share_scope)
        self._check_branches()

    def _structure(self) -> list[SequenceLayer]:
        return [types.detached(c) for c in self.config.layers]

    def _branch_table(self) -> str:
        return ", ".join(
            f"layers[{i}]={type(b).__name__}(ratio={b.output_ratio}, "
            f"input_latency={b.input_latency}, output_latency={b.output_latency})"
            for i, b in enumerate(self._structure())
        )

    def _check_branches(self) -> None:
        branches = self._structure()
        if not branches:
            return
        for what in ("output_ratio", "input_latency", "output_latency"):
            values = {getattr(b, what) for b in branches}
            if len(values) > 1:
                fix = (
                    "Resample the branches to one rate."
                    if what == "output_ratio"
                    else "Add a Delay(n, delay_layer_output=False) to the branches with less "
                    "latency so all match."
                )
                raise ValueError(
                    f"Parallel branches must have equal {what}, got {sorted(values)}: "
                    f"{self._branch_table()}. {fix}"
                )

    @property
    def supports_step(self) -> bool:
        return all(b.supports_step for b in self._structure())

    @property
    def block_size(self) -> int:
        return math.lcm(1, *(b.block_size for b in self._structure()))

    @property
    def output_ratio(self) -> Fraction:
        self._check_branches()
        branches = self._structure()
        return branches[0].output_ratio if branches else Fraction(1)

    @property
    def input_latency(self) -> int:
        return self.get_accumulated_input_latency(0)

    @property
    def output_latency(self) -> int:
        return self.get_accumulated_output_latency(0)

    def _common(self, what: str, latency: int, values: list[int]) -> int:
        if not values:
            return latency
        if len(set(values)) > 1:
            raise ValueError(
                f"Parallel branches accumulate different {what} from {latency}: {values}. "
                f"{self._branch_table()}."
            )
        return values[0]

    def get_accumulated_input_latency(self, input_latency: int) -> int:
        self._check_branches()
        values = [b.get_accumulated_input_latency(input_latency) for b in self._structure()]
        return self._common("input latencies", input_latency, values)

    def get_accumulated_output_latency(self, output_latency: int) -> int:
        self._check_branches()
        values = [b.get_accumulated_output_latency(output_latency) for b in self._structure()]
        return self._common("output latencies", output_latency, values)

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        branches = self._structure()
        if not branches:
            return {0: (0, 0)}
        return utils.parallel_receptive_field_per_step(b.receptive_field_per_step for b in branches)

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        branches = self._structure()
        if not branches:
            return tuple(input_shape)
        shapes = [tuple(b.get_output_shape(input_shape, constants=constants)) for b in branches]
        return combine_output_shape(self.config.combination, shapes)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        branches = self._structure()
        if not branches:
            return input_dtype
        return combine_output_dtype(b.get_output_dtype(input_dtype) for b in branches)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        return tuple(
            layer.get_initial_state(
                batch_size, input_spec, training=training, constants=child_constants(constants)
            )
            for layer in self.layers
        )

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        emits: dict[str, Emits] = {}
        if not self.layers:
            return x, emits
        ys = []
        for layer in self.layers:
            y, layer_emits = layer.layer_with_emits(
                x, training=training, constants=child_constants(constants)
            )
            ys.append(y)
            insert_with_unique_key(emits, layer.name, layer_emits)
        return combine_sequences(self.config.combination, ys), emits

    @types.check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        if len(state) != len(self.layers):
            raise ValueError(
                f"Parallel {self.name!r} got a state with {len(state)} entries for "
                f"{len(self.layers)} layers; use get_initial_state() of this layer."
            )
        emits: dict[str, Emits] = {}
        if not self.layers:
            return x, state, emits
        ys, new_state = [], []
        for layer, layer_state in zip(self.layers, state, strict=True):
            y, layer_state, layer_emits = layer.step_with_emits(
                x, layer_state, training=training, constants=child_constants(constants)
            )
            ys.append(y)
            new_state.append(layer_state)
            insert_with_unique_key(emits, layer.name, layer_emits)
        return combine_sequences(self.config.combination, ys), tuple(new_state), emits


def _shortcut_config(
    shortcut_layers: types.SequenceLayerConfig | PySequence[types.SequenceLayerConfig] | None,
) -> types.SequenceLayerConfig:
    if shortcut_layers is None:
        # An empty Serial is the identity: no parameters, state ().
        return Serial.Config(())
    if isinstance(shortcut_layers, types.SequenceLayerConfig):
        return shortcut_layers
    return Serial.Config(shortcut_layers)


class Residual(_SerialBase):
    """`y = body(x) + shortcut(x)`, with `body` = `layers` in series and the
    shortcut the identity unless `shortcut_layers` is given.

    Shapes: `[b, t, *c] -> [b, t * ratio, *c']`; body and shortcut must agree
    on output shape, ratio and both latencies. A body with latency (e.g. a
    `reverse_causal` conv) needs a shortcut with the same latency:
    `shortcut_layers=[sl.Delay.Config(n, delay_layer_output=False)]`.

    Body children are named `layers_0`, ... and the shortcut
    `shortcut_layer`. State is `(body_states, shortcut_state)`; emits are
    `(body_emits, shortcut_emits)`.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The body, applied in order.
        layers: PySequence[types.SequenceLayerConfig]
        # The shortcut: None for the identity, one config, or a list (run in series).
        shortcut_layers: (
            types.SequenceLayerConfig | PySequence[types.SequenceLayerConfig] | None
        ) = None
        # Merge these body children's parameters into this layer's scope.
        share_scope: bool | PySequence[bool] = False
        # Optional name of the layer.
        name: str | None = None

        def __post_init__(self) -> None:
            layers = tuple_of_configs(self.layers, "Residual.Config.layers")
            object.__setattr__(self, "layers", layers)
            if self.shortcut_layers is not None and not isinstance(
                self.shortcut_layers, types.SequenceLayerConfig
            ):
                object.__setattr__(
                    self,
                    "shortcut_layers",
                    tuple_of_configs(self.shortcut_layers, "Residual.Config.shortcut_layers"),
                )
            object.__setattr__(
                self, "share_scope", normalize_share_scope(self.share_scope, len(layers))
            )

        def make(self) -> Residual:
            return Residual(self, name=self.name)

    config: Config

    def setup(self) -> None:
        self.layers = [c.make() for c in self.config.layers]
        setup_shared_scope(self, self.layers, self.config.share_scope)
        self.shortcut_layer = _shortcut_config(self.config.shortcut_layers).make()
        self._check_shortcut()

    # The body's view is `_SerialBase`'s; these combine it with the shortcut.

    def _structure(self) -> list[SequenceLayer]:
        return [types.detached(c) for c in self.config.layers]

    def _shortcut(self) -> SequenceLayer:
        return types.detached(_shortcut_config(self.config.shortcut_layers))

    def _check_shortcut(self) -> None:
        shortcut = self._shortcut()
        body_ratio = super().output_ratio
        if shortcut.output_ratio != body_ratio:
            raise ValueError(
                f"Residual body and shortcut must have the same output_ratio: body "
                f"{body_ratio}, shortcut {shortcut.output_ratio}. Resample the shortcut "
                "to match."
            )
        body = (super().input_latency, super().output_latency)
        short = (shortcut.input_latency, shortcut.output_latency)
        if body == short:
            return
        if self.config.shortcut_layers is None and body[0] == body[1]:
            fix = (
                f"The body lags by {body[0]} frames and the default shortcut is the identity: "
                f"add a matching delay to the shortcut, shortcut_layers=[sl.Delay.Config("
                f"{body[0]}, delay_layer_output=False)]."
            )
        else:
            fix = (
                "Give the shortcut the body's latencies, e.g. with "
                "sl.Delay.Config(n, delay_layer_output=False) in shortcut_layers."
            )
        raise ValueError(
            f"Residual body and shortcut must have equal latencies, or their step outputs "
            f"misalign: body (input_latency, output_latency)={body}, shortcut={short}. {fix}"
        )

    @property
    def supports_step(self) -> bool:
        return super().supports_step and self._shortcut().supports_step

    @property
    def block_size(self) -> int:
        return math.lcm(super().block_size, self._shortcut().block_size)

    @property
    def input_latency(self) -> int:
        self._check_shortcut()
        return super().input_latency

    @property
    def output_latency(self) -> int:
        self._check_shortcut()
        return super().output_latency

    def _same_latency(self, what: str, latency: int, body: int, shortcut: int) -> int:
        if body != shortcut:
            raise ValueError(
                f"Residual body and shortcut accumulate different {what} from {latency}: "
                f"body {body}, shortcut {shortcut}. Match the shortcut's latency to the body's."
            )
        return body

    def get_accumulated_input_latency(self, input_latency: int) -> int:
        self._check_shortcut()
        return self._same_latency(
            "input latencies",
            input_latency,
            super().get_accumulated_input_latency(input_latency),
            self._shortcut().get_accumulated_input_latency(input_latency),
        )

    def get_accumulated_output_latency(self, output_latency: int) -> int:
        self._check_shortcut()
        return self._same_latency(
            "output latencies",
            output_latency,
            super().get_accumulated_output_latency(output_latency),
            self._shortcut().get_accumulated_output_latency(output_latency),
        )

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return utils.parallel_receptive_field_per_step(
            [super().receptive_field_per_step, self._shortcut().receptive_field_per_step]
        )

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        body = super().get_output_shape(input_shape, constants=constants)
        shortcut = tuple(self._shortcut().get_output_shape(input_shape, constants=constants))
        if body != shortcut:
            raise ValueError(
                f"Residual body and shortcut must have the same output shape for input "
                f"{tuple(input_shape)}: body {body}, shortcut {shortcut}. Add a projection "
                "(e.g. sl.Dense.Config) to shortcut_layers."
            )
        return body

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return jnp.result_type(
            super().get_output_dtype(input_dtype),
            self._shortcut().get_output_dtype(input_dtype),
        )

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        body = super().get_initial_state(
            batch_size, input_spec, training=training, constants=constants
        )
        shortcut = self.shortcut_layer.get_initial_state(
            batch_size, input_spec, training=training, constants=child_constants(constants)
        )
        return body, shortcut

    def residual_function(self, y_body: Sequence, y_shortcut: Sequence) -> Sequence:
        """Combines body and shortcut outputs; subclasses may override."""
        return Sequence(
            y_body.values + y_shortcut.values, jnp.logical_and(y_body.mask, y_shortcut.mask)
        )

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        self.get_output_shape(x.channel_shape, constants=constants)
        y_body, body_emits = self._serial_layer(x, training=training, constants=constants)
        y_shortcut, shortcut_emits = self.shortcut_layer.layer_with_emits(
            x, training=training, constants=child_constants(constants)
        )
        return self.residual_function(y_body, y_shortcut), (body_emits, shortcut_emits)

    @types.check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        body_state, shortcut_state = state
        y_body, body_state, body_emits = self._serial_step(
            x, body_state, training=training, constants=constants
        )
        y_shortcut, shortcut_state, shortcut_emits = self.shortcut_layer.step_with_emits(
            x, shortcut_state, training=training, constants=child_constants(constants)
        )
        y = self.residual_function(y_body, y_shortcut)
        return y, (body_state, shortcut_state), (body_emits, shortcut_emits)
