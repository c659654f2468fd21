"""Built-in default models, so `sl-serve` runs with no arguments.

Parameters are deterministic (fixed PRNG seeds): every replica and every
`sl-offline` run serves the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import sequence_layers as sl
from sequence_layers import examples
from server.model import ServableModel, init_variables


def _build(
    name: str,
    config: sl.SequenceLayerConfig,
    input_shape: tuple[int, ...],
    sample_rate: int,
    description: str,
    seed: int,
) -> ServableModel:
    return ServableModel(
        name=name,
        config=config,
        variables=init_variables(config, input_shape, seed=seed),
        input_shape=input_shape,
        input_dtype="float32",
        sample_rate=sample_rate,
        description=description,
    )


def demo_asr() -> ServableModel:
    return _build(
        "demo-asr",
        examples.streaming_asr_encoder(),
        (1,),
        16000,
        "16 kHz waveform -> STFT, 80-bin log-mel, 2 stride-2 causal convs (40 ms frames), "
        "6 conformer blocks (d 144, 4 heads, local causal attention over 64 frames) -> "
        "256 logits. Random weights: for load and latency testing.",
        seed=1,
    )


def demo_vocoder() -> ServableModel:
    return _build(
        "demo-vocoder",
        examples.vocoder(),
        (80,),
        16000,
        "80-bin mel frames (10 ms) -> causal transposed convs x160 with residual causal "
        "conv stacks -> 16 kHz waveform. Random weights.",
        seed=2,
    )


def logmel() -> ServableModel:
    return _build(
        "logmel",
        sl.Serial.Config(examples.logmel_frontend()),
        (1,),
        16000,
        "16 kHz waveform -> 80-bin log-mel spectrogram at 10 ms (400-sample Hann frames, "
        "512-point FFT, 125-7600 Hz). Deterministic DSP, no parameters.",
        seed=0,
    )


def silero_vad() -> ServableModel:
    """Silero VAD with its official weights: the model directory `make
    silero-vad` imported under build/, or imported now from the fetched wheel.
    Raises ModelLoadError saying how to fetch it when neither is there."""
    from server import silero_vad as vad

    return vad.load_builtin()


BUILTIN_MODELS: dict[str, Callable[[], ServableModel]] = {
    "demo-asr": demo_asr,
    "demo-vocoder": demo_vocoder,
    "logmel": logmel,
    "silero-vad": silero_vad,
}

# Built-ins whose weights are downloaded (not generated): serving all the
# defaults skips them, with a message, when they cannot be had.
DOWNLOADED_MODELS = frozenset({"silero-vad"})
