"""Tests for the framewise layers (`PerFrame`, `FramePad`) and the Silero VAD
config built from them (random weights here; the official weights are tested
against ONNX Runtime in tests/server/test_silero_vad.py)."""

from __future__ import annotations

from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

import sequence_layers as sl
from sequence_layers import testing
from sequence_layers.examples import silero_vad


def test_per_frame_contract_and_shapes() -> None:
    # A per-frame encoder whose inner length is not n * ratio (a valid conv).
    config = sl.PerFrame.Config(
        sl.Serial.Config(
            [
                sl.Conv1D.Config(4, kernel_size=3, strides=2, padding="valid"),
                sl.Conv1D.Config(5, kernel_size=3, strides=1, padding="same"),
                sl.Tanh.Config(),
            ]
        )
    )
    x = testing.random_sequence(2, 9, 8, 3, seed=1)  # [b, t, n=8, c=3]
    layer = testing.init_and_bind(config, x)
    assert layer.get_output_spec(x.channel_spec).shape == (3, 5)
    y = testing.verify_contract(layer, x)
    assert y.channel_shape == (3, 5)
    # Each frame on its own: the output of frame 4 depends on frame 4 only.
    x2 = sl.Sequence(x.values.at[:, 3].set(7.0), x.mask)
    y2 = layer.layer(x2, training=False)
    np.testing.assert_array_equal(np.asarray(y2.values[:, 4:]), np.asarray(y.values[:, 4:]))


def test_per_frame_equals_child_on_each_frame() -> None:
    child = sl.Conv1D.Config(2, kernel_size=2, padding="causal")
    x = testing.random_sequence(1, 3, 5, 1, seed=2).unmask()
    x = sl.Sequence(x.values, jnp.ones(x.mask.shape, bool))
    layer = testing.init_and_bind(sl.PerFrame.Config(child), x)
    y = layer.layer(x, training=False)
    params = {"params": layer.variables["params"]["child_layer"]}
    inner = child.make()
    for j in range(3):
        frame = sl.Sequence.from_values(x.values[:, j])
        expected = inner.apply(params, frame, training=False, method="layer").values
        np.testing.assert_allclose(y.values[:, j], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["constant", "reflect", "symmetric", "edge"])
def test_frame_pad_contract(mode: str) -> None:
    x = testing.random_sequence(2, 6, 5, 2, seed=3)
    layer = testing.init_and_bind(sl.FramePad.Config((1, 3), mode=mode), x)
    y = testing.verify_contract(layer, x)
    assert y.channel_shape == (9, 2)
    values = np.asarray(x.mask_invalid().values)
    expected = np.pad(values, [(0, 0), (0, 0), (1, 3), (0, 0)], mode=mode)
    np.testing.assert_allclose(np.asarray(y.values), expected, rtol=0, atol=0)


def test_frame_pad_rejects_bad_configs() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        sl.FramePad.Config((-1, 2))
    with pytest.raises(ValueError, match="mode"):
        sl.FramePad.Config((1, 2), mode="wrap")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="longer than 4"):
        sl.FramePad.Config((0, 4), mode="reflect").make().get_output_shape((4, 1))
    with pytest.raises(ValueError, match="inner axis"):
        sl.PerFrame.Config(sl.Relu.Config()).make().get_output_spec(sl.ChannelSpec((), jnp.float32))


def test_silero_vad_config_contract() -> None:
    config = silero_vad()
    layer = config.make()
    assert (layer.block_size, layer.output_ratio) == (512, Fraction(1, 512))
    assert (layer.input_latency, layer.output_latency) == (511, 0)
    # 3.3 windows per row: the last one partial, zero-padded like the official loop.
    x = testing.random_sequence(2, 1700, 1, seed=4)
    bound = testing.init_and_bind(config, x)
    # Gradients are left out: |X| = sqrt(re^2 + im^2) has an infinite slope
    # at 0, which every all-zero (padding) window hits. Inference only.
    y = testing.verify_contract(
        bound, x, rtol=1e-5, atol=1e-5, test_gradients=False, test_receptive_field=False
    )
    assert y.channel_shape == (1,)
    assert y.shape[1] == 4
    assert sl.serialization.loads(sl.serialization.dumps(config)) == config
