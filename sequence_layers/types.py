"""The SequenceLayer contract.

Every layer is a Flax Linen module built from a frozen `Config` by
`config.make()`, with two ways to run it:

- `layer(x)`: the whole sequence at once.
- `get_initial_state(batch, spec)` then `step(x_block, state) -> (y, state)`:
  block by block, with explicit state.

The invariant, checked for every layer by `sequence_layers.testing.verify_contract`:

    layer(x) == step_by_step(x.pad_time(0, input_latency, valid=False))[:, output_latency:]

for values (on valid frames), masks and gradients. `input_latency` is how many
extra (invalid) input frames stepping needs to produce every output `layer`
produces; `output_latency` is how many leading step outputs to drop. Those
dropped leading outputs are always invalid, so no stateful layer downstream
ever consumes them.

Structural properties (`block_size`, `output_ratio`, latencies, receptive
field) depend on the config only, so they work on unbound modules too.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import enum
import functools
import math
from collections.abc import Callable, Iterator, MutableMapping
from fractions import Fraction
from typing import Any, Literal, Self, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers.sequence import MASK_DTYPE, ChannelSpec, MaskedSequence, Sequence

__all__ = [
    "MASK_DTYPE",
    "ChannelSpec",
    "Constants",
    "Emits",
    "Emitting",
    "MaskedSequence",
    "PaddingMode",
    "PreservesShape",
    "PreservesType",
    "ReceptiveField",
    "Sequence",
    "SequenceLayer",
    "SequenceLayerConfig",
    "State",
    "Stateless",
    "StatelessEmitting",
    "StatelessPointwise",
    "StatelessPointwiseFunctor",
    "check_layer",
    "check_layer_with_emits",
    "check_step",
    "check_step_with_emits",
    "validate_padding",
]

# Inputs shared by every layer of a model (cross-attention sources,
# conditioning, positions). Combinators pass them on unchanged.
Constants = MutableMapping[str, Any]
State = Any
Emits = Any
# Input offsets (start, end) an output step depends on, relative to
# `t // output_ratio`; ends may be +-inf; None means no input reaches it.
ReceptiveField = tuple[float, float] | None
ShapeLike = tuple[int, ...] | list[int]


class PaddingMode(enum.Enum):
    """Time padding modes (REFERENCE section 2)."""

    VALID = "valid"
    SAME = "same"
    CAUSAL_VALID = "causal_valid"
    REVERSE_CAUSAL_VALID = "reverse_causal_valid"
    CAUSAL = "causal"
    REVERSE_CAUSAL = "reverse_causal"
    SEMICAUSAL = "semicausal"
    SEMICAUSAL_FULL = "semicausal_full"


PaddingModeString = Literal[
    "valid",
    "same",
    "causal_valid",
    "reverse_causal_valid",
    "causal",
    "reverse_causal",
    "semicausal",
    "semicausal_full",
]


def validate_padding(padding: str | PaddingMode) -> str:
    """Returns the padding mode string or raises listing the valid ones."""
    if isinstance(padding, PaddingMode):
        return padding.value
    valid = [m.value for m in PaddingMode]
    if padding not in valid:
        raise ValueError(f"Unknown padding {padding!r}; expected one of {valid}.")
    return padding


# Configs ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SequenceLayerConfig(abc.ABC):
    """Base of every layer's nested `Config`: a frozen, hashable description
    of the layer. `make()` builds the (unbound) Flax module."""

    @abc.abstractmethod
    def make(self) -> SequenceLayer:
        """Builds the layer module described by this config."""

    def copy(self, **changes: Any) -> Self:
        """`dataclasses.replace`, refusing configs that are not hashable."""
        try:
            hash(self)
        except TypeError as e:
            raise TypeError(f"{type(self).__qualname__} has unhashable fields: {e}") from e
        return dataclasses.replace(self, **changes)


@contextlib.contextmanager
def _outside_module_context() -> Iterator[None]:
    # Flax attaches a new module to whichever module method is running; a
    # structural query (latency, block size) must not create children there.
    from flax.linen import module as flax_module

    stack = flax_module._context.module_stack
    stack.append(None)
    try:
        yield
    finally:
        stack.pop()


@functools.lru_cache(maxsize=4096)
def detached(config: SequenceLayerConfig) -> SequenceLayer:
    """An unbound instance of `config`'s layer, for reading structural
    properties (latency, ratio, block size, receptive field, output spec)."""
    with _outside_module_context():
        return config.make()


# The layer base -----------------------------------------------------------


class SequenceLayer(nn.Module):
    """Base class of all layers. Subclasses declare `config: Config`.

    Shapes: `layer` maps `Sequence [b, t, *c_in]` to `[b, t * output_ratio, *c_out]`;
    `step` does the same on a block whose length is a multiple of `block_size`.
    """

    # Structural properties ---------------------------------------------------

    @property
    def block_size(self) -> int:
        """`step` inputs must be a multiple of this many frames."""
        return 1

    @property
    def output_ratio(self) -> Fraction:
        """Output frames per input frame."""
        return Fraction(1)

    @property
    def supports_step(self) -> bool:
        return True

    @property
    def input_latency(self) -> int:
        """Extra input frames `step` needs before its output matches `layer`."""
        return 0

    @property
    def output_latency(self) -> int:
        """Leading `step` outputs to drop; they are always invalid."""
        return int(self.input_latency * self.output_ratio)

    @property
    def receptive_field_per_step(self) -> dict[int, ReceptiveField]:
        return {0: (0, 0)}

    @property
    def receptive_field(self) -> ReceptiveField:
        """The union over steps of `receptive_field_per_step`."""
        return union_receptive_fields(self.receptive_field_per_step.values())

    def get_accumulated_input_latency(self, input_latency: int) -> int:
        """Input latency of this layer followed by a stack with `input_latency`
        (counted in this layer's output frames)."""
        return math.ceil(input_latency / self.output_ratio) + self.input_latency

    def get_accumulated_output_latency(self, output_latency: int) -> int:
        """Output latency of a stack with `output_latency` (counted in this
        layer's input frames) followed by this layer."""
        ratio = self.output_ratio
        if (-output_latency) % (1 / ratio) != 0:
            raise ValueError(
                f"{type(self).__name__} (output_ratio={ratio}) cannot follow an output "
                f"latency of {output_latency} frames: it is not a multiple of "
                f"{1 / ratio}. Insert a Delay so the latency is a multiple."
            )
        return int(output_latency * ratio) + self.output_latency

    # Output spec -------------------------------------------------------------

    @nn.nowrap
    def get_output_shape(
        self, input_shape: ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        """Channel shape of the output for an input channel shape."""
        raise NotImplementedError(f"{type(self).__name__} must define get_output_shape.")

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return input_dtype

    @nn.nowrap
    def get_output_spec(
        self, input_spec: ChannelSpec, *, constants: Constants | None = None
    ) -> ChannelSpec:
        return ChannelSpec(
            tuple(self.get_output_shape(tuple(input_spec.shape), constants=constants)),
            self.get_output_dtype(input_spec.dtype),
        )

    @nn.nowrap
    def get_output_shape_for_sequence(
        self, x: Sequence, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        return tuple(self.get_output_shape(x.channel_shape, constants=constants))

    # Running -----------------------------------------------------------------

    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        """The whole sequence at once."""
        y, _ = self.layer_with_emits(x, training=training, constants=constants)
        return y

    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        return self.layer(x, training=training, constants=constants), ()

    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        """One block: `x [b, k * block_size, ...]` -> `(y, new_state)`."""
        y, state, _ = self.step_with_emits(x, state, training=training, constants=constants)
        return y, state

    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        y, state = self.step(x, state, training=training, constants=constants)
        return y, state, ()

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        """State before the first block; its shapes never depend on time."""
        raise NotImplementedError(f"{type(self).__name__} must define get_initial_state.")

    def __call__(
        self, x: Sequence, *, training: bool = False, constants: Constants | None = None
    ) -> Sequence:
        return self.layer(x, training=training, constants=constants)


def union_receptive_fields(fields: Any) -> ReceptiveField:
    """Smallest range containing every field (None entries contribute nothing)."""
    present = [f for f in fields if f is not None]
    if not present:
        return None
    return (min(f[0] for f in present), max(f[1] for f in present))


# Check decorators ---------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def _check_output_spec(
    layer: SequenceLayer, x: Sequence, y: Sequence, what: str, constants: Constants | None
) -> None:
    expected = tuple(layer.get_output_spec(x.channel_spec, constants=constants).shape)
    if tuple(y.channel_shape) != expected:
        raise ValueError(
            f"{type(layer).__name__}.{what} produced channel shape {y.channel_shape}, "
            f"but get_output_spec({x.channel_spec}) says {expected}."
        )


def _check_step_input(layer: SequenceLayer, x: Sequence) -> None:
    if not layer.supports_step:
        raise ValueError(
            f"{type(layer).__name__} does not support step(): its configuration "
            f"({getattr(layer, 'config', None)}) is not streamable. Use layer() instead."
        )
    if x.shape[1] % layer.block_size != 0:
        raise ValueError(
            f"{type(layer).__name__}.step needs a multiple of block_size="
            f"{layer.block_size} frames, got {x.shape[1]=}. Pad with "
            f"x.pad_to_multiple({layer.block_size})."
        )


def _check_step_output(
    layer: SequenceLayer, x: Sequence, y: Sequence, constants: Constants | None
) -> None:
    expected = x.shape[1] * layer.output_ratio
    if y.shape[1] != expected:
        raise ValueError(
            f"{type(layer).__name__}.step produced {y.shape[1]} frames for "
            f"{x.shape[1]} inputs; output_ratio={layer.output_ratio} requires {expected}."
        )
    _check_output_spec(layer, x, y, "step", constants)


def check_layer(fn: F) -> F:
    """Checks a `layer` output's channel shape against `get_output_shape`."""

    @functools.wraps(fn)
    def wrapper(self: SequenceLayer, x: Sequence, *args: Any, **kwargs: Any) -> Sequence:
        y = fn(self, x, *args, **kwargs)
        _check_output_spec(self, x, y, "layer", kwargs.get("constants"))
        return y

    return wrapper  # type: ignore[return-value]


def check_layer_with_emits(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: SequenceLayer, x: Sequence, *args: Any, **kwargs: Any) -> Any:
        y, emits = fn(self, x, *args, **kwargs)
        _check_output_spec(self, x, y, "layer", kwargs.get("constants"))
        return y, emits

    return wrapper  # type: ignore[return-value]


def check_step(fn: F) -> F:
    """Checks steppability, block alignment, output length and spec."""

    @functools.wraps(fn)
    def wrapper(self: SequenceLayer, x: Sequence, state: State, *args: Any, **kwargs: Any) -> Any:
        _check_step_input(self, x)
        y, new_state = fn(self, x, state, *args, **kwargs)
        _check_step_output(self, x, y, kwargs.get("constants"))
        return y, new_state

    return wrapper  # type: ignore[return-value]


def check_step_with_emits(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(self: SequenceLayer, x: Sequence, state: State, *args: Any, **kwargs: Any) -> Any:
        _check_step_input(self, x)
        y, new_state, emits = fn(self, x, state, *args, **kwargs)
        _check_step_output(self, x, y, kwargs.get("constants"))
        return y, new_state, emits

    return wrapper  # type: ignore[return-value]


# Mixins and bases ---------------------------------------------------------


class PreservesType(SequenceLayer):
    """Output dtype equals input dtype."""

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return input_dtype


class PreservesShape(SequenceLayer):
    """Output channel shape equals input channel shape."""

    @nn.nowrap
    def get_output_shape(
        self, input_shape: ShapeLike, *, constants: Constants | None = None
    ) -> tuple[int, ...]:
        return tuple(input_shape)


class Stateless(SequenceLayer):
    """No state: `step` is `layer` on the block. Receptive field `(0, 0)`."""

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        return ()

    @check_step
    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        return self.layer(x, training=training, constants=constants), state


class Emitting(SequenceLayer):
    """A layer whose `*_with_emits` methods are primary; `layer` and `step`
    drop the emits."""

    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        y, _ = self.layer_with_emits(x, training=training, constants=constants)
        return y

    def step(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State]:
        y, state, _ = self.step_with_emits(x, state, training=training, constants=constants)
        return y, state

    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, Emits]:
        raise NotImplementedError

    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        raise NotImplementedError


class StatelessEmitting(Emitting):
    """Stateless, with emits."""

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: ChannelSpec,
        *,
        training: bool,
        constants: Constants | None = None,
    ) -> State:
        return ()

    @check_step_with_emits
    def step_with_emits(
        self, x: Sequence, state: State, *, training: bool, constants: Constants | None = None
    ) -> tuple[Sequence, State, Emits]:
        y, emits = self.layer_with_emits(x, training=training, constants=constants)
        return y, state, emits


class StatelessPointwise(PreservesShape, Stateless):
    """Stateless and frame-by-frame with the same channel shape."""


class StatelessPointwiseFunctor(StatelessPointwise):
    """A pointwise layer defined by `fn(values, mask) -> (values, mask)`.

    `mask_required` says whether `fn` can turn a zero frame non-zero (e.g.
    `exp`); if so the output is a plain `Sequence`, otherwise the input's
    masked guarantee carries over.
    """

    @property
    def mask_required(self) -> bool:
        return True

    def fn(self, values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def layer(self, x: Sequence, *, training: bool, constants: Constants | None = None) -> Sequence:
        values, mask = self.fn(x.values, x.mask)
        if self.mask_required or not isinstance(x, MaskedSequence):
            return Sequence(values, mask)
        return MaskedSequence(values, mask)


def zeros_state(batch_size: int, width: int, spec: ChannelSpec, valid: bool) -> Sequence:
    """A `[b, width, *c]` buffer of zeros with a constant mask; a helper for
    buffered layers' initial states. Always a plain `Sequence`: the state's
    pytree type must not change from step to step."""
    values = jnp.zeros((batch_size, width, *spec.shape), spec.dtype)
    mask = jnp.full((batch_size, width), valid, MASK_DTYPE)
    return Sequence(values, mask)
