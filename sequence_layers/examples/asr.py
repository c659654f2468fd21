"""A streaming ASR encoder: 16 kHz waveform -> log-mel -> 4x conv subsampling
-> Conformer blocks -> per-frame logits (every 40 ms)."""

from __future__ import annotations

import jax

import sequence_layers as sl
from sequence_layers.examples.blocks import conformer_block


def logmel_frontend(
    sample_rate: int = 16000,
    frame_length: int = 400,
    frame_step: int = 160,
    fft_length: int = 512,
    num_mel_bins: int = 80,
    lower_edge_hertz: float = 125.0,
    upper_edge_hertz: float = 7600.0,
    floor: float = 1e-5,
) -> tuple[sl.SequenceLayerConfig, ...]:
    """`[b, t, 1]` waveform -> `[b, t / frame_step, num_mel_bins]` log-mel.

    The STFT keeps the reference's default `reverse_causal_valid` framing, so
    the front end has `frame_length - 1` samples of input latency.
    """
    return (
        # Mono audio arrives as [frames, 1]; the STFT wants scalar samples
        # (it would put a channel axis after the frequency axis).
        sl.Squeeze.Config(axis=-1),
        sl.STFT.Config(
            frame_length=frame_length,
            frame_step=frame_step,
            fft_length=fft_length,
            output_magnitude=True,
        ),
        sl.LinearToMelSpectrogram.Config(
            num_mel_bins=num_mel_bins,
            sample_rate=sample_rate,
            lower_edge_hertz=lower_edge_hertz,
            upper_edge_hertz=upper_edge_hertz,
        ),
        sl.Maximum.Config(floor),
        sl.Log.Config(),
    )


def streaming_asr_encoder(
    num_blocks: int = 6,
    d_model: int = 144,
    num_heads: int = 4,
    ffn_dim: int = 576,
    conv_kernel_size: int = 15,
    max_past_horizon: int = 64,
    vocab_size: int = 256,
    num_mel_bins: int = 80,
) -> sl.SequenceLayerConfig:
    """`[b, t, 1]` 16 kHz waveform -> `[b, t / 640, vocab_size]` logits."""
    subsampling = (
        sl.Conv1D.Config(
            filters=d_model, kernel_size=3, strides=2, padding="causal", activation=jax.nn.relu
        ),
        sl.Conv1D.Config(
            filters=d_model, kernel_size=3, strides=2, padding="causal", activation=jax.nn.relu
        ),
    )
    frontend = logmel_frontend(num_mel_bins=num_mel_bins)
    # Strided convs need the incoming output latency to be a multiple of their
    # total stride (4): pad it with a step-only Delay (layer() is unchanged).
    frontend_latency = sl.utils.get_output_latency(sl.Serial.Config(frontend))
    align = (-frontend_latency) % 4
    if align:
        frontend = (*frontend, sl.Delay.Config(length=align, delay_layer_output=False))
    blocks = tuple(
        conformer_block(
            d_model,
            num_heads,
            ffn_dim,
            conv_kernel_size=conv_kernel_size,
            max_past_horizon=max_past_horizon,
        )
        for _ in range(num_blocks)
    )
    return sl.Serial.Config(
        (
            *frontend,
            *subsampling,
            *blocks,
            sl.Dense.Config(vocab_size),
        )
    )
