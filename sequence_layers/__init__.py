"""SequenceLayers: streaming sequence layers in JAX + Flax Linen.

`import sequence_layers as sl`. Every layer is built from a frozen Config
(`sl.Dense.Config(8).make()`) and runs whole-sequence (`layer`) or block by
block (`get_initial_state` + `step`) with identical results.
"""

# Modules used by name (`sl.serialization.dumps`, `sl.utils.get_input_latency`).
from sequence_layers import serialization as serialization
from sequence_layers import signal as signal
from sequence_layers import types as types
from sequence_layers import utils as utils

# attention
from sequence_layers.attention import (
    BlockwiseDotProductSelfAttention as BlockwiseDotProductSelfAttention,
)
from sequence_layers.attention import (
    CombinedQueryKeyValueProjection as CombinedQueryKeyValueProjection,
)
from sequence_layers.attention import CrossAttentionEmits as CrossAttentionEmits
from sequence_layers.attention import DotProductAttention as DotProductAttention
from sequence_layers.attention import DotProductSelfAttention as DotProductSelfAttention
from sequence_layers.attention import DotProductSelfAttentionV2 as DotProductSelfAttentionV2
from sequence_layers.attention import GmmAttention as GmmAttention
from sequence_layers.attention import LocalDotProductSelfAttention as LocalDotProductSelfAttention
from sequence_layers.attention import (
    MultiSourceDotProductAttention as MultiSourceDotProductAttention,
)
from sequence_layers.attention import QueryAndKeyValueProjection as QueryAndKeyValueProjection
from sequence_layers.attention import (
    QueryAndSharedKeyValueProjection as QueryAndSharedKeyValueProjection,
)
from sequence_layers.attention import QueryKeyValueProjectionConfig as QueryKeyValueProjectionConfig
from sequence_layers.attention import RelativePositionEmbedding as RelativePositionEmbedding
from sequence_layers.attention import SelfAttentionEmits as SelfAttentionEmits
from sequence_layers.attention import (
    SeparateQueryKeyValueProjection as SeparateQueryKeyValueProjection,
)
from sequence_layers.attention import ShawRelativePositionEmbedding as ShawRelativePositionEmbedding
from sequence_layers.attention import StreamingDotProductAttention as StreamingDotProductAttention
from sequence_layers.attention import (
    StreamingLocalDotProductAttention as StreamingLocalDotProductAttention,
)
from sequence_layers.attention import T5RelativePositionEmbedding as T5RelativePositionEmbedding
from sequence_layers.attention import (
    TransformerXLRelativePositionEmbedding as TransformerXLRelativePositionEmbedding,
)

# combinators
from sequence_layers.combinators import CombinationMode as CombinationMode
from sequence_layers.combinators import Parallel as Parallel
from sequence_layers.combinators import Residual as Residual
from sequence_layers.combinators import Serial as Serial
from sequence_layers.combinators import SerialModules as SerialModules

# combinator wrappers
from sequence_layers.combinators_wrappers import Bidirectional as Bidirectional
from sequence_layers.combinators_wrappers import Blockwise as Blockwise
from sequence_layers.combinators_wrappers import CheckpointGradient as CheckpointGradient
from sequence_layers.combinators_wrappers import ParallelChannels as ParallelChannels
from sequence_layers.combinators_wrappers import Repeat as Repeat

# conditioning
from sequence_layers.conditioning import Conditioning as Conditioning

# convolution
from sequence_layers.convolution import Conv1D as Conv1D
from sequence_layers.convolution_nd import Conv2D as Conv2D
from sequence_layers.convolution_nd import Conv3D as Conv3D
from sequence_layers.convolution import DepthwiseConv1D as DepthwiseConv1D

# transposed convolution
from sequence_layers.convolution_transpose import Conv1DTranspose as Conv1DTranspose
from sequence_layers.convolution_transpose import Conv2DTranspose as Conv2DTranspose

# dense
from sequence_layers.dense import Dense as Dense
from sequence_layers.dense import DenseShaped as DenseShaped
from sequence_layers.dense import EinsumDense as EinsumDense
from sequence_layers.fft import FFT as FFT
from sequence_layers.fft import IFFT as IFFT
from sequence_layers.fft import IRFFT as IRFFT
from sequence_layers.fft import RFFT as RFFT

# dsp
from sequence_layers.dsp import Delay as Delay
from sequence_layers.dsp import Frame as Frame
from sequence_layers.dsp import Lookahead as Lookahead
from sequence_layers.dsp import OverlapAdd as OverlapAdd
from sequence_layers.fft import Window as Window

# framewise (a network inside each frame)
from sequence_layers.framewise import FramePad as FramePad
from sequence_layers.framewise import PerFrame as PerFrame

# normalization
from sequence_layers.normalization import BatchNormalization as BatchNormalization
from sequence_layers.normalization import GroupNormalization as GroupNormalization
from sequence_layers.normalization import L2Normalize as L2Normalize
from sequence_layers.normalization import LayerNormalization as LayerNormalization
from sequence_layers.normalization import RMSNormalization as RMSNormalization

# pooling
from sequence_layers.pooling import AveragePooling1D as AveragePooling1D
from sequence_layers.pooling import AveragePooling2D as AveragePooling2D
from sequence_layers.pooling import AveragePooling3D as AveragePooling3D
from sequence_layers.pooling import MaxPooling1D as MaxPooling1D
from sequence_layers.pooling import MaxPooling2D as MaxPooling2D
from sequence_layers.pooling import MaxPooling3D as MaxPooling3D
from sequence_layers.pooling import MinPooling1D as MinPooling1D
from sequence_layers.pooling import MinPooling2D as MinPooling2D
from sequence_layers.pooling import MinPooling3D as MinPooling3D

# position
from sequence_layers.position import AddTimingSignal as AddTimingSignal
from sequence_layers.position import ApplyRotaryPositionalEncoding as ApplyRotaryPositionalEncoding

# recurrent
from sequence_layers.recurrent import GRU as GRU
from sequence_layers.recurrent import LSTM as LSTM
from sequence_layers.recurrent import RGLRU as RGLRU
from sequence_layers.recurrent import RNN as RNN
from sequence_layers.sequence import ChannelSpec as ChannelSpec
from sequence_layers.sequence import MaskedSequence as MaskedSequence
from sequence_layers.sequence import Sequence as Sequence

# simple
from sequence_layers.simple import Abs as Abs
from sequence_layers.simple import Add as Add
from sequence_layers.simple import AddNoise as AddNoise
from sequence_layers.simple import Affine as Affine
from sequence_layers.simple import ApplySharding as ApplySharding
from sequence_layers.simple import Argmax as Argmax
from sequence_layers.simple import Cast as Cast
from sequence_layers.simple import CheckpointName as CheckpointName
from sequence_layers.simple import Downsample1D as Downsample1D
from sequence_layers.simple import Dropout as Dropout
from sequence_layers.simple import EinopsRearrange as EinopsRearrange
from sequence_layers.simple import Elu as Elu
from sequence_layers.simple import Embedding as Embedding
from sequence_layers.simple import EmbeddingTranspose as EmbeddingTranspose
from sequence_layers.simple import Emit as Emit
from sequence_layers.simple import Exp as Exp
from sequence_layers.simple import ExpandDims as ExpandDims
from sequence_layers.simple import Flatten as Flatten
from sequence_layers.simple import GatedLinearUnit as GatedLinearUnit
from sequence_layers.simple import GatedTanhUnit as GatedTanhUnit
from sequence_layers.simple import GatedUnit as GatedUnit
from sequence_layers.simple import Gelu as Gelu
from sequence_layers.simple import GlobalEinopsRearrange as GlobalEinopsRearrange
from sequence_layers.simple import GlobalReshape as GlobalReshape
from sequence_layers.simple import GradientClipping as GradientClipping
from sequence_layers.simple import Identity as Identity
from sequence_layers.simple import Lambda as Lambda
from sequence_layers.simple import LeakyRelu as LeakyRelu
from sequence_layers.simple import Log as Log
from sequence_layers.simple import Logging as Logging
from sequence_layers.simple import MaskInvalid as MaskInvalid
from sequence_layers.simple import Max as Max
from sequence_layers.simple import Maximum as Maximum
from sequence_layers.simple import Mean as Mean
from sequence_layers.simple import Min as Min
from sequence_layers.simple import Minimum as Minimum
from sequence_layers.simple import Mod as Mod
from sequence_layers.simple import MoveAxis as MoveAxis
from sequence_layers.simple import NamedEmit as NamedEmit
from sequence_layers.simple import OneHot as OneHot
from sequence_layers.simple import OptimizationBarrier as OptimizationBarrier
from sequence_layers.simple import Power as Power
from sequence_layers.simple import PRelu as PRelu
from sequence_layers.simple import Relu as Relu
from sequence_layers.simple import Reshape as Reshape
from sequence_layers.simple import Scale as Scale
from sequence_layers.simple import Sigmoid as Sigmoid
from sequence_layers.simple import Slice as Slice
from sequence_layers.simple import Snake as Snake
from sequence_layers.simple import Softmax as Softmax
from sequence_layers.simple import Softplus as Softplus
from sequence_layers.simple import Squeeze as Squeeze
from sequence_layers.simple import StopGradient as StopGradient
from sequence_layers.simple import Sum as Sum
from sequence_layers.simple import SwapAxes as SwapAxes
from sequence_layers.simple import Swish as Swish
from sequence_layers.simple import Tanh as Tanh
from sequence_layers.simple import Transpose as Transpose
from sequence_layers.simple import Upsample1D as Upsample1D
from sequence_layers.simple import Upsample2D as Upsample2D
from sequence_layers.stft import STFT as STFT

# spectral
from sequence_layers.stft import InverseSTFT as InverseSTFT
from sequence_layers.stft import LinearToMelSpectrogram as LinearToMelSpectrogram

# time-varying
from sequence_layers.time_varying import MaskedDense as MaskedDense
from sequence_layers.time_varying import SequenceDense as SequenceDense
from sequence_layers.time_varying import SequenceEmbedding as SequenceEmbedding
from sequence_layers.types import Constants as Constants
from sequence_layers.types import Emits as Emits
from sequence_layers.types import Emitting as Emitting
from sequence_layers.types import PaddingMode as PaddingMode
from sequence_layers.types import PreservesShape as PreservesShape
from sequence_layers.types import PreservesType as PreservesType
from sequence_layers.types import SequenceLayer as SequenceLayer
from sequence_layers.types import SequenceLayerConfig as SequenceLayerConfig
from sequence_layers.types import State as State
from sequence_layers.types import Stateless as Stateless
from sequence_layers.types import StatelessEmitting as StatelessEmitting
from sequence_layers.types import StatelessPointwise as StatelessPointwise
from sequence_layers.types import StatelessPointwiseFunctor as StatelessPointwiseFunctor

# kernel weight normalization
from sequence_layers.weight_normalization import L2WeightNormalization as L2WeightNormalization
from sequence_layers.weight_normalization import (
    SpectralWeightNormalization as SpectralWeightNormalization,
)
from sequence_layers.weight_normalization import WeightNormalization as WeightNormalization
