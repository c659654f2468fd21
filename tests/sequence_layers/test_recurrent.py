"""Tests for sequence_layers.recurrent: LSTM, GRU, RNN and RGLRU."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import recurrent, testing, utils
from sequence_layers.sequence import Sequence

try:
    from sequence_layers import serialization
except ImportError:  # pragma: no cover - written by another change
    serialization = None

GATED = (recurrent.LSTM, recurrent.GRU, recurrent.RNN)


def _bind(config: Any, x: Sequence, seed: int = 0) -> Any:
    module = config.make()
    variables = module.init(jax.random.PRNGKey(seed), x, training=False, method="layer")
    return module.bind(variables)


def _verify(config: Any, x: Sequence, tol: float = 1e-5, **kwargs: Any) -> tuple[Any, Sequence]:
    layer = _bind(config, x)
    grad_tol = 1e-5 if tol <= 1e-5 else 1e-1
    y = testing.verify_contract(
        layer,
        x,
        training=False,
        rtol=tol,
        atol=tol,
        grad_rtol=grad_tol,
        grad_atol=grad_tol,
        jit=True,  # compiled checks: several times faster for scanned layers
        **kwargs,
    )
    return layer, y


def _np_params(layer: Any) -> dict[str, np.ndarray]:
    p = layer.variables["params"]
    out = {"kernel": np.asarray(p["kernel"]["kernel"], np.float64)}
    out["recurrent_kernel"] = np.asarray(p["recurrent_kernel"]["kernel"], np.float64)
    for name in ("bias", "recurrent_bias"):
        if name in p:
            out[name] = np.asarray(p[name], np.float64)
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


# Contract -------------------------------------------------------------------


@pytest.mark.parametrize("cls", GATED, ids=lambda c: c.__name__)
def test_gated_contract(cls: Any) -> None:
    x = testing.random_sequence(2, 11, 3, seed=1)
    layer, y = _verify(cls.Config(units=4), x)
    assert y.shape == (2, 11, 4)
    np.testing.assert_array_equal(np.asarray(y.mask), np.asarray(x.mask))
    assert layer.block_size == 1 and layer.output_ratio == 1
    assert layer.input_latency == 0 and layer.output_latency == 0
    assert layer.receptive_field == (-math.inf, 0)
    assert layer.supports_step


@pytest.mark.parametrize("cls", GATED, ids=lambda c: c.__name__)
def test_gated_step_in_larger_blocks(cls: Any) -> None:
    # Steps of 5 frames (a multiple of block_size 1) give layer()'s output.
    x = testing.random_sequence(3, 15, 2, seed=2)
    layer = _bind(cls.Config(units=3), x)
    y_layer = layer.layer(x, training=False)
    y_step, _, _ = utils.step_by_step_static(layer, x, training=False, blocks_per_step=5)
    testing.assert_sequences_close(y_step, y_layer, rtol=1e-5, atol=1e-5)


def test_lstm_bfloat16() -> None:
    x = testing.random_sequence(2, 9, 3, dtype=jnp.bfloat16, seed=3)
    config = recurrent.LSTM.Config(units=4, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    layer, y = _verify(config, x, tol=2e-2)
    assert y.dtype == jnp.bfloat16
    params = layer.variables["params"]
    assert params["recurrent_kernel"]["kernel"].dtype == jnp.bfloat16
    state = layer.get_initial_state(2, x.channel_spec, training=False)
    assert all(s.dtype == jnp.bfloat16 for s in state)


def test_lstm_params_mirror_reference() -> None:
    x = testing.random_sequence(2, 4, 3)
    layer = _bind(recurrent.LSTM.Config(units=8), x)
    shapes = jax.tree.map(lambda a: a.shape, layer.variables["params"])
    assert shapes == {
        "kernel": {"kernel": (3, 32)},
        "recurrent_kernel": {"kernel": (8, 32)},
        "bias": (32,),
    }
    bias = np.asarray(layer.variables["params"]["bias"])
    np.testing.assert_array_equal(bias, np.r_[np.zeros(8), np.ones(8), np.zeros(16)])


# Numerics against numpy -------------------------------------------------------


def _run_numpy(cls: Any, p: dict[str, np.ndarray], xs: np.ndarray, units: int) -> np.ndarray:
    """The textbook equations, one frame at a time (all frames valid)."""
    b = xs.shape[0]
    h = np.zeros((b, units))
    c = np.zeros((b, units))
    outs = []
    for t in range(xs.shape[1]):
        x = xs[:, t]
        if cls is recurrent.LSTM:
            z = x @ p["kernel"] + h @ p["recurrent_kernel"] + p["bias"]
            i, f, g, o = np.split(z, 4, axis=-1)
            c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
            h = _sigmoid(o) * np.tanh(c)
        elif cls is recurrent.GRU:
            xw = x @ p["kernel"] + p["bias"]
            hu = h @ p["recurrent_kernel"] + p["recurrent_bias"]
            xz, xr, xn = np.split(xw, 3, axis=-1)
            hz, hr, hn = np.split(hu, 3, axis=-1)
            z, r = _sigmoid(xz + hz), _sigmoid(xr + hr)
            n = np.tanh(xn + r * hn)
            h = z * h + (1 - z) * n
        else:
            h = np.tanh(x @ p["kernel"] + h @ p["recurrent_kernel"] + p["bias"])
        outs.append(h)
    return np.stack(outs, axis=1)


@pytest.mark.parametrize("cls", GATED, ids=lambda c: c.__name__)
def test_gated_matches_numpy(cls: Any) -> None:
    rng = np.random.default_rng(5)
    xs = rng.normal(size=(2, 4, 2)).astype(np.float32)
    x = Sequence.from_values(jnp.asarray(xs))
    config = cls.Config(units=3)
    layer = _bind(config, x)
    # Random biases, so every bias term is exercised.
    params = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), layer.variables["params"]
    )
    layer = config.make().bind({"params": params})
    expected = _run_numpy(cls, _np_params(layer), xs.astype(np.float64), 3)
    np.testing.assert_allclose(
        np.asarray(layer.layer(x, training=False).values), expected, rtol=1e-5, atol=1e-5
    )
    state = layer.get_initial_state(2, x.channel_spec, training=False)
    y, state = layer.step(x[:, :1], state, training=False)
    np.testing.assert_allclose(np.asarray(y.values), expected[:, :1], rtol=1e-5, atol=1e-5)
    # The state's h is the last output.
    np.testing.assert_allclose(np.asarray(state[-1])[:, 0], expected[:, 0], rtol=1e-5, atol=1e-5)


# Invalid frames and state layout ----------------------------------------------


def _invalid_block(batch: int, time: int, channels: int) -> Sequence:
    return Sequence(jnp.full((batch, time, channels), jnp.nan), jnp.zeros((batch, time), jnp.bool_))


@pytest.mark.parametrize("cls", GATED, ids=lambda c: c.__name__)
def test_invalid_frames_keep_state(cls: Any) -> None:
    x = testing.random_sequence(2, 5, 3, random_lengths=False, seed=6)
    layer = _bind(cls.Config(units=4), x)
    state0 = layer.get_initial_state(2, x.channel_spec, training=False)
    _, state = layer.step(x, state0, training=False)
    y_pad, state_after = layer.step(_invalid_block(2, 3, 3), state, training=False)
    jax.tree.map(np.testing.assert_array_equal, state_after, state)
    assert not np.asarray(y_pad.mask).any()
    assert np.isfinite(np.asarray(y_pad.values)).all()
    # A row with invalid frames in the middle gets the same output as the row
    # with those frames removed.
    mixed = Sequence(
        jnp.concatenate([x.values[:, :2], jnp.full((2, 3, 3), jnp.nan), x.values[:, 2:]], 1),
        jnp.asarray([[1, 1, 0, 0, 0, 1, 1, 1]] * 2, jnp.bool_),
    )
    y_mixed = layer.layer(mixed, training=False)
    y_plain = layer.layer(x, training=False)
    testing.assert_allclose(
        np.asarray(y_mixed.values[:, 5:]), np.asarray(y_plain.values[:, 2:]), rtol=1e-6
    )


@pytest.mark.parametrize("cls", GATED, ids=lambda c: c.__name__)
def test_gated_state_is_batch_major(cls: Any) -> None:
    layer = cls.Config(units=4).make()
    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    state = layer.get_initial_state(5, spec, training=False)
    expected = 2 if cls is recurrent.LSTM else 1
    assert len(state) == expected
    assert all(s.shape == (5, 1, 4) for s in state)


def test_gated_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="units > 0"):
        recurrent.LSTM.Config(units=0)
    with pytest.raises(ValueError, match="one channel dim"):
        recurrent.GRU.Config(units=2).make().get_output_shape((2, 3))


# RG-LRU -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("only_real", "scan_type", "param_dtype"),
    [
        (True, "auto", jnp.float32),
        (True, "associative_native", jnp.float32),
        (False, "linear_native", jnp.bfloat16),
    ],
)
def test_rglru_contract(only_real: bool, scan_type: str, param_dtype: Any) -> None:
    x = testing.random_sequence(2, 10, 8, seed=7)
    config = recurrent.RGLRU.Config(
        units=8, num_heads=2, only_real=only_real, scan_type=scan_type, param_dtype=param_dtype
    )
    tol = 1e-5 if param_dtype == jnp.float32 else 2e-2
    layer, y = _verify(config, x, tol=tol)
    assert y.shape == (2, 10, 8)
    assert layer.receptive_field == (-math.inf, 0)
    cu = 8 if only_real else 4
    shapes = jax.tree.map(lambda a: a.shape, layer.variables["params"])
    expected = {
        "a_param": (cu,),
        "input_gate": {"kernel": (2, 4, cu // 2), "bias": (2, cu // 2)},
        "a_gate": {"kernel": (2, 4, cu // 2), "bias": (2, cu // 2)},
    }
    if not only_real:
        expected["a_imag_param"] = (cu,)
    assert shapes == expected


def _rglru_numpy(p: dict[str, Any], xs: np.ndarray, heads: int, only_real: bool) -> np.ndarray:
    """recurrentgemma's RG-LRU on all-valid input, from zero state."""
    b, t, units = xs.shape
    cu = units if only_real else units // 2
    xh = xs.reshape(b, t, heads, units // heads)

    def gate(name: str) -> np.ndarray:
        w, bias = (np.asarray(p[name][k], np.float64) for k in ("kernel", "bias"))
        return _sigmoid(np.einsum("bthi,hij->bthj", xh, w) + bias).reshape(b, t, cu)

    gx, ga = gate("input_gate"), gate("a_gate")
    log_a = -8.0 * ga * np.log1p(np.exp(np.asarray(p["a_param"], np.float64)))
    a = np.exp(log_a).astype(np.complex128)
    xc = xs.astype(np.complex128)
    if not only_real:
        a = a * np.exp(1j * np.asarray(p["a_imag_param"], np.float64) * ga)
        xc = xs[..., :cu] + 1j * xs[..., cu:]
    mult = np.sqrt(1 - np.exp(2 * log_a))
    mult[:, 0] = 1.0  # reset at the first frame
    h = np.zeros((b, cu), np.complex128)
    outs = []
    for i in range(t):
        a_t = a[:, i] if i > 0 else 0.0
        h = a_t * h + xc[:, i] * gx[:, i] * mult[:, i]
        outs.append(h)
    hs = np.stack(outs, axis=1)
    return hs.real if only_real else np.concatenate([hs.real, hs.imag], axis=-1)


@pytest.mark.parametrize("only_real", [True, False])
def test_rglru_matches_numpy(only_real: bool) -> None:
    rng = np.random.default_rng(8)
    xs = rng.normal(size=(2, 6, 4)).astype(np.float32)
    x = Sequence.from_values(jnp.asarray(xs))
    config = recurrent.RGLRU.Config(units=4, num_heads=2, only_real=only_real)
    params = jax.tree.map(lambda a: a + 0.3, _bind(config, x).variables["params"])  # biases != 0
    layer = config.make().bind({"params": params})
    expected = _rglru_numpy(params, xs.astype(np.float64), 2, only_real)
    y = layer.layer(x, training=False)
    np.testing.assert_allclose(np.asarray(y.values), expected, rtol=1e-5, atol=1e-5)


def test_rglru_state_counts_valid_frames() -> None:
    x = testing.random_sequence(2, 6, 4, random_lengths=False, seed=9)
    layer = _bind(recurrent.RGLRU.Config(units=4, num_heads=1), x)
    state = layer.get_initial_state(2, x.channel_spec, training=False)
    assert state[0].shape == (2, 4) and state[0].dtype == jnp.float32
    assert state[1].shape == (2,) and state[1].dtype == jnp.int32
    # Row 0: 3 valid frames then 3 invalid; row 1 all valid.
    mask = jnp.asarray([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], jnp.bool_)
    block = Sequence(jnp.where(mask[..., None], x.values, jnp.nan), mask)
    _, state = layer.step(block, state, training=False)
    np.testing.assert_array_equal(np.asarray(state[1]), [3, 6])
    _, state_after = layer.step(_invalid_block(2, 2, 4), state, training=False)
    jax.tree.map(np.testing.assert_array_equal, state_after, state)


def test_rglru_leading_invalid_frames_shift_the_stream() -> None:
    # Deviation from the reference, on purpose: the reset happens at the
    # first *valid* frame, so leading invalid frames (an upstream layer's
    # latency) only delay the output instead of changing it.
    x = testing.random_sequence(2, 6, 4, random_lengths=False, seed=10)
    layer = _bind(recurrent.RGLRU.Config(units=4, num_heads=2), x)
    delayed = Sequence(jnp.full((2, 3, 4), jnp.nan), jnp.zeros((2, 3), jnp.bool_)).concatenate(x)
    y = layer.layer(x, training=False)
    y_delayed = layer.layer(delayed, training=False)
    np.testing.assert_allclose(
        np.asarray(y_delayed.values[:, 3:]), np.asarray(y.values), rtol=1e-6, atol=1e-6
    )


def test_recurrent_after_a_lookahead_layer() -> None:
    # A reverse-causal conv's leading step outputs are invalid; the recurrent
    # layers after it must skip them so step == layer for the whole stack.
    combinators = pytest.importorskip("sequence_layers.combinators")
    convolution = pytest.importorskip("sequence_layers.convolution")
    conv = convolution.Conv1D.Config(filters=4, kernel_size=3, padding="reverse_causal")
    config = combinators.Serial.Config(
        (conv, recurrent.RGLRU.Config(units=4, num_heads=2), recurrent.LSTM.Config(units=4))
    )
    x = testing.random_sequence(2, 8, 3, seed=12)
    layer, _ = _verify(config, x, test_receptive_field=False)
    assert layer.input_latency == 2 and layer.output_latency == 2


def test_rglru_config_validation() -> None:
    with pytest.raises(ValueError, match="must divide"):
        recurrent.RGLRU.Config(units=6, num_heads=4)
    with pytest.raises(ValueError, match="even units"):
        recurrent.RGLRU.Config(units=5, num_heads=1, only_real=False)
    with pytest.raises(ValueError, match="scan_type"):
        recurrent.RGLRU.Config(units=4, num_heads=1, scan_type="fast")
    with pytest.raises(ValueError, match="units=4"):
        recurrent.RGLRU.Config(units=4, num_heads=1).make().get_output_shape((3,))


# Serialization ----------------------------------------------------------------


@pytest.mark.skipif(serialization is None, reason="sequence_layers.serialization not available")
@pytest.mark.parametrize(
    "config",
    [
        recurrent.LSTM.Config(units=3, activation=jax.nn.relu, name="lstm"),
        recurrent.GRU.Config(units=3, use_bias=False),
        recurrent.RNN.Config(units=3, compute_dtype=jnp.float32),
        recurrent.RGLRU.Config(units=4, num_heads=2, only_real=False),
    ],
    ids=lambda c: type(c).__qualname__.split(".")[0],
)
def test_serialization_round_trip(config: Any) -> None:
    restored = serialization.loads(serialization.dumps(config))
    assert restored == config
    x = testing.random_sequence(2, 5, 4, seed=11)
    layer = _bind(config, x)
    y = layer.layer(x, training=False)
    y_restored = restored.make().apply(layer.variables, x, training=False, method="layer")
    np.testing.assert_array_equal(np.asarray(y.values), np.asarray(y_restored.values))
