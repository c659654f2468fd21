"""Tests for Conv1D, DepthwiseConv1D, Conv2D and Conv3D."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing, types
from sequence_layers.convolution import Conv1D, DepthwiseConv1D
from sequence_layers.convolution_nd import Conv2D, Conv3D
from sequence_layers.sequence import Sequence
from sequence_layers.utils import step_by_step_static
from sequence_layers.weight_normalization import (
    L2WeightNormalization,
    SpectralWeightNormalization,
)

ALL_PADDINGS = [m.value for m in types.PaddingMode]
STEPPABLE = ("causal_valid", "reverse_causal_valid", "causal", "reverse_causal", "semicausal")
TOL = {"rtol": 1e-5, "atol": 1e-5, "grad_rtol": 1e-4, "grad_atol": 1e-4}


def _x(*channels: int, t: int = 9, dtype: Any = jnp.float32, seed: int = 0) -> Sequence:
    # One shape per family keeps eager-op compilation caches warm across tests.
    return testing.random_sequence(2, t, *channels, dtype=dtype, seed=seed)


def _verify(config: types.SequenceLayerConfig, x: Sequence, **tol: float) -> Any:
    layer = testing.init_and_bind(config, x)
    # semicausal_full outputs are longer than the input; the receptive-field
    # check measures dependencies per input frame.
    rf = getattr(config, "padding", getattr(config, "time_padding", "")) != "semicausal_full"
    testing.verify_contract(layer, x, test_receptive_field=rf, **{**TOL, **tol})
    return layer


# Non-steppable modes only run layer-wise; stride 1 numerics for them are
# checked by hand below.
CONTRACT_CASES = [(p, s) for p in ALL_PADDINGS for s in (1, 2) if p in STEPPABLE or s == 2]


@pytest.mark.parametrize("padding, strides", CONTRACT_CASES)
def test_conv1d_contract(padding: str, strides: int) -> None:
    layer = _verify(Conv1D.Config(4, 3, strides=strides, padding=padding), _x(3))
    assert layer.supports_step == (padding in STEPPABLE)
    assert layer.block_size == strides
    assert layer.output_ratio == Fraction(1, strides)


@pytest.mark.parametrize("padding, strides", [("causal", 1), ("reverse_causal_valid", 2)])
def test_conv1d_dilation_contract(padding: str, strides: int) -> None:
    _verify(Conv1D.Config(4, 3, strides=strides, dilation_rate=2, padding=padding), _x(3))


def test_conv1d_groups_activation_weight_norm_contract() -> None:
    config = Conv1D.Config(
        6, 2, padding="reverse_causal", groups=3, activation=jax.nn.tanh, use_weight_norm=True
    )
    layer = _verify(config, _x(3))
    params = layer.variables["params"]
    assert params["kernel"].shape == (2, 1, 6)
    assert params["scale"].shape == (6,)
    y = layer.layer(_x(3), training=False)
    assert float(jnp.max(jnp.abs(y.values))) <= 1.0  # tanh applied
    no_bias = Conv1D.Config(4, 3, use_bias=False).make()
    assert "bias" not in no_bias.init(jax.random.PRNGKey(0), _x(3))["params"]


def test_conv1d_bfloat16() -> None:
    config = Conv1D.Config(
        4, 3, strides=2, padding="causal", param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16
    )
    x = _x(3, dtype=jnp.bfloat16)
    layer = _verify(config, x, rtol=2e-2, atol=2e-2, grad_rtol=1e-1, grad_atol=1e-1)
    assert layer.layer(x, training=False).dtype == jnp.bfloat16
    assert layer.variables["params"]["kernel"].dtype == jnp.bfloat16
    assert layer.get_output_dtype(jnp.float32) == jnp.bfloat16
    promoted = Conv1D.Config(4, 3, param_dtype=jnp.bfloat16).make()
    assert promoted.get_output_dtype(jnp.float32) == jnp.float32


def _ones_conv(padding: str, strides: int = 1, kernel_size: int = 3) -> Any:
    return Conv1D.Config(
        1,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=False,
        kernel_init=nn.initializers.ones,
    ).make()


@pytest.mark.parametrize(
    "padding, strides, expected_values, expected_mask",
    [
        ("causal", 1, [1, 3, 6, 9, 7], [1, 1, 1, 1, 0]),
        ("reverse_causal", 1, [6, 9, 7, 4, 0], [1, 1, 1, 1, 0]),
        ("same", 1, [3, 6, 9, 7, 4], [1, 1, 1, 1, 0]),
        ("valid", 1, [6, 9, 7], [1, 1, 0]),
        ("causal_valid", 1, [1, 3, 6, 9, 7], [1, 1, 1, 1, 0]),
        ("reverse_causal_valid", 1, [6, 9, 7, 4, 0], [1, 1, 0, 0, 0]),
        ("semicausal_full", 1, [1, 3, 6, 9, 7, 4, 0], [1, 1, 1, 1, 1, 1, 0]),
        ("causal", 2, [1, 6, 7], [1, 1, 0]),
        ("semicausal", 2, [3, 9, 4], [1, 1, 0]),
    ],
)
def test_conv1d_ones_kernel_numerics(
    padding: str, strides: int, expected_values: list[int], expected_mask: list[int]
) -> None:
    # x = 1, 2, 3, 4 valid then one invalid frame holding garbage (ignored).
    x = Sequence(
        jnp.array([1.0, 2.0, 3.0, 4.0, 100.0]).reshape(1, 5, 1),
        jnp.array([[True, True, True, True, False]]),
    )
    conv = _ones_conv(padding, strides)
    params = conv.init(jax.random.PRNGKey(0), x)
    y = conv.apply(params, x)
    np.testing.assert_array_equal(np.asarray(y.mask[0]), np.array(expected_mask, bool))
    valid = np.asarray(y.mask[0])
    np.testing.assert_allclose(
        np.asarray(y.values[0, :, 0])[valid], np.array(expected_values, float)[valid]
    )


def test_conv1d_dilated_valid_mask_reads_taps_only() -> None:
    # k=2, d=2: output j reads frames j and j+2 only; frame 1 invalid only
    # invalidates outputs that read it.
    mask = jnp.array([[True, False, True, True, True]])
    x = Sequence(jnp.ones((1, 5, 1)), mask)
    conv = Conv1D.Config(1, 2, dilation_rate=2, padding="valid").make()
    y = conv.apply(conv.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_array_equal(np.asarray(y.mask), [[True, False, True]])


@pytest.mark.parametrize(
    "config, steppable, block, ratio, in_lat, out_lat, rf",
    [
        (Conv1D.Config(1, 5, padding="causal"), True, 1, Fraction(1), 0, 0, (-4, 0)),
        (Conv1D.Config(1, 5, padding="same"), False, 1, Fraction(1), 0, 0, (-2, 2)),
        (Conv1D.Config(1, 5, strides=2, padding="causal"), True, 2, Fraction(1, 2), 0, 0, (-4, 0)),
        (Conv1D.Config(1, 5, padding="reverse_causal"), True, 1, Fraction(1), 4, 4, (0, 4)),
        (
            Conv1D.Config(1, 5, strides=2, padding="reverse_causal"),
            True,
            2,
            Fraction(1, 2),
            4,
            2,
            (0, 4),
        ),
        (
            Conv1D.Config(1, 5, strides=2, padding="semicausal"),
            True,
            2,
            Fraction(1, 2),
            0,
            0,
            (-3, 1),
        ),
        (Conv1D.Config(1, 5, padding="semicausal_full"), False, 1, Fraction(1), 4, 0, (-4, 0)),
        (Conv1D.Config(1, 5, padding="valid"), False, 1, Fraction(1), 0, 0, (0, 4)),
        (
            Conv1D.Config(1, 3, dilation_rate=2, padding="causal"),
            True,
            1,
            Fraction(1),
            0,
            0,
            (-4, 0),
        ),
    ],
)
def test_structural_properties_match_reference(
    config: Conv1D.Config,
    steppable: bool,
    block: int,
    ratio: Fraction,
    in_lat: int,
    out_lat: int,
    rf: tuple[int, int],
) -> None:
    layer = types.detached(config)
    assert layer.supports_step == steppable
    assert layer.block_size == block
    assert layer.output_ratio == ratio
    assert layer.input_latency == in_lat
    assert layer.output_latency == out_lat
    assert layer.receptive_field == rf


@pytest.mark.parametrize("padding", ["same", "valid", "semicausal_full"])
def test_non_steppable_padding_raises_on_step(padding: str) -> None:
    x = _x(3)
    conv = Conv1D.Config(4, 3, padding=padding).make()
    params = conv.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="not steppable"):
        conv.apply(params, 2, x.channel_spec, training=False, method=conv.get_initial_state)
    state = Sequence(jnp.zeros((2, 2, 3)), jnp.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="does not support step"):
        conv.apply(params, x, state, training=False, method=conv.step)


def test_reverse_causal_valid_leading_outputs_invalid_in_step() -> None:
    # Our deliberate change: the initial buffer is invalid, so the leading
    # output_latency step outputs are invalid (the reference marks them valid).
    x = Sequence.from_values(jnp.ones((1, 6, 2)))
    conv = Conv1D.Config(2, 3, padding="reverse_causal_valid").make()
    params = conv.init(jax.random.PRNGKey(0), x)
    bound = conv.bind(params)
    y, _, _ = step_by_step_static(
        bound, x.pad_time(0, bound.input_latency, valid=False), training=False
    )
    assert not np.asarray(y.mask[:, : bound.output_latency]).any()
    expected = bound.layer(x, training=False).mask
    np.testing.assert_array_equal(np.asarray(y.mask[:, bound.output_latency :]), expected)


def test_depthwise_conv1d() -> None:
    config = DepthwiseConv1D.Config(
        3, strides=2, depth_multiplier=2, dilation_rate=2, padding="semicausal"
    )
    layer = _verify(config, _x(3))
    assert layer.variables["params"]["kernel"].shape == (3, 1, 6)
    assert layer.get_output_shape((3,)) == (6,)


@pytest.mark.parametrize(
    "kernel, strides, dilation, multiplier, padding, dtype",
    [
        (15, 1, 1, 1, (14, 0), jnp.float32),
        (3, 2, 2, 2, (1, 3), jnp.float32),
        (4, 3, 1, 3, (0, 0), jnp.float32),
        (5, 1, 1, 1, (4, 0), jnp.bfloat16),
        (7, 1, 1, 1, (0, 0), jnp.float32),  # longer than the input: no output frames
    ],
)
def test_depthwise_sum_equals_grouped_convolution(
    kernel: int, strides: int, dilation: int, multiplier: int, padding: Any, dtype: Any
) -> None:
    # Depthwise convs run as a sum of shifted slices (fast on CPU); it must
    # equal XLA's grouped convolution for every stride, dilation, multiplier.
    from sequence_layers.convolution import _depthwise_conv1d

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 6 if kernel == 7 else 11, 4)), dtype)
    k = jnp.asarray(rng.normal(size=(kernel, 1, 4 * multiplier)), dtype)
    got = _depthwise_conv1d(x, k, padding, strides, dilation)
    want = jax.lax.conv_general_dilated(
        x,
        k,
        window_strides=(strides,),
        padding=(padding,),
        rhs_dilation=(dilation,),
        dimension_numbers=("NHC", "HIO", "NHC"),
        feature_group_count=4,
        preferred_element_type=jnp.float32,
    ).astype(dtype)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
    )


@pytest.mark.parametrize(
    "time_padding, strides, spatial_padding",
    [("causal", (2, 1), "same"), ("reverse_causal_valid", (1, 2), (1, 0))],
)
def test_conv2d(time_padding: str, strides: Any, spatial_padding: Any) -> None:
    config = Conv2D.Config(
        4, (3, 2), strides=strides, time_padding=time_padding, spatial_padding=spatial_padding
    )
    x = _x(5, 2)
    layer = _verify(config, x)
    y = layer.layer(x, training=False)
    assert y.channel_shape == layer.get_output_shape((5, 2))
    s = config.strides[1]
    # same: ceil(5 / s); explicit (1, 0) with kernel 2: (5 + 1 - 2) // s + 1.
    expected_h = -(-5 // s) if spatial_padding == "same" else (5 + 1 - 2) // s + 1
    assert y.shape[2] == expected_h


def test_conv3d() -> None:
    config = Conv3D.Config(
        2,
        (2, 3, 2),
        strides=(2, 1, 1),
        dilation_rate=(1, 1, 2),
        time_padding="semicausal",
        spatial_padding=("same", "valid"),
    )
    layer = _verify(config, _x(3, 4, 2))
    assert layer.get_output_shape((3, 4, 2)) == (3, 2, 2)


def test_weight_norm_option_preserves_initial_function() -> None:
    x = _x(3)
    plain = Conv1D.Config(4, 3, padding="causal")
    normed = plain.copy(use_weight_norm=True)
    params = plain.make().init(jax.random.PRNGKey(0), x)
    params_wn = normed.make().init(jax.random.PRNGKey(0), x)
    testing.assert_allclose(
        np.asarray(params_wn["params"]["scale"]),
        np.linalg.norm(np.asarray(params["params"]["kernel"]).reshape(-1, 4), axis=0),
        rtol=1e-6,
    )
    y = plain.make().apply(params, x).mask_invalid()
    y_wn = normed.make().apply(params_wn, x).mask_invalid()
    np.testing.assert_allclose(np.asarray(y.values), np.asarray(y_wn.values), atol=1e-5)


def test_kernel_constraints() -> None:
    x = _x(3)
    config = Conv1D.Config(
        4, 3, strides=2, padding="causal", kernel_constraint=L2WeightNormalization.Config()
    )
    params = config.make().init(jax.random.PRNGKey(0), x)["params"]
    np.testing.assert_array_equal(np.asarray(params["kernel_constraint"]["scale"]), np.ones(4))
    spectral = config.copy(kernel_constraint=SpectralWeightNormalization.Config())
    layer = _verify(spectral, x)
    assert set(layer.variables["batch_stats"]["kernel_constraint"]) == {"u", "sigma"}


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="Unknown padding"):
        Conv1D.Config(4, 3, padding="causall")
    with pytest.raises(ValueError, match="both set"):
        Conv1D.Config(4, 3, use_weight_norm=True, kernel_constraint=L2WeightNormalization.Config())
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        Conv1D.Config(4, 0)
    with pytest.raises(ValueError, match="2 ints"):
        Conv2D.Config(4, (3, 3, 3))
    with pytest.raises(ValueError, match="2 paddings"):
        Conv3D.Config(4, 3, spatial_padding="same")
    with pytest.raises(ValueError, match="divisible by groups"):
        conv = Conv1D.Config(4, 3, groups=2).make()
        conv.init(jax.random.PRNGKey(0), _x(3))
    with pytest.raises(ValueError, match="channel axes"):
        Conv1D.Config(4, 3).make().get_output_shape((3, 2))
    assert Conv2D.Config(4, 3).kernel_size == (3, 3)
    hash(Conv3D.Config(4, [3, 3, 3], spatial_padding=["same", [1, 1]]))


def test_state_is_batch_major_plain_sequence() -> None:
    conv = Conv1D.Config(4, 5, strides=2, padding="reverse_causal").make()
    state = conv.get_initial_state(3, jax.ShapeDtypeStruct((2,), jnp.float32), training=False)
    assert type(state) is Sequence
    assert state.shape == (3, 4, 2)
    assert not np.asarray(state.mask).any()
    causal_valid = Conv1D.Config(4, 3, padding="causal_valid").make()
    state = causal_valid.get_initial_state(
        1, jax.ShapeDtypeStruct((2,), jnp.float32), training=False
    )
    assert np.asarray(state.mask).all()
    # Causal and semicausal outputs take the block's mask: values only.
    for padding in ("causal", "semicausal"):
        conv = Conv1D.Config(4, 5, strides=2, padding=padding).make()
        state = conv.get_initial_state(3, jax.ShapeDtypeStruct((2,), jnp.float32), training=False)
        assert isinstance(state, jax.Array) and state.shape == (
            3,
            4 if padding == "causal" else 3,
            2,
        )


def test_short_step_matmul_matches_convolution() -> None:
    # Step blocks with few output frames run as one matmul over the stacked
    # taps (convolution._conv1d_as_matmul); a long layer() stays a convolution.
    x = _x(3, t=24, seed=7)
    cfg = Conv1D.Config(5, 3, dilation_rate=2, strides=2, padding="causal", activation=jnp.tanh)
    layer = testing.init_and_bind(cfg, x)
    y = layer.layer(x, training=False)
    for block in (2, 8):  # 1 and 4 output frames per step
        y_step, _, _ = step_by_step_static(layer, x, training=False, blocks_per_step=block // 2)
        np.testing.assert_allclose(
            np.asarray(y_step.mask_invalid().values),
            np.asarray(y.mask_invalid().values),
            rtol=1e-5,
            atol=1e-5,
        )


SERIALIZABLE_CONFIGS = [
    Conv1D.Config(
        4, 3, strides=2, padding="semicausal", activation=jax.nn.relu, use_weight_norm=True
    ),
    Conv1D.Config(4, 3, padding="causal", kernel_constraint=L2WeightNormalization.Config()),
    DepthwiseConv1D.Config(3, depth_multiplier=2, padding="causal", param_dtype=jnp.bfloat16),
    Conv2D.Config(2, (3, 2), time_padding="reverse_causal", spatial_padding=(1, 0)),
    Conv3D.Config(2, 2, time_padding="causal", spatial_padding=("valid", (1, 0))),
]


@pytest.mark.parametrize("config", SERIALIZABLE_CONFIGS, ids=lambda c: type(c).__qualname__)
def test_serialization_round_trip(config: types.SequenceLayerConfig) -> None:
    serialization = pytest.importorskip("sequence_layers.serialization")
    restored = serialization.loads(serialization.dumps(config))
    assert restored == config
    rank = {"Conv2D": 2, "Conv3D": 3}.get(type(config).__qualname__.split(".")[0], 1)
    x = _x(*([3, 2, 2][: rank - 1]), 3, t=6)
    m1, m2 = config.make(), restored.make()
    params = m1.init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(
        np.asarray(m1.apply(params, x).values), np.asarray(m2.apply(params, x).values)
    )
