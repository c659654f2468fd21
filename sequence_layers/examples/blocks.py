"""Transformer and Conformer blocks with streaming (local causal) attention.

Inputs and outputs are `[b, t, d_model]`. Attention looks `max_past_horizon`
frames back and `max_future_horizon` ahead; with no future horizon the blocks
are causal and add no latency.
"""

from __future__ import annotations

import jax

import sequence_layers as sl


def _attention(
    d_model: int, num_heads: int, max_past_horizon: int, max_future_horizon: int, block_size: int
) -> tuple[sl.SequenceLayerConfig, ...]:
    # Self-attention outputs [heads, units_per_head] with no output projection
    # (as in the reference), so flatten and project back to d_model.
    return (
        sl.LocalDotProductSelfAttention.Config(
            num_heads=num_heads,
            units_per_head=d_model // num_heads,
            block_size=block_size,
            max_past_horizon=max_past_horizon,
            max_future_horizon=max_future_horizon,
        ),
        sl.Flatten.Config(),
        sl.Dense.Config(d_model),
    )


def _lagging_residual(
    body: tuple[sl.SequenceLayerConfig, ...], latency: int
) -> sl.SequenceLayerConfig:
    # A body with lookahead lags by `latency` frames in `step` only (its `layer`
    # output is aligned with its input), so the shortcut needs a step-only delay.
    if latency:
        return sl.Residual.Config(
            body, shortcut_layers=(sl.Delay.Config(latency, delay_layer_output=False),)
        )
    return sl.Residual.Config(body)


def transformer_block(
    d_model: int,
    num_heads: int,
    ffn_dim: int,
    max_past_horizon: int = 64,
    max_future_horizon: int = 0,
    block_size: int = 16,
) -> sl.SequenceLayerConfig:
    """Pre-norm Transformer block: local self-attention and a GELU FFN."""
    return sl.Serial.Config(
        (
            _lagging_residual(
                (
                    sl.LayerNormalization.Config(),
                    *_attention(
                        d_model, num_heads, max_past_horizon, max_future_horizon, block_size
                    ),
                ),
                max_future_horizon,
            ),
            sl.Residual.Config(
                (
                    sl.LayerNormalization.Config(),
                    sl.Dense.Config(ffn_dim, activation=jax.nn.gelu),
                    sl.Dense.Config(d_model),
                )
            ),
        )
    )


def _half_step_ffn(d_model: int, ffn_dim: int) -> sl.SequenceLayerConfig:
    return sl.Residual.Config(
        (
            sl.LayerNormalization.Config(),
            sl.Dense.Config(ffn_dim, activation=jax.nn.swish),
            sl.Dense.Config(d_model),
            sl.Scale.Config(0.5),
        )
    )


def conformer_block(
    d_model: int,
    num_heads: int,
    ffn_dim: int,
    conv_kernel_size: int = 15,
    max_past_horizon: int = 64,
    block_size: int = 16,
) -> sl.SequenceLayerConfig:
    """Streaming Conformer block (Gulati et al. 2020): half-step FFN, local
    causal self-attention, causal depthwise-conv module, half-step FFN, norm.

    The conv module uses LayerNorm instead of BatchNorm so `step` needs no
    batch statistics.
    """
    return sl.Serial.Config(
        (
            _half_step_ffn(d_model, ffn_dim),
            sl.Residual.Config(
                (
                    sl.LayerNormalization.Config(),
                    *_attention(d_model, num_heads, max_past_horizon, 0, block_size),
                )
            ),
            sl.Residual.Config(
                (
                    sl.LayerNormalization.Config(),
                    sl.Dense.Config(2 * d_model),
                    sl.GatedLinearUnit.Config(),
                    sl.DepthwiseConv1D.Config(kernel_size=conv_kernel_size, padding="causal"),
                    sl.LayerNormalization.Config(),
                    sl.Swish.Config(),
                    sl.Dense.Config(d_model),
                )
            ),
            _half_step_ffn(d_model, ffn_dim),
            sl.LayerNormalization.Config(),
        )
    )


def benchmark_stacks() -> dict[str, tuple[sl.SequenceLayerConfig, int]]:
    """Stacks for loadtests/bench_layers.py: name -> (config, input channels)."""
    from sequence_layers.examples.asr import streaming_asr_encoder

    return {
        "transformer_block": (transformer_block(144, 4, 576), 144),
        "conformer_block": (conformer_block(144, 4, 576), 144),
        "asr_encoder": (streaming_asr_encoder(), 1),
    }
