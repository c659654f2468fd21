"""SequenceLayers: streaming sequence layers in JAX + Flax Linen.

`import sequence_layers as sl`. Every layer is built from a frozen Config
(`sl.Dense.Config(8).make()`) and runs whole-sequence (`layer`) or block by
block (`get_initial_state` + `step`) with identical results.
"""

from sequence_layers.sequence import ChannelSpec as ChannelSpec
from sequence_layers.sequence import MaskedSequence as MaskedSequence
from sequence_layers.sequence import Sequence as Sequence
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
