"""Silero VAD (v5/v6, 16 kHz) as a SequenceLayers model.

The official model steps on 512-sample windows, each with the 64 samples
before it as context (576 in), and carries an LSTM state between windows.
Per window: reflect-pad 64 samples on the right (640), an STFT written as a
conv (258 filters, kernel 256, stride 128: 4 frames of 129 complex bins),
the magnitude, four convs (kernel 3, strides 1, 2, 2, 1, ReLU) down to one
128-d vector, an LSTM cell, ReLU, a 1x1 conv and a sigmoid: one speech
probability per window.

Here the window is `Frame` with explicit padding (64 samples of context on
the left, so the first window sees 64 zeros as the official runtime does),
the per-window network is `PerFrame` over the window's samples, and the LSTM
runs over windows. `layer()` and `step()` agree, and step carries the
context in `Frame`'s buffer and the LSTM state, as the official loop does.

Parameters (names as `init` makes them; the importer in
`server/silero_vad.py` fills them from the official ONNX weights):

    params/encoder/child_layer/stft/kernel             [256, 1, 258]
    params/encoder/child_layer/encoder_{0..3}/kernel   [3, in, out]
    params/encoder/child_layer/encoder_{0..3}/bias     [out]
    params/lstm/{kernel [128, 512], recurrent_kernel [128, 512], bias [512]}
    params/decoder/{kernel [128, 1], bias [1]}
"""

from __future__ import annotations

import sequence_layers as sl

SAMPLE_RATE = 16000
WINDOW = 512  # new samples per output frame (32 ms at 16 kHz)
CONTEXT = 64  # samples of the previous window each window also sees
FFT = 256
HOP = 128
BINS = FFT // 2 + 1  # 129
# (filters, stride) of the encoder convs, all kernel 3 with one sample of
# zero padding each side: PyTorch's padding=1 is `same` for these strides.
ENCODER = ((128, 1), (64, 2), (64, 2), (128, 1))
UNITS = 128


def silero_vad() -> sl.Serial.Config:
    """`[b, t, 1]` 16 kHz waveform -> `[b, t / 512, 1]` speech probability.

    block_size 512, output_ratio 1/512; input latency 511 samples (the last
    partial window is zero-padded, as the official `get_speech_timestamps`
    pads it), output latency 0.
    """
    encoder: list[sl.SequenceLayerConfig] = [
        # The STFT as a conv: filters 0..128 are the real parts, 129..257
        # the imaginary parts. `valid`: 640 samples give 4 frames.
        sl.Conv1D.Config(
            2 * BINS, kernel_size=FFT, strides=HOP, padding="valid", use_bias=False, name="stft"
        ),
        # |X| = sqrt(re^2 + im^2), with re and im on a new axis to sum over.
        sl.Reshape.Config((2, BINS)),
        sl.Power.Config(2.0),
        sl.Sum.Config(axis=2),
        sl.Power.Config(0.5),
    ]
    for i, (filters, stride) in enumerate(ENCODER):
        encoder.append(
            sl.Conv1D.Config(
                filters, kernel_size=3, strides=stride, padding="same", name=f"encoder_{i}"
            )
        )
        encoder.append(sl.Relu.Config())
    return sl.Serial.Config(
        [
            # [b, t, 1] -> [b, t / 512, 576, 1]: window j is samples
            # [512 j - 64, 512 j + 512), zeros before the stream starts.
            sl.Frame.Config(CONTEXT + WINDOW, WINDOW, padding=(CONTEXT, WINDOW - 1)),
            sl.FramePad.Config((0, CONTEXT), mode="reflect"),  # [.., 640, 1]
            sl.PerFrame.Config(sl.Serial.Config(encoder), name="encoder"),  # [.., 1, 128]
            sl.Reshape.Config((UNITS,)),
            sl.LSTM.Config(UNITS, name="lstm"),
            sl.Relu.Config(),
            sl.Dense.Config(1, name="decoder"),  # the 1x1 conv
            sl.Sigmoid.Config(),
        ]
    )
