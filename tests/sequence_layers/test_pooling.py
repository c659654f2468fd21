"""Tests for {Min,Max,Average}Pooling{1,2,3}D."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import pooling, testing, types
from sequence_layers.sequence import Sequence

ALL_PADDINGS = [m.value for m in types.PaddingMode]
STEPPABLE = ("reverse_causal_valid", "causal", "reverse_causal", "semicausal")
TOL = {"rtol": 1e-5, "atol": 1e-5, "grad_rtol": 1e-4, "grad_atol": 1e-4}
POOLS_1D = {
    "max": pooling.MaxPooling1D,
    "min": pooling.MinPooling1D,
    "average": pooling.AveragePooling1D,
}


def _x(*channels: int, t: int = 8) -> Sequence:
    return testing.random_sequence(2, t, *channels, seed=2)


def _verify(config: types.SequenceLayerConfig, x: Sequence) -> Any:
    layer = testing.init_and_bind(config, x)
    padding = getattr(config, "padding", getattr(config, "time_padding", ""))
    # semicausal_full outputs are longer than the input; the receptive-field
    # check measures dependencies per input frame.
    rf = padding != "semicausal_full"
    testing.verify_contract(layer, x, test_receptive_field=rf, **TOL)
    return layer


# Max and average with every padding at stride 2, max's steppable modes also at
# stride 1; min shares max's code path, so fewer of its modes.
CASES = (
    [(kind, p, 2) for kind in ("max", "average") for p in ALL_PADDINGS]
    + [("max", p, 1) for p in STEPPABLE]
    + [("min", p, 2) for p in (*STEPPABLE, "valid")]
)


@pytest.mark.parametrize("kind, padding, strides", CASES)
def test_pooling1d_contract(kind: str, padding: str, strides: int) -> None:
    layer = _verify(POOLS_1D[kind].Config(3, strides=strides, padding=padding), _x(2))
    assert layer.supports_step == (padding in STEPPABLE)
    assert layer.output_ratio == Fraction(1, strides)


@pytest.mark.parametrize(
    "kind, padding", [("max", "causal"), ("min", "semicausal"), ("average", "same")]
)
def test_pooling1d_dilation_contract(kind: str, padding: str) -> None:
    _verify(POOLS_1D[kind].Config(2, strides=2, dilation_rate=2, padding=padding), _x(2))


def test_dilated_window_without_valid_frame_gives_zero() -> None:
    # k=2, d=3, same: output 0 reads frames -1 (padding) and 2 (invalid) only,
    # yet is valid (frame 0 is); it must not be -inf.
    x = Sequence(jnp.array([[5.0, 1.0, 2.0]])[:, :, None], jnp.array([[True, False, False]]))
    y = pooling.MaxPooling1D.Config(2, dilation_rate=3, padding="same").make().apply({}, x)
    np.testing.assert_array_equal(np.asarray(y.mask), [[True, False, False]])
    assert float(y.values[0, 0, 0]) == 0.0


def test_masked_average_contract() -> None:
    config = pooling.AveragePooling1D.Config(
        3, strides=2, padding="reverse_causal", masked_average=True
    )
    _verify(config, _x(2))


# x = 1, -2, 3, 4 valid, then one invalid frame holding a huge value.
_X = Sequence(
    jnp.array([1.0, -2.0, 3.0, 4.0, 100.0]).reshape(1, 5, 1),
    jnp.array([[True, True, True, True, False]]),
)


@pytest.mark.parametrize(
    "config, expected_values, expected_mask",
    [
        (pooling.MaxPooling1D.Config(2, padding="causal"), [1, 1, 3, 4, 4], [1, 1, 1, 1, 0]),
        (pooling.MinPooling1D.Config(2, padding="causal"), [1, -2, -2, 3, 4], [1, 1, 1, 1, 0]),
        (pooling.MaxPooling1D.Config(2, padding="reverse_causal"), [1, 3, 4, 4], [1, 1, 1, 1, 0]),
        # Invalid frames count as zeros; the divisor is the pool size.
        (
            pooling.AveragePooling1D.Config(2, padding="causal"),
            [0.5, -0.5, 0.5, 3.5, 2.0],
            [1, 1, 1, 1, 0],
        ),
        # masked_average divides by the valid frames in the window.
        (
            pooling.AveragePooling1D.Config(2, padding="reverse_causal", masked_average=True),
            [-0.5, 0.5, 3.5, 4.0],
            [1, 1, 1, 1, 0],
        ),
        (pooling.MaxPooling1D.Config(2, strides=2, padding="valid"), [1, 4], [1, 1]),
        (pooling.MaxPooling1D.Config(3, padding="valid"), [3, 4, 4], [1, 1, 0]),
    ],
)
def test_pooling1d_numerics(
    config: types.SequenceLayerConfig, expected_values: list[float], expected_mask: list[int]
) -> None:
    layer = config.make()
    y = layer.apply({}, _X)
    np.testing.assert_array_equal(np.asarray(y.mask[0]), np.array(expected_mask, bool))
    n = len(expected_values)
    valid = np.asarray(y.mask[0, :n])
    np.testing.assert_allclose(
        np.asarray(y.values[0, :n, 0])[valid], np.array(expected_values)[valid]
    )


def test_pooling2d_numerics() -> None:
    # [1, 4, 3] frames; spatial same padding with -inf for max.
    x = Sequence.from_values(jnp.arange(8.0).reshape(1, 2, 4, 1))
    y = pooling.MaxPooling2D.Config((2, 2), strides=(1, 2), time_padding="causal").make()
    out = y.apply({}, x)
    np.testing.assert_allclose(np.asarray(out.values[0, :, :, 0]), [[1, 3], [5, 7]])
    avg = pooling.AveragePooling2D.Config((1, 2), time_padding="causal").make()
    out = avg.apply({}, x)
    # 'same' spatial padding (0, 1) pads with zeros: the last column halves.
    np.testing.assert_allclose(np.asarray(out.values[0, 0, :, 0]), [0.5, 1.5, 2.5, 1.5])


@pytest.mark.parametrize("layer_cls", [pooling.MaxPooling2D, pooling.AveragePooling2D])
def test_pooling2d_contract(layer_cls: Any) -> None:
    config = layer_cls.Config((3, 2), strides=(2, 2), time_padding="semicausal")
    layer = _verify(config, _x(5, 2))
    assert layer.get_output_shape((5, 2)) == (3, 2)


def test_min_pooling2d_contract_explicit_padding() -> None:
    config = pooling.MinPooling2D.Config(
        2, dilation_rate=(1, 2), time_padding="reverse_causal_valid", spatial_padding=(1, 1)
    )
    layer = _verify(config, _x(5, 2))
    assert layer.get_output_shape((5, 2)) == (5, 2)


@pytest.mark.parametrize(
    "layer_cls", [pooling.MinPooling3D, pooling.MaxPooling3D, pooling.AveragePooling3D]
)
def test_pooling3d_contract(layer_cls: Any) -> None:
    config = layer_cls.Config(
        (2, 2, 3), strides=(2, 1, 1), time_padding="causal", spatial_padding=("valid", "same")
    )
    layer = _verify(config, _x(3, 3, 2))
    assert layer.get_output_shape((3, 3, 2)) == (2, 3, 2)


def test_structural_properties() -> None:
    layer = types.detached(pooling.MaxPooling1D.Config(5, strides=2, padding="reverse_causal"))
    assert (layer.input_latency, layer.output_latency, layer.block_size) == (4, 2, 2)
    assert layer.receptive_field == (0, 4)
    semicausal = types.detached(pooling.AveragePooling1D.Config(5, strides=2, padding="semicausal"))
    assert semicausal.receptive_field == (-3, 1)
    # causal_valid steps for Conv but not for pooling (as in the reference).
    assert not types.detached(pooling.MinPooling1D.Config(3, padding="causal_valid")).supports_step


@pytest.mark.parametrize("padding", ["causal_valid", "same", "valid", "semicausal_full"])
def test_non_steppable_raises_on_step(padding: str) -> None:
    layer = pooling.MaxPooling1D.Config(3, padding=padding).make()
    with pytest.raises(ValueError, match="not steppable"):
        layer.get_initial_state(2, _x(2).channel_spec, training=False)
    state = Sequence(jnp.zeros((2, 2, 2)), jnp.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="does not support step"):
        layer.apply({}, _x(2), state, training=False, method=layer.step)


def test_initial_state_holds_identity() -> None:
    spec = _x(2).channel_spec
    state = pooling.MaxPooling1D.Config(3, padding="causal").make()
    buffer = state.get_initial_state(2, spec, training=False)
    assert type(buffer) is Sequence
    assert np.all(np.asarray(buffer.values) == -np.inf)
    assert not np.asarray(buffer.mask).any()


def test_integer_inputs() -> None:
    x = Sequence(jnp.array([[3, 1, 4, 1]], jnp.int32)[:, :, None], jnp.ones((1, 4), bool))
    y = pooling.MaxPooling1D.Config(2, padding="causal").make().apply({}, x)
    np.testing.assert_array_equal(np.asarray(y.values[0, :, 0]), [3, 3, 4, 4])
    avg = pooling.AveragePooling1D.Config(2, padding="causal").make().apply({}, x)
    np.testing.assert_array_equal(np.asarray(avg.values[0, :, 0]), [1, 2, 2, 2])


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="Unknown padding"):
        pooling.MaxPooling1D.Config(2, padding="nope")
    with pytest.raises(ValueError, match="pool_size must be >= 1"):
        pooling.MaxPooling1D.Config(0)
    with pytest.raises(ValueError, match="2 paddings"):
        pooling.MaxPooling3D.Config(2, spatial_padding="same")
    with pytest.raises(ValueError, match="2 ints"):
        pooling.MaxPooling2D.Config((2, 2, 2))
    assert pooling.MinPooling3D.Config(2).pool_size == (2, 2, 2)
    hash(pooling.AveragePooling3D.Config([2, 1, 1], spatial_padding=["same", [0, 1]]))


@pytest.mark.parametrize(
    "config",
    [
        pooling.MaxPooling1D.Config(3, strides=2, padding="causal"),
        pooling.MinPooling1D.Config(2, dilation_rate=2, padding="reverse_causal"),
        pooling.AveragePooling1D.Config(3, padding="semicausal", masked_average=True),
        pooling.MaxPooling2D.Config((2, 3), time_padding="causal", spatial_padding=(1, 1)),
        pooling.MinPooling2D.Config(2, strides=(2, 1), time_padding="reverse_causal_valid"),
        pooling.AveragePooling2D.Config(2, time_padding="causal", masked_average=True),
        pooling.MaxPooling3D.Config(2, time_padding="causal", spatial_padding=("valid", (1, 0))),
        pooling.MinPooling3D.Config(2, time_padding="semicausal"),
        pooling.AveragePooling3D.Config((2, 1, 2), time_padding="causal"),
    ],
    ids=lambda c: type(c).__qualname__,
)
def test_serialization_round_trip(config: types.SequenceLayerConfig) -> None:
    serialization = pytest.importorskip("sequence_layers.serialization")
    restored = serialization.loads(serialization.dumps(config))
    assert restored == config
    rank = len(config.pool_size) if isinstance(config.pool_size, tuple) else 1
    x = _x(*([5, 4][: rank - 1]), 2, t=6)
    y1 = config.make().apply({}, x).mask_invalid()
    y2 = restored.make().apply({}, x).mask_invalid()
    np.testing.assert_array_equal(np.asarray(y1.values), np.asarray(y2.values))
