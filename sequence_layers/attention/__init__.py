"""Attention layers: self attention (full, local, blockwise), cross attention
(static and streamed sources), GMM attention and relative position embeddings."""

from sequence_layers.attention.blockwise_dot_product_self_attention import (
    BlockwiseDotProductSelfAttention as BlockwiseDotProductSelfAttention,
)
from sequence_layers.attention.common import (
    CombinedQueryKeyValueProjection as CombinedQueryKeyValueProjection,
)
from sequence_layers.attention.common import CrossAttentionEmits as CrossAttentionEmits
from sequence_layers.attention.common import InputProjectionModule as InputProjectionModule
from sequence_layers.attention.common import (
    QueryAndKeyValueProjection as QueryAndKeyValueProjection,
)
from sequence_layers.attention.common import (
    QueryAndSharedKeyValueProjection as QueryAndSharedKeyValueProjection,
)
from sequence_layers.attention.common import (
    QueryKeyValueProjectionConfig as QueryKeyValueProjectionConfig,
)
from sequence_layers.attention.common import (
    RelativePositionEmbedding as RelativePositionEmbedding,
)
from sequence_layers.attention.common import SelfAttentionEmits as SelfAttentionEmits
from sequence_layers.attention.common import (
    SeparateQueryKeyValueProjection as SeparateQueryKeyValueProjection,
)
from sequence_layers.attention.dot_product_attention import (
    DotProductAttention as DotProductAttention,
)
from sequence_layers.attention.dot_product_self_attention import (
    DotProductSelfAttention as DotProductSelfAttention,
)
from sequence_layers.attention.dot_product_self_attention_v2 import (
    DotProductSelfAttentionV2 as DotProductSelfAttentionV2,
)
from sequence_layers.attention.gmm_attention import GmmAttention as GmmAttention
from sequence_layers.attention.local_dot_product_self_attention import (
    LocalDotProductSelfAttention as LocalDotProductSelfAttention,
)
from sequence_layers.attention.multi_source_dot_product_attention import (
    MultiSourceDotProductAttention as MultiSourceDotProductAttention,
)
from sequence_layers.attention.relative_position_embedding import (
    ShawRelativePositionEmbedding as ShawRelativePositionEmbedding,
)
from sequence_layers.attention.relative_position_embedding import (
    T5RelativePositionEmbedding as T5RelativePositionEmbedding,
)
from sequence_layers.attention.relative_position_embedding import (
    TransformerXLRelativePositionEmbedding as TransformerXLRelativePositionEmbedding,
)
from sequence_layers.attention.streaming_dot_product_attention import (
    StreamingDotProductAttention as StreamingDotProductAttention,
)
from sequence_layers.attention.streaming_dot_product_attention import (
    StreamingLocalDotProductAttention as StreamingLocalDotProductAttention,
)
