"""Example models built only from library Configs: a Transformer block, a
Conformer block, a streaming ASR encoder, a log-mel front end and a vocoder.

They double as the server's built-in default models and as realistic
`verify_contract` and benchmark workloads.
"""

from sequence_layers.examples.asr import logmel_frontend as logmel_frontend
from sequence_layers.examples.asr import streaming_asr_encoder as streaming_asr_encoder
from sequence_layers.examples.blocks import benchmark_stacks as benchmark_stacks
from sequence_layers.examples.blocks import conformer_block as conformer_block
from sequence_layers.examples.blocks import transformer_block as transformer_block
from sequence_layers.examples.vad import silero_vad as silero_vad
from sequence_layers.examples.vocoder import vocoder as vocoder
