"""A vocoder-style upsampler: mel frames (10 ms) -> 16 kHz waveform.

Causal transposed convs upsample by 8, 5 and 4 (x160), each followed by a
residual stack of dilated causal convs; output_ratio is 160.
"""

from __future__ import annotations

import jax

import sequence_layers as sl


def _residual_stack(
    channels: int, dilations: tuple[int, ...]
) -> tuple[sl.SequenceLayerConfig, ...]:
    return tuple(
        sl.Residual.Config(
            (
                sl.LeakyRelu.Config(),
                sl.Conv1D.Config(
                    filters=channels, kernel_size=3, dilation_rate=d, padding="causal"
                ),
                sl.LeakyRelu.Config(),
                sl.Conv1D.Config(filters=channels, kernel_size=1, padding="causal"),
            )
        )
        for d in dilations
    )


def vocoder(
    num_mel_bins: int = 80,
    channels: tuple[int, ...] = (128, 64, 32, 16),
    upsample_rates: tuple[int, ...] = (8, 5, 4),
    dilations: tuple[int, ...] = (1, 3, 9),
) -> sl.SequenceLayerConfig:
    """`[b, t, num_mel_bins]` -> `[b, t * prod(upsample_rates), 1]` in [-1, 1]."""
    if len(channels) != len(upsample_rates) + 1:
        raise ValueError(
            f"need one more channel count than upsample rates: {channels=} {upsample_rates=}"
        )
    layers: list[sl.SequenceLayerConfig] = [
        sl.Conv1D.Config(filters=channels[0], kernel_size=7, padding="causal"),
    ]
    for rate, out_channels in zip(upsample_rates, channels[1:], strict=True):
        layers += [
            sl.LeakyRelu.Config(),
            sl.Conv1DTranspose.Config(
                filters=out_channels, kernel_size=2 * rate, strides=rate, padding="causal"
            ),
            *_residual_stack(out_channels, dilations),
        ]
    layers += [
        sl.LeakyRelu.Config(),
        sl.Conv1D.Config(filters=1, kernel_size=7, padding="causal", activation=jax.nn.tanh),
    ]
    return sl.Serial.Config(tuple(layers))
