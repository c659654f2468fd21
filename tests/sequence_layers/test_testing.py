"""Tests of the public harness `sequence_layers.testing`: it accepts correct
layers and rejects each kind of contract violation with a message naming it."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_layers import RunningSum, ToyConv, ToyLookahead

from sequence_layers import testing, types
from sequence_layers.sequence import MaskedSequence, Sequence

# Toy layers used only here ----------------------------------------------------


class Scale(types.PreservesType, types.PreservesShape, types.Stateless):
    """`y = x * w` with a learned `w [c]`; `step_mode` breaks step on purpose:
    'stop_param' / 'stop_input' stop gradients, 'block_len' scales by the
    block length (right at 1x, wrong at 2x), 'mix_batch' mixes rows."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # How step deviates from layer ('' = it does not).
        step_mode: str = ""
        # Add the batch mean (over valid frames) in layer and step.
        mix_batch: bool = False
        name: str | None = None

        def make(self) -> Scale:
            return Scale(self, name=self.name)

    config: Config

    def _w(self, channels: int) -> jax.Array:
        return self.param("w", nn.initializers.normal(1.0), (channels,))

    @nn.compact
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        x = x.mask_invalid()
        values = x.values * self._w(x.shape[-1])
        if self.config.mix_batch:
            values = values + jnp.mean(x.values, axis=0, keepdims=True)
        return Sequence(values, x.mask)

    @nn.compact
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        mode = self.config.step_mode
        x = x.mask_invalid()
        w = self._w(x.shape[-1])
        values = x.values
        if mode == "stop_param":
            w = jax.lax.stop_gradient(w)
        if mode == "stop_input":
            values = jax.lax.stop_gradient(values)
        values = values * w
        if mode == "block_len":
            values = values * x.shape[1]
        if self.config.mix_batch:
            values = values + jnp.mean(x.values, axis=0, keepdims=True)
        return Sequence(values, x.mask), state


class AddConstant(types.PreservesType, types.PreservesShape, types.Stateless):
    """`y = x + constants['c']`, a Sequence time-aligned with x (streamed)."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        name: str | None = None

        def make(self) -> AddConstant:
            return AddConstant(self, name=self.name)

    config: Config

    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        assert constants is not None
        c = constants["c"]
        return Sequence(x.values + c.values, x.mask & c.mask).mask_invalid()


class Upsample2(types.PreservesType, types.PreservesShape, types.Stateless):
    """Repeats every frame twice (output_ratio 2); `declared` is its field."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Declared receptive field per output step (two phases).
        declared: tuple[tuple[int, int], ...] = ((0, 0), (0, 0))
        name: str | None = None

        def make(self) -> Upsample2:
            return Upsample2(self, name=self.name)

    config: Config

    @property
    def output_ratio(self) -> Fraction:
        return Fraction(2)

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return dict(enumerate(self.config.declared))

    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        return Sequence(jnp.repeat(x.values, 2, axis=1), jnp.repeat(x.mask, 2, axis=1))


class WrongLatencyConv(ToyConv):
    @property
    def input_latency(self) -> int:
        return super().input_latency - 1


class WrongOutputLatencyConv(ToyConv):
    @property
    def output_latency(self) -> int:
        return super().output_latency - 1


class DeclaredRfConv(ToyConv):
    """A conv declaring `declared_rf` instead of its real receptive field."""

    declared_rf: tuple[float, float] = (0, 0)

    @property
    def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
        return {0: self.declared_rf}


class LeakyConv(ToyConv):
    """Forgets to mask invalid frames: NaN padding leaks into valid outputs."""

    @nn.compact
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        c = self.config
        values = jnp.pad(x.values, ((0, 0), (0, c.kernel_size - 1), (0, 0)))
        return Sequence(self._conv(values), x.mask)


class LeakyStepConv(ToyConv):
    """Correct layer(), but step forgets to mask invalid input frames."""

    @nn.compact
    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        unmasked = MaskedSequence(x.values, x.mask)  # a lie: NaN frames stay
        return super().step(unmasked, state, training=training, constants=constants)


class HistoryState(RunningSum):
    """Keeps every frame seen in its state, so the state grows with time."""

    def get_initial_state(
        self,
        batch_size: int,
        input_spec: types.ChannelSpec,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> types.State:
        return types.zeros_state(batch_size, 0, input_spec, False)

    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        history = state.concatenate(x.mask_invalid())
        sums = jnp.cumsum(history.values, axis=1)[:, -x.shape[1] :]
        return Sequence(sums, x.mask).mask_invalid(), Sequence(history.values, history.mask)


class TypeFlipConv(ToyConv):
    """Returns its buffer as a MaskedSequence where the initial one is a Sequence."""

    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        y, state = super().step(x, state, training=training, constants=constants)
        return y, state.mask_invalid()


class ValidLeadingLookahead(ToyLookahead):
    """Passes frames through in step without invalidating the first n."""

    def step(
        self,
        x: Sequence,
        state: types.State,
        *,
        training: bool,
        constants: types.Constants | None = None,
    ) -> tuple[Sequence, types.State]:
        return x, state + x.shape[1]


class WrongSpec(types.PreservesType, types.Stateless):
    """Declares twice the channels it produces."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        name: str | None = None

        def make(self) -> WrongSpec:
            return WrongSpec(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return (2 * input_shape[0],)

    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        return x


def bind(module: types.SequenceLayer, x: Sequence, **kwargs) -> types.SequenceLayer:
    return testing.init_and_bind(module, x, **kwargs)


def x_in(*dims: int, seed: int = 1, **kwargs) -> Sequence:
    return testing.random_sequence(*(dims or (2, 12, 3)), seed=seed, **kwargs)


# verify_contract accepts correct layers ---------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        ToyConv.Config(3),
        ToyConv.Config(4, 2, "reverse_causal"),
        ToyConv.Config(5, 2, "semicausal"),
        ToyConv.Config(3, 1, "reverse_causal_valid"),
        ToyConv.Config(3, 1, "causal_valid"),
        ToyConv.Config(3, 1, "same"),  # not steppable: layer-wise checks only
        RunningSum.Config(),
        ToyLookahead.Config(2),
        Scale.Config(),
        Upsample2.Config(),
    ],
    ids=str,
)
def test_accepts_correct_layers(config: types.SequenceLayerConfig) -> None:
    x = x_in()
    layer = bind(config.make(), x)
    y = testing.verify_contract(layer, x, rtol=1e-5, atol=1e-5)
    assert isinstance(y, MaskedSequence)
    expected = layer.layer(x, training=False)
    testing.assert_sequences_close(y, expected, rtol=1e-6, atol=1e-6)


def test_accepts_complex_inputs() -> None:
    x = x_in(2, 10, 2, dtype=jnp.complex64)
    testing.verify_contract(bind(RunningSum.Config().make(), x), x, rtol=1e-5, atol=1e-5)


def test_eager_mode() -> None:
    # jit=False runs op by op (for debugging layers); slow, so kept tiny.
    x = x_in(2, 4, 2)
    layer = bind(ToyLookahead.Config(1).make(), x)
    y = testing.verify_contract(layer, x, jit=False, test_gradients=False)
    testing.assert_sequences_close(y, layer.layer(x, training=False))


def test_streamed_constants() -> None:
    x = x_in(2, 8, 3)
    c = testing.random_sequence(2, 8, 3, seed=7, random_lengths=False)
    layer = bind(AddConstant.Config().make(), x, constants={"c": c})
    y = testing.verify_contract(
        layer, x, constants={"c": c}, stream_constants=True, pad_constants=True
    )
    np.testing.assert_allclose(
        np.asarray(y.values), np.asarray(x.values + c.values) * np.asarray(y.expanded_mask())
    )


def test_relaxed_receptive_field_only_requires_containment() -> None:
    x = x_in()
    layer = bind(DeclaredRfConv(ToyConv.Config(3), declared_rf=(-4, 0)), x)
    testing.verify_contract(layer, x, rtol=1e-5, atol=1e-5, relaxed_receptive_field=True)
    with pytest.raises(AssertionError, match=r"(?s)receptive field.*declared \(-4, 0\), measured"):
        testing.verify_contract(layer, x, rtol=1e-5, atol=1e-5, test_gradients=False)


# verify_contract rejects broken layers ---------------------------------------


def expect_failure(layer: types.SequenceLayer, x: Sequence, check: str, **kwargs) -> str:
    with pytest.raises(AssertionError, match=r"verify_contract \[" + check) as info:
        testing.verify_contract(layer, x, rtol=1e-5, atol=1e-5, **kwargs)
    return str(info.value)


def test_rejects_wrong_input_latency() -> None:
    x = x_in(2, 12, 3, random_lengths=False)
    layer = bind(WrongLatencyConv(ToyConv.Config(3, 1, "reverse_causal")), x)
    message = expect_failure(layer, x, r"layer/step equivalence, 1x")
    assert "input_latency=1" in message and "masks differ" in message


def test_rejects_wrong_output_latency() -> None:
    x = x_in()
    layer = bind(WrongOutputLatencyConv(ToyConv.Config(3, 1, "reverse_causal")), x)
    expect_failure(layer, x, r"layer/step equivalence, 1x", test_receptive_field=False)


@pytest.mark.parametrize(
    ("config", "declared", "measured"),
    [
        (ToyConv.Config(3), (-3, 0), "(-2, 0)"),
        (ToyConv.Config(3), (-math.inf, 0), "(-2, 0)"),  # finite, declared infinite
        (RunningSum.Config(), (-3, 0), None),  # infinite, declared finite
        (ToyConv.Config(4, 2, "causal"), (-2, 0), "(-3, 0)"),  # strided
    ],
    ids=["too_wide", "not_infinite", "infinite", "strided"],
)
def test_rejects_wrong_receptive_field(
    config: types.SequenceLayerConfig, declared: tuple[float, float], measured: str | None
) -> None:
    x = x_in()
    if isinstance(config, ToyConv.Config):
        module = DeclaredRfConv(config, declared_rf=declared)
    else:

        class Declared(RunningSum):
            @property
            def receptive_field_per_step(self) -> dict[int, types.ReceptiveField]:
                return {0: declared}

        module = Declared(config)
    message = expect_failure(bind(module, x), x, "receptive field")
    assert f"declared {declared}" in message
    if measured is not None:
        assert f"measured {measured}" in message


def test_rejects_wrong_receptive_field_of_one_step_phase() -> None:
    x = x_in()
    layer = bind(Upsample2.Config(declared=((0, 0), (-1, 0))).make(), x)
    message = expect_failure(layer, x, "receptive field", test_gradients=False)
    assert "step 1: declared (-1, 0), measured (0, 0)" in message and "step 0" not in message


def test_rejects_nan_leaks() -> None:
    x = x_in()
    layer = bind(LeakyConv(ToyConv.Config(3, 1, "reverse_causal")), x)
    message = expect_failure(layer, x, "padding invariance, layer-wise")
    assert "NaN" in message and "nan" in message


def test_rejects_nan_leaks_in_step_only() -> None:
    x = x_in()
    layer = bind(LeakyStepConv(ToyConv.Config(3, 1, "reverse_causal")), x)
    message = expect_failure(layer, x, "padding invariance, step-wise")
    assert "step(x')" in message


def test_rejects_batch_mixing() -> None:
    x = x_in()
    layer = bind(Scale.Config(mix_batch=True).make(), x)
    message = expect_failure(layer, x, "batching, layer-wise")
    assert "garbage rows" in message


def test_rejects_state_growing_with_time() -> None:
    x = x_in()
    message = expect_failure(bind(HistoryState(RunningSum.Config()), x), x, "state")
    assert "after 1 step" in message


def test_rejects_state_changing_node_type() -> None:
    x = x_in()
    message = expect_failure(bind(TypeFlipConv(ToyConv.Config(3)), x), x, "state")
    assert "MaskedSequence" in message


def test_rejects_valid_leading_latency_outputs() -> None:
    x = x_in()
    layer = bind(ValidLeadingLookahead(ToyLookahead.Config(2)), x)
    message = expect_failure(layer, x, "leading latency")
    assert "output_latency=2" in message


@pytest.mark.parametrize(
    ("mode", "check"),
    [("stop_param", "gradients, parameters"), ("stop_input", "gradients, input")],
)
def test_rejects_gradient_mismatch(mode: str, check: str) -> None:
    x = x_in()
    message = expect_failure(bind(Scale.Config(step_mode=mode).make(), x), x, check)
    assert "differs between" in message


def test_rejects_mismatch_at_twice_the_block_size() -> None:
    x = x_in()
    layer = bind(Scale.Config(step_mode="block_len").make(), x)
    expect_failure(layer, x, r"layer/step equivalence, 2x", test_gradients=False)


def test_rejects_wrong_output_spec_and_empty_output() -> None:
    x = x_in()
    message = expect_failure(bind(WrongSpec.Config().make(), x), x, "output spec")
    assert "(3,)" in message and "(6,)" in message
    empty = x_in(2, 0, 3)
    expect_failure(bind(RunningSum.Config().make(), x), empty, "output spec")


def test_misuse_raises_value_error() -> None:
    x = x_in()
    with pytest.raises(ValueError, match="bound"):
        testing.verify_contract(RunningSum.Config().make(), x)
    tokens = x_in(2, 6, 3, dtype=jnp.int32)
    layer = bind(ToyLookahead.Config(1).make(), tokens)
    with pytest.raises(ValueError, match="test_receptive_field=False"):
        testing.verify_contract(layer, tokens)
    testing.verify_contract(layer, tokens, test_receptive_field=False)


# Helpers ---------------------------------------------------------------------------


def test_random_sequence() -> None:
    x = testing.random_sequence(3, 7, 2, seed=3)
    assert isinstance(x, MaskedSequence) and x.shape == (3, 7, 2) and x.dtype == jnp.float32
    mask = np.asarray(x.mask)
    lengths = mask.sum(1)
    # Contiguous prefixes; invalid frames zero.
    np.testing.assert_array_equal(mask, np.arange(7)[None] < lengths[:, None])
    assert not np.any(np.asarray(x.values)[~mask])
    # Deterministic per seed.
    np.testing.assert_array_equal(x.values, testing.random_sequence(3, 7, 2, seed=3).values)
    full = testing.random_sequence(2, 5, random_lengths=False)
    assert np.asarray(full.mask).all()
    bounded = testing.random_sequence(50, 9, low_length=3, high_length=5)
    assert set(np.asarray(bounded.lengths()).tolist()) <= {3, 4}
    ints = testing.random_sequence(4, 6, dtype=jnp.int32, low=2, high=5, random_lengths=False)
    assert ints.dtype == jnp.int32 and set(np.unique(ints.values)) <= {2, 3, 4}
    cplx = testing.random_sequence(2, 4, dtype=jnp.complex64, random_lengths=False)
    assert np.all(np.asarray(cplx.values).imag != 0)
    bf16 = testing.random_sequence(2, 4, 3, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.bfloat16
    random_mask = np.asarray(testing.random_sequence(4, 32, random_mask=True).mask)
    assert random_mask.any() and not random_mask.all()
    with pytest.raises(ValueError, match="batch, time"):
        testing.random_sequence(3)


def test_standard_dtype_configs() -> None:
    configs = testing.standard_dtype_configs()
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert [tuple(c.values()) for c in configs] == [
        (f32, f32, None),
        (bf16, bf16, bf16),
        (f32, bf16, bf16),
        (bf16, f32, None),
        (f32, f32, bf16),
    ]
    assert list(configs[0]) == ["param_dtype", "input_dtype", "compute_dtype"]
    params_only = testing.standard_dtype_configs(param=True)
    assert params_only == [{"param_dtype": f32}, {"param_dtype": bf16}]
    named = testing.standard_dtype_configs(named=True, expected=True)
    assert named[2]["testcase_name"] == "p-fp32_i-bf16_c-bf16"
    assert named[3]["expected_dtype"] == jnp.float32
    assert named[1]["expected_dtype"] == jnp.bfloat16
    assert len(testing.standard_dtype_configs(include_default=False)) == 4


def test_get_grad_tols() -> None:
    assert testing.get_grad_tols(jnp.float32) == {"grad_rtol": 1e-5, "grad_atol": 1e-5}
    assert testing.get_grad_tols(jnp.float32, jnp.bfloat16)["grad_rtol"] == 1e-1
    assert testing.get_grad_tols(jnp.bfloat16)["grad_atol"] == 1e-1


def test_assert_sequences_close() -> None:
    a = Sequence(jnp.array([[[1.0], [2.0], [9.0]]]), jnp.array([[True, True, False]]))
    # Invalid frames are ignored; extra invalid frames are fine.
    b = Sequence(jnp.array([[[1.0], [2.0]]]), jnp.array([[True, True]]))
    testing.assert_sequences_close(a, b)
    with pytest.raises(AssertionError, match=r"(?s)values differ.*\[b=0, t=1\]"):
        testing.assert_sequences_close(a, Sequence(jnp.array([[[1.0], [2.5]]]), b.mask))
    with pytest.raises(AssertionError, match=r"masks differ at \(batch, time\) \[\(0, 1\)\]"):
        testing.assert_sequences_close(a, Sequence(b.values, jnp.array([[True, False]])))
    # Extra trailing frames must be invalid.
    longer = Sequence(jnp.zeros((1, 4, 1)), jnp.array([[True, True, False, True]]))
    with pytest.raises(AssertionError, match="masks differ"):
        testing.assert_sequences_close(a, longer, msg="extra")


def test_init_and_bind() -> None:
    x = x_in()
    layer = testing.init_and_bind(ToyConv.Config(3), x, seed=4)
    assert layer.scope is not None
    assert layer.variables["params"]["kernel"].shape == (3, 3, 3)
    again = testing.init_and_bind(ToyConv.Config(3), x, seed=4)
    np.testing.assert_array_equal(
        layer.variables["params"]["kernel"], again.variables["params"]["kernel"]
    )
    randomized = testing.init_and_bind(ToyConv.Config(3), x, seed=4, randomize=True)
    assert not np.allclose(
        layer.variables["params"]["kernel"], randomized.variables["params"]["kernel"]
    )
    assert randomized.output_ratio == Fraction(1)


# Tolerance policy -------------------------------------------------------------


def test_tolerances_scale_atol_with_magnitude_and_dtype() -> None:
    assert testing.tolerances(np.float32) == {"rtol": 1e-5, "atol": 1e-5}
    assert testing.tolerances(np.float32, scale=100.0)["atol"] == pytest.approx(1e-3)
    assert testing.tolerances(jnp.bfloat16)["rtol"] == 2e-2
    assert testing.tolerances(np.float64)["rtol"] == 1e-10
    assert testing.tolerances(np.complex64)["rtol"] == 1e-5
    assert testing.tolerances(np.int32) == {"rtol": 0.0, "atol": 0.0}


def test_assert_allclose_accepts_cpu_noise_near_zero() -> None:
    # The AMD-vs-Intel case: a value near zero off by a few ulps of the
    # values around it is equal; rtol alone would call it 8e-6 relative error.
    expected = np.array([0.5, -0.25, 1.8e-9], np.float32)
    actual = expected + np.array([0, 0, 1.5e-8], np.float32)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=0)
    testing.assert_allclose(actual, expected)
    testing.assert_allclose(actual, expected, rtol=1e-6, atol=None)  # atol = rtol * scale


def test_assert_allclose_still_catches_real_differences() -> None:
    expected = np.array([0.5, -0.25, 0.0], np.float32)
    with pytest.raises(AssertionError):
        testing.assert_allclose(expected + np.float32(1e-3), expected)
    with pytest.raises(AssertionError):  # integers compare exactly
        testing.assert_allclose(np.array([1, 2]), np.array([1, 3]))
    # A float32 result against a float64 oracle is a float32 comparison.
    oracle = np.array([1.0, 2.0], np.float64)
    testing.assert_allclose(oracle.astype(np.float32) * np.float32(1 + 3e-7), oracle)
    with pytest.raises(AssertionError):  # bf16-sized error in a float32 check
        testing.assert_allclose(oracle.astype(np.float32) * np.float32(1 + 1e-2), oracle)
    testing.assert_allclose(jnp.asarray(oracle * (1 + 1e-2), jnp.bfloat16), oracle)
