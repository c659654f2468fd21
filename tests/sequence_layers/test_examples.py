"""The example models (`sequence_layers.examples`) obey the SequenceLayer
contract at small shapes, and their configs survive serialization."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest

import sequence_layers as sl
from sequence_layers import examples, testing
from sequence_layers.sequence import Sequence

# Float32 throughout. On CPU every check passes at verify_contract's default
# tolerances (1e-6 on values, 1e-5 on gradients); values get 1e-5 for margin,
# since these stacks (LayerNorm, softmax, log-mel, tanh) sum in a different
# order in layer() and step, and that order depends on the backend.
_TOLS = {"rtol": 1e-5, "atol": 1e-5, "grad_rtol": 1e-5, "grad_atol": 1e-5}


def _verify(config: sl.SequenceLayerConfig, x: Sequence, **kwargs: Any) -> Any:
    layer = testing.init_and_bind(config, x)
    y = testing.verify_contract(layer, x, training=False, jit=True, **{**_TOLS, **kwargs})
    return layer, y


def _asr_config() -> sl.SequenceLayerConfig:
    return examples.streaming_asr_encoder(
        num_blocks=1,
        d_model=16,
        num_heads=2,
        ffn_dim=32,
        conv_kernel_size=5,
        max_past_horizon=8,
        vocab_size=8,
        num_mel_bins=16,
    )


_CONFIGS = {
    "transformer_block": lambda: examples.transformer_block(16, 2, 32, max_past_horizon=8),
    "transformer_block_lookahead": lambda: examples.transformer_block(
        16, 2, 32, max_past_horizon=8, max_future_horizon=2
    ),
    "conformer_block": lambda: examples.conformer_block(
        16, 2, 32, conv_kernel_size=5, max_past_horizon=8
    ),
    "asr_encoder": _asr_config,
    "asr_encoder_default": examples.streaming_asr_encoder,
    "logmel_frontend": lambda: sl.Serial.Config(examples.logmel_frontend()),
    "vocoder": lambda: examples.vocoder(num_mel_bins=8, channels=(8, 8, 4, 4)),
    "vocoder_default": examples.vocoder,
    "silero_vad": examples.silero_vad,
}


@pytest.mark.parametrize("name", list(_CONFIGS))
def test_config_round_trip(name: str) -> None:
    config = _CONFIGS[name]()
    text = sl.serialization.dumps(config)
    assert sl.serialization.loads(text) == config
    # Canonical: equal configs give identical text.
    assert sl.serialization.dumps(sl.serialization.loads(text)) == text


def test_transformer_block_causal() -> None:
    config = _CONFIGS["transformer_block"]()
    # 40 frames: more than two of the attention's 16-frame compute tiles.
    x = testing.random_sequence(2, 40, 16, seed=1)
    layer, y = _verify(config, x)
    assert (layer.input_latency, layer.output_latency) == (0, 0)
    assert layer.output_ratio == 1
    assert layer.receptive_field_per_step == {0: (-8, 0)}
    assert y.shape == (2, 40, 16)


def test_transformer_block_lookahead() -> None:
    config = _CONFIGS["transformer_block_lookahead"]()
    x = testing.random_sequence(2, 40, 16, seed=2)
    layer, y = _verify(config, x)
    assert (layer.input_latency, layer.output_latency) == (2, 2)
    assert layer.receptive_field_per_step == {0: (-8, 2)}
    assert y.shape == (2, 40, 16)


def test_conformer_block() -> None:
    config = _CONFIGS["conformer_block"]()
    x = testing.random_sequence(2, 40, 16, seed=3)
    layer, y = _verify(config, x)
    assert (layer.input_latency, layer.output_latency) == (0, 0)
    # Attention sees 8 frames back, then the kernel-5 causal conv 4 more.
    assert layer.receptive_field_per_step == {0: (-12, 0)}
    assert y.shape == (2, 40, 16)


def test_streaming_asr_encoder() -> None:
    config = _asr_config()
    layer = config.make()
    assert layer.block_size == 640
    assert layer.output_ratio == Fraction(1, 640)
    assert layer.input_latency > 0
    # About 4 blocks of 640 samples (40 ms each), rows of random length.
    x = testing.random_sequence(2, 2600, 1, low_length=1200, seed=4)
    # The receptive-field check stays on: the probe is long (the declared
    # field reaches 8639 samples back), but there are only a few output
    # frames, so the Jacobian is cheap.
    layer, y = _verify(config, x)
    assert y.shape == (2, math.ceil(2600 / 640), 8)
    assert y.mask.any()


@pytest.mark.parametrize(
    ("upsample_rates", "channels"),
    [((2, 2, 2), (8, 8, 4, 4)), ((8, 5, 4), (4, 4, 4, 4))],
    ids=["x8", "x160"],
)
def test_vocoder(upsample_rates: tuple[int, ...], channels: tuple[int, ...]) -> None:
    config = examples.vocoder(num_mel_bins=8, channels=channels, upsample_rates=upsample_rates)
    x = testing.random_sequence(2, 6, 8, low_length=2, seed=5)
    ratio = math.prod(upsample_rates)
    # The receptive-field check takes the Jacobian of every output sample: at
    # x160 its 32-frame probe gives 2 x 5120 outputs, each pulled back through
    # 5120-sample activations (~100 s on a 2-core CPU instead of ~8 s). The x8
    # case checks the same structure's receptive field, phase by phase.
    layer, y = _verify(config, x, test_receptive_field=ratio <= 8)
    assert layer.output_ratio == ratio
    assert (layer.input_latency, layer.output_latency) == (0, 0)
    assert y.shape == (2, 6 * ratio, 1)
    # tanh output.
    assert float(abs(y.values).max()) <= 1.0


def test_vocoder_rejects_mismatched_channels() -> None:
    with pytest.raises(ValueError, match="one more channel count"):
        examples.vocoder(channels=(8, 8), upsample_rates=(2, 2))
