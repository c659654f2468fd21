"""Tests of the layer base (`types.py`): defaults, mixins, check decorators,
configs, `detached` and latency composition errors."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_layers import ToyConv

from sequence_layers import testing, types
from sequence_layers.sequence import MaskedSequence, Sequence


class Broken(types.PreservesType, types.SequenceLayer):
    """A layer misbehaving in the way `mode` says, to exercise the checks."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # 'spec' (wrong channel shape), 'length' (step drops a frame) or ''.
        mode: str = ""
        # Block size to declare.
        block: int = 1
        # Whether step is supported.
        steppable: bool = True
        name: str | None = None

        def make(self) -> Broken:
            return Broken(self, name=self.name)

    config: Config

    @property
    def block_size(self) -> int:
        return self.config.block

    @property
    def supports_step(self) -> bool:
        return self.config.steppable

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return tuple(input_shape)

    def _out(self, x: Sequence) -> Sequence:
        if self.config.mode == "spec":
            return Sequence(jnp.concatenate([x.values, x.values], -1), x.mask)
        if self.config.mode == "length":
            return x[:, 1:]
        return x

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        return self._out(x)

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: types.ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> types.State:
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
        return self._out(x), state


class Emitter(types.PreservesShape, types.StatelessEmitting):
    """Stateless, emitting its input doubled."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Produce one channel instead of the input's channels.
        wrong_shape: bool = False
        name: str | None = None

        def make(self) -> Emitter:
            return Emitter(self, name=self.name)

    config: Config

    @types.check_layer_with_emits
    def layer_with_emits(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> tuple[Sequence, types.Emits]:
        y = x
        if self.config.wrong_shape:
            y = Sequence(x.values[..., :1], x.mask)
        return y, {"doubled": x.values * 2}

    @types.check_step_with_emits
    def step_with_emits(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State, types.Emits]:
        y, emits = self.layer_with_emits(x, training=training, constants=constants)
        return y, state, emits


class Exp(types.StatelessPointwiseFunctor):
    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        name: str | None = None

        def make(self) -> Exp:
            return Exp(self, name=self.name)

    config: Config

    def fn(self, values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        return jnp.exp(values), mask


class Neg(Exp):
    @property
    def mask_required(self) -> bool:
        return False

    def fn(self, values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        return -values, mask


@pytest.fixture(scope="module")
def x() -> Sequence:
    return testing.random_sequence(2, 4, 3, seed=2)


def run(module: types.SequenceLayer, method: str, *args, **kwargs):
    return module.apply({}, *args, method=method, training=False, **kwargs)


# Defaults and mixins ----------------------------------------------------------


def test_defaults() -> None:
    layer = Broken.Config().make()  # unbound: structural properties still work
    assert layer.block_size == 1 and layer.output_ratio == Fraction(1)
    assert layer.input_latency == 0 and layer.output_latency == 0
    assert layer.receptive_field_per_step == {0: (0, 0)}
    assert layer.receptive_field == (0, 0)
    assert layer.supports_step
    spec = layer.get_output_spec(types.ChannelSpec((3,), jnp.int32))
    assert spec.shape == (3,) and spec.dtype == jnp.int32


def test_output_latency_defaults_to_input_latency_times_ratio() -> None:
    conv = ToyConv.Config(5, 2, "reverse_causal").make()
    assert conv.input_latency == 4 and conv.output_latency == 2

    class Plain(ToyConv):
        @property
        def output_latency(self) -> int:
            return types.SequenceLayer.output_latency.fget(self)  # type: ignore[attr-defined]

    assert Plain(ToyConv.Config(5, 2, "reverse_causal")).output_latency == 2


def test_receptive_field_union() -> None:
    assert types.union_receptive_fields([(-1, 0), None, (2, 3)]) == (-1, 3)
    assert types.union_receptive_fields([None]) is None
    assert types.union_receptive_fields([(-math.inf, 0), (0, 1)]) == (-math.inf, 1)


def test_stateless_steps_with_layer(x: Sequence) -> None:
    layer = Exp.Config().make()
    assert layer.get_initial_state(2, x.channel_spec, training=False) == ()
    y, state = run(layer, "step", x, ())
    assert state == ()
    np.testing.assert_allclose(y.values, jnp.exp(x.values))
    testing.verify_contract(layer.bind({}), x)


def test_pointwise_functor_mask_required(x: Sequence) -> None:
    # exp(0) != 0: the output cannot promise zeros on invalid frames.
    assert type(run(Exp.Config().make(), "layer", x)) is Sequence
    assert type(run(Neg(Neg.Config()), "layer", x)) is MaskedSequence
    assert type(run(Neg(Neg.Config()), "layer", x.unmask())) is Sequence


def test_emitting_layers(x: Sequence) -> None:
    layer = Emitter.Config().make()
    y = run(layer, "layer", x)
    assert isinstance(y, Sequence)
    y, emits = run(layer, "layer_with_emits", x)
    np.testing.assert_allclose(emits["doubled"], x.values * 2)
    y, state, emits = run(layer, "step_with_emits", x, ())
    assert state == () and "doubled" in emits
    y, state = run(layer, "step", x, ())
    assert y.shape == x.shape


# Check decorators ---------------------------------------------------------------


def test_check_step_block_size(x: Sequence) -> None:
    layer = Broken.Config(block=3).make()
    with pytest.raises(ValueError, match=r"multiple of block_size=3.*x.shape\[1\]=4"):
        run(layer, "step", x, ())
    y, _ = run(layer, "step", x[:, :3], ())
    assert y.shape[1] == 3


def test_check_step_not_steppable(x: Sequence) -> None:
    layer = Broken.Config(steppable=False).make()
    with pytest.raises(ValueError, match=r"does not support step\(\).*Use layer\(\)"):
        run(layer, "step", x, ())
    assert run(layer, "layer", x).shape == x.shape


def test_check_output_spec(x: Sequence) -> None:
    layer = Broken.Config(mode="spec").make()
    with pytest.raises(ValueError, match=r"layer produced channel shape \(6,\).*says \(3,\)"):
        run(layer, "layer", x)
    with pytest.raises(ValueError, match=r"step produced channel shape \(6,\)"):
        run(layer, "step", x, ())
    with pytest.raises(ValueError, match="layer produced channel shape"):
        run(Emitter.Config(wrong_shape=True).make(), "layer_with_emits", x)


def test_check_step_output_length(x: Sequence) -> None:
    layer = Broken.Config(mode="length").make()
    with pytest.raises(ValueError, match=r"produced 3 frames for 4 inputs; output_ratio=1"):
        run(layer, "step", x, ())


def test_layers_must_define_spec_and_state() -> None:
    class Bare(types.SequenceLayer):
        pass

    bare = Bare()
    with pytest.raises(NotImplementedError, match="get_output_shape"):
        bare.get_output_shape((3,))
    with pytest.raises(NotImplementedError, match="get_initial_state"):
        bare.get_initial_state(1, types.ChannelSpec((3,), jnp.float32), training=False)


# Configs and detached ---------------------------------------------------------------


def test_config_copy_and_hashability() -> None:
    config = ToyConv.Config(3)
    assert config.copy(stride=2) == ToyConv.Config(3, 2)
    assert hash(config) == hash(ToyConv.Config(3))

    @dataclasses.dataclass(frozen=True)
    class Unhashable(types.SequenceLayerConfig):
        sizes: list

        def make(self) -> types.SequenceLayer:
            raise NotImplementedError

    with pytest.raises(TypeError, match="unhashable"):
        Unhashable([1]).copy()


def test_validate_padding() -> None:
    assert types.validate_padding("causal") == "causal"
    assert types.validate_padding(types.PaddingMode.SEMICAUSAL) == "semicausal"
    with pytest.raises(ValueError, match=r"Unknown padding 'causl'.*reverse_causal"):
        types.validate_padding("causl")


def test_detached_reads_properties_inside_a_bound_method(x: Sequence) -> None:
    child = ToyConv.Config(5, 1, "reverse_causal")

    class Parent(types.PreservesShape, types.Stateless):
        @nn.compact
        def layer(
            self, x: Sequence, *, training: bool, constants: types.Constants | None = None
        ) -> Sequence:
            # Structural queries while bound must not create child modules.
            self.sow("intermediates", "latency", types.detached(child).input_latency)
            return x

    variables = Parent().init(jax.random.PRNGKey(0), x, method="layer", training=False)
    assert "params" not in variables
    _, state = Parent().apply({}, x, method="layer", training=False, mutable=["intermediates"])
    assert state["intermediates"]["latency"] == (4,)
    assert types.detached(child) is types.detached(child)  # cached
    assert types.detached(child).scope is None


def test_accumulated_latency() -> None:
    down = ToyConv.Config(4, 2).make()  # ratio 1/2
    assert down.get_accumulated_input_latency(3) == 6
    assert down.get_accumulated_output_latency(4) == 2
    with pytest.raises(ValueError, match=r"Insert a Delay"):
        down.get_accumulated_output_latency(3)


def test_zeros_state() -> None:
    state = types.zeros_state(2, 3, types.ChannelSpec((4,), jnp.bfloat16), valid=True)
    assert type(state) is Sequence  # never MaskedSequence: state types must not change
    assert state.shape == (2, 3, 4) and state.dtype == jnp.bfloat16
    assert bool(state.mask.all())
    assert not bool(types.zeros_state(1, 2, types.ChannelSpec((), jnp.float32), False).mask.any())
