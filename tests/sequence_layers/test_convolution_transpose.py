"""Tests for Conv1DTranspose and Conv2DTranspose."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sequence_layers import testing, types
from sequence_layers.convolution_transpose import Conv1DTranspose, Conv2DTranspose
from sequence_layers.sequence import Sequence

TOL = {"rtol": 1e-5, "atol": 1e-5, "grad_rtol": 1e-4, "grad_atol": 1e-4}


def _x(*channels: int, t: int = 7) -> Sequence:
    return testing.random_sequence(2, t, *channels, seed=1)


def _verify(config: types.SequenceLayerConfig, x: Sequence) -> Any:
    layer = testing.init_and_bind(config, x)
    padding = getattr(config, "padding", getattr(config, "time_padding", ""))
    # Non-causal transposed outputs are not `t * strides` frames long; the
    # receptive-field check measures per output frame of a `t * ratio` output.
    testing.verify_contract(layer, x, test_receptive_field=padding in ("causal", "same"), **TOL)
    return layer


@pytest.mark.parametrize(
    "kernel_size, strides, dilation_rate", [(3, 1, 1), (4, 2, 1), (3, 2, 2), (2, 3, 1)]
)
def test_conv1d_transpose_causal_contract(
    kernel_size: int, strides: int, dilation_rate: int
) -> None:
    config = Conv1DTranspose.Config(
        4, kernel_size, strides=strides, dilation_rate=dilation_rate, padding="causal"
    )
    layer = _verify(config, _x(3))
    assert layer.supports_step
    assert layer.output_ratio == Fraction(strides)
    assert layer.block_size == 1
    assert layer.input_latency == layer.output_latency == 0


@pytest.mark.parametrize("padding", ["valid", "same", "semicausal_full"])
def test_conv1d_transpose_layer_only_contract(padding: str) -> None:
    layer = _verify(Conv1DTranspose.Config(4, 3, strides=2, padding=padding), _x(3))
    assert not layer.supports_step
    with pytest.raises(ValueError, match="not steppable"):
        layer.get_initial_state(2, _x(3).channel_spec, training=False)


@pytest.mark.parametrize(
    "padding, expected_values, expected_mask",
    [
        # Input i adds x_i to outputs 2i .. 2i + 2: x = (1, 2) gives 1 1 3 2 2.
        ("causal", [1, 1, 3, 2, 2, 0], [1, 1, 1, 1, 0, 0]),
        ("valid", [1, 1, 3, 2, 2, 0, 0], [1, 1, 1, 1, 0, 0, 0]),
        ("same", [1, 1, 3, 2, 2, 0], [1, 1, 1, 1, 0, 0]),
    ],
)
def test_conv1d_transpose_ones_kernel_numerics(
    padding: str, expected_values: list[int], expected_mask: list[int]
) -> None:
    x = Sequence(jnp.array([1.0, 2.0, 50.0]).reshape(1, 3, 1), jnp.array([[True, True, False]]))
    conv = Conv1DTranspose.Config(
        1, 3, strides=2, padding=padding, use_bias=False, kernel_init=nn.initializers.ones
    ).make()
    y = conv.apply(conv.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_array_equal(np.asarray(y.mask[0]), np.array(expected_mask, bool))
    n = len(expected_values)
    valid = np.asarray(y.mask[0, :n])
    np.testing.assert_allclose(
        np.asarray(y.values[0, :n, 0])[valid], np.array(expected_values, float)[valid]
    )


def test_receptive_field_per_phase() -> None:
    layer = types.detached(Conv1DTranspose.Config(1, 5, strides=2, padding="causal"))
    # Output 2q reads inputs q-2..q (taps 0, 2, 4); output 2q+1 reads q-1..q.
    assert layer.receptive_field_per_step == {0: (-2, 0), 1: (-1, 0)}
    holes = types.detached(Conv1DTranspose.Config(1, 2, strides=3, padding="causal"))
    assert holes.receptive_field_per_step == {0: (0, 0), 1: (0, 0), 2: None}


def test_conv2d_transpose() -> None:
    x = _x(4, 2)
    config = Conv2DTranspose.Config(3, (3, 2), strides=(2, 2), time_padding="causal")
    layer = _verify(config, x)
    assert layer.layer(x, training=False).shape == (2, 14, 8, 3)
    explicit = config.copy(spatial_padding=(1, 0), time_padding="valid")
    y = testing.init_and_bind(explicit, x).layer(x, training=False)
    # time valid: 7 * 2 + (3 - 2); height: (4 - 1) * 2 + 1 + 1 + 0 - 2 + 1.
    assert y.shape == (2, 15, 7, 3)


def test_config_validation() -> None:
    for padding in ("reverse_causal", "causal_valid", "semicausal"):
        with pytest.raises(ValueError, match="support padding"):
            Conv1DTranspose.Config(4, 3, padding=padding)
    with pytest.raises(ValueError, match="divide filters"):
        Conv1DTranspose.Config(3, 3, groups=2)
    with pytest.raises(ValueError, match="2 ints"):
        Conv2DTranspose.Config(3, (3, 3, 3))
    assert Conv2DTranspose.Config(3, 2, spatial_padding=[1, 1]).spatial_padding == (1, 1)


@pytest.mark.parametrize(
    "config",
    [
        Conv1DTranspose.Config(4, 3, strides=2, padding="causal", activation=jax.nn.gelu),
        Conv2DTranspose.Config(2, (2, 3), strides=(2, 1), spatial_padding=(1, 1)),
    ],
    ids=lambda c: type(c).__qualname__,
)
def test_serialization_round_trip(config: types.SequenceLayerConfig) -> None:
    serialization = pytest.importorskip("sequence_layers.serialization")
    restored = serialization.loads(serialization.dumps(config))
    assert restored == config
    x = _x(3) if isinstance(config, Conv1DTranspose.Config) else _x(4, 2)
    m1, m2 = config.make(), restored.make()
    params = m1.init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(
        np.asarray(m1.apply(params, x).values), np.asarray(m2.apply(params, x).values)
    )


@pytest.mark.parametrize("padding", ["causal", "same", "valid", "semicausal_full"])
def test_conv1d_transpose_empty_input(padding: str) -> None:
    # Zero frames in, zero out. XLA pads an empty dilated input out to
    # frames: causal and same gave values of one frame against an empty
    # mask, valid two frames marked valid.
    layer = testing.init_and_bind(Conv1DTranspose.Config(4, 3, strides=2, padding=padding), _x(3))
    y = layer.layer(_x(3, t=0), training=False)
    assert y.values.shape == (2, 0, 4) and y.mask.shape == (2, 0)
