"""Tests for the combinators: Serial, SerialModules, Parallel, Residual, Repeat,
CheckpointGradient, Blockwise, ParallelChannels, Bidirectional."""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from combinator_toys import (
    ToyAddConstant,
    ToyConv,
    ToyCumsum,
    ToyDense,
    ToyEmit,
    ToyScale,
)

from sequence_layers import combinators as C
from sequence_layers import testing, types
from sequence_layers.combinators_common import (
    CombinationMode,
    combine_output_shape,
    insert_with_unique_key,
)
from sequence_layers.sequence import Sequence

B, T, D = 2, 12, 3


def _x(*dims: int, seed: int = 1) -> Sequence:
    return testing.random_sequence(*(dims or (B, T, D)), seed=seed)


def _verify(
    cfg: types.SequenceLayerConfig,
    x: Sequence,
    constants: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[types.SequenceLayer, Sequence]:
    layer = testing.init_and_bind(cfg, x, constants=constants)
    kw.setdefault("grad_rtol", 1e-5)
    kw.setdefault("grad_atol", 1e-5)
    # Jitted checks: ~5x faster than eager for these small layers.
    kw.setdefault("jit", True)
    y = testing.verify_contract(layer, x, constants=constants, rtol=1e-5, atol=1e-5, **kw)
    return layer, y


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _close(a: Any, b: Any, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# Serial --------------------------------------------------------------------


def test_serial_contract_params_and_properties() -> None:
    from sequence_layers.convolution import Conv1D
    from sequence_layers.recurrent import LSTM

    cfg = C.Serial.Config(
        [
            Conv1D.Config(4, kernel_size=5, padding="reverse_causal"),
            Conv1D.Config(4, kernel_size=3, strides=2, padding="causal", name="down"),
            LSTM.Config(D),
        ]
    )
    layer, y = _verify(cfg, _x())
    params = layer.variables["params"]
    assert set(params) == {"layers_0", "down", "layers_2"}
    assert (layer.input_latency, layer.output_latency) == (4, 2)
    assert (layer.block_size, layer.output_ratio) == (2, Fraction(1, 2))
    assert layer.receptive_field_per_step == {0: (-math.inf, 4)}
    assert y.shape == (B, T // 2, D)
    # Structural properties need no binding.
    assert cfg.make().input_latency == 4 and cfg.make().supports_step


def test_serial_composition_values() -> None:
    def serial(*layers: types.SequenceLayerConfig) -> types.SequenceLayer:
        return C.Serial.Config(layers).make()

    strided = ToyConv.Config(4, strides=2, padding="causal")
    lagging = ToyConv.Config(5, padding="reverse_causal")
    assert (serial(strided, lagging).input_latency, serial(strided, lagging).output_latency) == (
        8,
        4,
    )
    assert (serial(lagging, strided).input_latency, serial(lagging, strided).output_latency) == (
        4,
        2,
    )
    # A 1-frame output latency cannot pass a 2x downsampling.
    with pytest.raises(ValueError, match="Delay"):
        _ = serial(
            ToyConv.Config(2, padding="reverse_causal"), ToyConv.Config(1, strides=2)
        ).output_latency
    assert serial(ToyConv.Config(3, strides=2), ToyConv.Config(3, strides=3)).block_size == 6
    same = ToyConv.Config(5, padding="same")
    assert serial(*[same] * 4).receptive_field == (-8, 8)
    assert not serial(same).supports_step
    assert serial(*[ToyConv.Config(5)] * 4).receptive_field_per_step == {0: (-16, 0)}
    empty = serial()
    assert (empty.input_latency, empty.block_size, empty.output_ratio) == (0, 1, 1)


def test_serial_nested_latency_folds_like_flat() -> None:
    a = ToyConv.Config(3, strides=2, padding="reverse_causal")
    b = ToyConv.Config(2, padding="reverse_causal")
    flat = C.Serial.Config([a, b, a]).make()
    nested = C.Serial.Config([C.Serial.Config([a, b]), a]).make()
    assert (nested.input_latency, nested.output_latency) == (
        flat.input_latency,
        flat.output_latency,
    )
    assert nested.block_size == flat.block_size
    assert nested.receptive_field_per_step == flat.receptive_field_per_step


def test_serial_share_scope_and_emits() -> None:
    cfg = C.Serial.Config(
        [ToyConv.Config(3), ToyEmit.Config(), ToyEmit.Config(name="tap"), ToyCumsum.Config()],
        share_scope=(True, False, False, True),
    )
    x = _x()
    layer = testing.init_and_bind(cfg, x)
    assert set(layer.variables["params"]) == {"kernel", "scale"}
    y, emits = layer.layer_with_emits(x, training=False)
    assert list(emits) == ["layers_0", "layers_1", "tap", "layers_3"]
    _close(emits["tap"].values, layer.layers[0].layer(x, training=False).values)
    state = layer.get_initial_state(B, x.channel_spec, training=False)
    y_step, _, step_emits = layer.step_with_emits(x, state, training=False)
    assert list(step_emits) == list(emits)
    _close(y_step.values, y.values)


def test_serial_config_validation() -> None:
    with pytest.raises(TypeError, match="SequenceLayerConfig"):
        C.Serial.Config([ToyConv.Config(3), "relu"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="share_scope"):
        C.Serial.Config([ToyConv.Config(3)], share_scope=(True, False))
    assert isinstance(C.Serial.Config([ToyConv.Config(3)]).layers, tuple)
    hash(C.Serial.Config([ToyConv.Config(3)]))


def test_insert_with_unique_key() -> None:
    emits: dict[str, Any] = {}
    keys = [insert_with_unique_key(emits, k, i) for i, k in enumerate(["a", "a", "b", "a"])]
    assert keys == ["a", "a_1", "b", "a_2"]


class _Owner(nn.Module):
    """Builds two layers itself and runs them through SerialModules."""

    def setup(self) -> None:
        self.first = ToyConv.Config(3).make()
        self.second = ToyDense.Config(4).make()
        self.emitter = ToyEmit.Config().make()
        self.both = C.SerialModules((self.first, self.second))
        self.twice = C.SerialModules((self.emitter, self.emitter))

    def __call__(self, x: Sequence) -> tuple[Sequence, Sequence, Any]:
        manual = self.second.layer(self.first.layer(x, training=False), training=False)
        _, emits = self.twice.layer_with_emits(x, training=False)
        return self.both.layer(x, training=False), manual, emits


def test_serial_modules_owns_nothing() -> None:
    x = _x()
    owner = _Owner()
    variables = owner.init(jax.random.PRNGKey(0), x)
    assert set(variables["params"]) == {"first", "second"}
    y, manual, emits = owner.apply(variables, x)
    _close(y.values, manual.values)
    assert list(emits) == ["emitter", "emitter_1"]


# Parallel ------------------------------------------------------------------


@pytest.mark.parametrize("combination", ["stack", "product"])
def test_parallel_contract(combination: str) -> None:
    cfg = C.Parallel.Config(
        [ToyConv.Config(3), ToyDense.Config(D), ToyCumsum.Config()], combination=combination
    )
    layer, y = _verify(cfg, _x())
    assert set(layer.variables["params"]) == {"layers_0", "layers_1", "layers_2"}
    assert layer.receptive_field_per_step == {0: (-math.inf, 0)}
    assert y.shape == ((B, T, 3, D) if combination == "stack" else (B, T, D))


def test_parallel_combinations_by_hand() -> None:
    x = _x()
    branches = [ToyScale.Config(2.0), ToyScale.Config(3.0)]
    v = np.asarray(x.values)
    expected = {
        "stack": np.stack([2 * v, 3 * v], axis=2),
        "concat": np.concatenate([2 * v, 3 * v], axis=-1),
        "add": 5 * v,
        "mean": 2.5 * v,
        "product": 6 * v * v,
    }
    for mode, want in expected.items():
        layer = C.Parallel.Config(branches, combination=mode).make()
        y = layer.apply({}, x)
        _close(y.mask_invalid().values, want)
        np.testing.assert_array_equal(np.asarray(y.mask), np.asarray(x.mask))
        assert layer.get_output_shape((D,)) == want.shape[2:]


def test_combine_output_shapes_broadcast() -> None:
    shapes = [(5,), (3, 5)]
    assert combine_output_shape(CombinationMode.STACK, shapes) == (2, 3, 5)
    assert combine_output_shape(CombinationMode.CONCAT, shapes) == (3, 10)
    assert combine_output_shape(CombinationMode.ADD, shapes) == (3, 5)
    assert combine_output_shape(CombinationMode.CONCAT, [(), ()]) == (2,)
    with pytest.raises(ValueError, match="broadcast"):
        combine_output_shape(CombinationMode.ADD, [(2,), (3,)])
    with pytest.raises(ValueError, match="Unknown combination"):
        C.Parallel.Config([], combination="sum")


def test_parallel_mismatches_raise() -> None:
    x = _x()
    ratio = C.Parallel.Config([ToyConv.Config(3, strides=2), ToyDense.Config(D)])
    with pytest.raises(ValueError, match="equal output_ratio"):
        _ = ratio.make().output_ratio
    with pytest.raises(ValueError, match="equal output_ratio"):
        testing.init_and_bind(ratio, x)
    latency = C.Parallel.Config(
        [ToyConv.Config(3, padding="reverse_causal"), ToyConv.Config(3, padding="causal")]
    )
    with pytest.raises(ValueError, match=r"equal input_latency.*Delay"):
        _ = latency.make().input_latency
    with pytest.raises(ValueError, match="equal input_latency"):
        testing.init_and_bind(latency, x)


# Residual ------------------------------------------------------------------


def test_residual_contract_and_emits() -> None:
    cfg = C.Residual.Config([ToyConv.Config(3), ToyEmit.Config()])
    x = _x()
    layer, y = _verify(cfg, x)
    assert set(layer.variables["params"]) == {"layers_0"}
    body = layer.layers[0].layer(x, training=False)
    _close(y.values, (body.values + x.values) * x.mask[..., None])
    _, (body_emits, shortcut_emits) = layer.layer_with_emits(x, training=False)
    assert list(body_emits) == ["layers_0", "layers_1"]
    assert shortcut_emits == {}


def test_residual_lagging_body_needs_delay() -> None:
    body = [ToyConv.Config(3, padding="reverse_causal")]
    lagging = C.Residual.Config(body)
    with pytest.raises(ValueError, match=r"Delay\.Config\(2, delay_layer_output=False\)"):
        _ = lagging.make().input_latency
    with pytest.raises(ValueError, match="shortcut"):
        testing.init_and_bind(lagging, _x())
    from sequence_layers.dsp import Delay

    fixed = C.Residual.Config(body, shortcut_layers=[Delay.Config(2, delay_layer_output=False)])
    layer, _ = _verify(fixed, _x())
    assert (layer.input_latency, layer.output_latency) == (2, 2)
    assert layer.receptive_field_per_step == {0: (0, 2)}
    assert set(layer.variables["params"]) == {"layers_0"}


def test_residual_shape_mismatch_and_projection_shortcut() -> None:
    x = _x()
    with pytest.raises(ValueError, match="same output shape"):
        testing.init_and_bind(C.Residual.Config([ToyDense.Config(5)]), x)
    cfg = C.Residual.Config([ToyDense.Config(5)], shortcut_layers=ToyDense.Config(5))
    layer, y = _verify(cfg, x)
    assert y.shape == (B, T, 5)
    assert _shapes(layer.variables["params"]["shortcut_layer"]) == {"bias": (5,), "kernel": (3, 5)}


# Repeat --------------------------------------------------------------------


def test_repeat_folds_latency() -> None:
    from sequence_layers.convolution import Conv1D

    # Three reverse_causal k=3 convs lag by 2 each: 6 (the reference says 4).
    child = Conv1D.Config(D, kernel_size=3, padding="reverse_causal")
    layer, _ = _verify(C.Repeat.Config(child, num_repeats=3), _x())
    assert (layer.input_latency, layer.output_latency) == (6, 6)
    assert layer.receptive_field_per_step == {0: (0, 6)}
    assert _shapes(layer.variables["params"]) == {
        "child_layer": {"kernel": (3, 3, D, D), "bias": (3, D)}
    }
    state = layer.get_initial_state(B, _x().channel_spec, training=False)
    # Batch-major: [b, num_repeats, ...].
    assert {leaf.shape[:2] for leaf in jax.tree.leaves(state)} == {(B, 3)}
    # Emits: one entry per repeat.
    emitting = testing.init_and_bind(C.Repeat.Config(ToyEmit.Config(), num_repeats=2), _x())
    _, emits = emitting.layer_with_emits(_x(), training=False)
    assert len(emits) == 2 and isinstance(emits[0], Sequence)
    _close(emits[1].values, _x().values)


def test_repeat_matches_unrolled_serial() -> None:
    child = ToyConv.Config(3, padding="causal")
    x = _x()
    repeat = testing.init_and_bind(C.Repeat.Config(child, num_repeats=2), x)
    kernels = repeat.variables["params"]["child_layer"]["kernel"]
    serial = C.Serial.Config([child, child]).make()
    y_serial = serial.apply(
        {"params": {f"layers_{i}": {"kernel": kernels[i]} for i in range(2)}}, x
    )
    _close(repeat.layer(x, training=False).values, y_serial.values)


def test_repeat_remat_same_outputs_and_gradients() -> None:
    x = _x()
    child = C.Serial.Config([ToyConv.Config(3), ToyCumsum.Config()])
    plain = C.Repeat.Config(child, num_repeats=2).make()
    remat = C.Repeat.Config(child, num_repeats=2, remat=True).make()
    variables = plain.init(jax.random.PRNGKey(0), x)

    def loss(module: nn.Module, params: Any, values: jax.Array) -> jax.Array:
        y = module.apply({"params": params}, Sequence(values, x.mask))
        return jnp.sum(y.mask_invalid().values ** 2)

    grads = [
        jax.jit(jax.grad(functools.partial(loss, m), argnums=(0, 1)))(variables["params"], x.values)
        for m in (plain, remat)
    ]
    jax.tree.map(_close, *grads)
    assert jnp.any(grads[0][1] != 0)
    _close(remat.apply(variables, x).values, plain.apply(variables, x).values)
    _verify(C.Repeat.Config(ToyCumsum.Config(), num_repeats=2, remat=True, unroll_step=True), x)


def test_repeat_validation() -> None:
    with pytest.raises(ValueError, match="num_repeats"):
        C.Repeat.Config(ToyConv.Config(3), num_repeats=0)
    with pytest.raises(ValueError, match="output_ratio 1"):
        testing.init_and_bind(C.Repeat.Config(ToyConv.Config(3, strides=2), 2), _x())
    with pytest.raises(ValueError, match="preserve"):
        C.Repeat.Config(ToyDense.Config(5), 2).make().get_output_shape((D,))


# Wrappers ------------------------------------------------------------------


def test_checkpoint_gradient() -> None:
    cfg = C.CheckpointGradient.Config(ToyConv.Config(5, padding="reverse_causal"))
    layer, y = _verify(cfg, _x())
    assert set(layer.variables["params"]) == {"child_layer"}
    assert (layer.input_latency, layer.output_latency) == (4, 4)
    plain = ToyConv.Config(5, padding="reverse_causal").make()
    _close(y.values, plain.apply({"params": layer.variables["params"]["child_layer"]}, _x()).values)


def test_blockwise() -> None:
    cfg = C.Blockwise.Config(ToyConv.Config(3, strides=2), block_size=4)
    layer, _ = _verify(cfg, _x())
    assert (layer.block_size, layer.output_ratio) == (4, Fraction(1, 2))
    assert set(layer.variables["params"]) == {"kernel"}
    with pytest.raises(ValueError, match="multiple"):
        C.Blockwise.Config(ToyConv.Config(3, strides=2), block_size=3)


def test_parallel_channels_shares_parameters() -> None:
    x = _x(B, T, 6)
    cfg = C.ParallelChannels.Config(ToyDense.Config(2), num_groups=3, combination="concat")
    layer, y = _verify(cfg, x)
    params = layer.variables["params"]
    assert _shapes(params) == {"bias": (2,), "kernel": (2, 2)}
    dense = ToyDense.Config(2).make()
    parts = [
        dense.apply({"params": params}, Sequence(v, x.mask)) for v in jnp.split(x.values, 3, -1)
    ]
    _close(y.values, jnp.concatenate([p.values for p in parts], -1) * x.mask[..., None])
    with pytest.raises(ValueError, match="divisible"):
        layer.get_output_shape((5,))
    _verify(C.ParallelChannels.Config(ToyConv.Config(3), num_groups=2), _x(B, T, 4))


def test_bidirectional() -> None:
    cfg = C.Bidirectional.Config(ToyConv.Config(3), ToyConv.Config(3), combination="concat")
    x = _x(B, T, 2)
    layer = testing.init_and_bind(cfg, x)
    assert not layer.supports_step
    assert layer.receptive_field_per_step == {0: (-2, 2)}
    testing.verify_contract(
        layer, x, rtol=1e-5, atol=1e-5, grad_rtol=1e-5, grad_atol=1e-5, jit=True
    )
    y = layer.layer(x, training=False)
    fwd, bwd = layer.variables["params"]["forward"], layer.variables["params"]["backward"]
    conv = ToyConv.Config(3).make()
    y_fwd = conv.apply({"params": fwd}, x)
    y_bwd = conv.apply({"params": bwd}, x.reverse_time()).reverse_time()
    _close(y.values, jnp.concatenate([y_fwd.values, y_bwd.values], -1))
    state = layer.get_initial_state(B, x.channel_spec, training=False)
    with pytest.raises(ValueError, match="does not support step"):
        layer.step(x, state, training=False)
    with pytest.raises(ValueError, match="output ratios"):
        C.Bidirectional.Config(ToyConv.Config(3, strides=2), ToyConv.Config(3))


# Constants -----------------------------------------------------------------


def test_constants_reach_nested_children() -> None:
    x = _x()
    bias = jnp.arange(B * D, dtype=jnp.float32).reshape(B, D)
    constants = {"bias": bias}
    cfg = C.Serial.Config(
        [
            C.Parallel.Config([ToyAddConstant.Config(), ToyScale.Config(1.0)], combination="add"),
            C.Residual.Config([ToyAddConstant.Config()]),
            C.Repeat.Config(ToyAddConstant.Config(), num_repeats=2),
        ]
    )
    _, y = _verify(cfg, x, constants=constants)
    v, b = np.asarray(x.values), np.asarray(bias)[:, None]
    after_parallel = 2 * v + b
    want = 2 * after_parallel + b + 2 * b
    _close(y.values, want * np.asarray(x.mask)[..., None])
    assert constants.keys() == {"bias"}
