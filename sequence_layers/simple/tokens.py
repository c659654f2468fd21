"""Token layers: integer ids to vectors (`OneHot`, `Embedding`), vectors to
logits over a shared embedding table (`EmbeddingTranspose`), and back to ids
(`Argmax`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sequence_layers import types
from sequence_layers.sequence import Sequence
from sequence_layers.simple._common import (
    CheckedStep,
    Sharding,
    as_tuple,
    get_promoted_dtype,
    masked,
)

__all__ = ["Argmax", "Embedding", "EmbeddingTranspose", "OneHot"]

Initializer = Callable[..., jax.Array]


def _require_integer(layer: types.SequenceLayer, dtype: Any) -> None:
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f"{type(layer).__name__} needs integer token ids, got dtype {jnp.dtype(dtype)}; "
            "cast with Cast.Config(jnp.int32) first."
        )


class OneHot(CheckedStep, types.Stateless):
    """Ids `[b, t, ...]` to one-hot vectors `[b, t, ..., depth]`; ids outside
    `[0, depth)` give all-zero vectors."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Number of classes.
        depth: int
        # Output dtype.
        compute_dtype: Any = jnp.float32
        # Optional layer name.
        name: str | None = None

        def make(self) -> OneHot:
            return OneHot(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return (*input_shape, self.config.depth)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        _require_integer(self, input_dtype)
        return jnp.dtype(self.config.compute_dtype)

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        _require_integer(self, x.dtype)
        # Id 0 maps to a non-zero vector: the output is not masked.
        return x.apply_values(jax.nn.one_hot, self.config.depth, dtype=self.config.compute_dtype)


class Embedding(CheckedStep, types.Stateless):
    """Ids `[b, t, ...]` to rows of a learned table: `[b, t, ..., dimension]`.

    The table (`[num_embeddings, dimension]`, parameter `embedding`) can be
    shared with an `EmbeddingTranspose` for tied input/output embeddings.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Size of each embedding vector.
        dimension: int
        # Number of rows; ids must lie in [0, num_embeddings).
        num_embeddings: int
        # Output dtype (None: the parameter dtype).
        compute_dtype: Any = None
        # Parameter dtype.
        param_dtype: Any = jnp.float32
        # Initializer of the table (default: unit-variance rows).
        embedding_init: Initializer = nn.linear.default_embed_init
        # Optional sharding of the table.
        embedding_sharding: Sharding = None
        # Optional layer name.
        name: str | None = None
        # Name of the table parameter.
        embedding_param_name: str = "embedding"

        def __post_init__(self) -> None:
            object.__setattr__(self, "embedding_sharding", as_tuple(self.embedding_sharding))

        def make(self) -> Embedding:
            return Embedding(self, name=self.name)

    config: Config

    def setup(self) -> None:
        cfg = self.config
        init = cfg.embedding_init
        if cfg.embedding_sharding is not None:
            init = nn.with_partitioning(init, cfg.embedding_sharding)
        self.embedding = self.param(
            cfg.embedding_param_name, init, (cfg.num_embeddings, cfg.dimension), cfg.param_dtype
        )

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        return (*input_shape, self.config.dimension)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        _require_integer(self, input_dtype)
        return jnp.dtype(self.config.compute_dtype or self.config.param_dtype)

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        _require_integer(self, x.dtype)
        table = self.embedding.astype(self.get_output_dtype(x.dtype))
        # Row 0 is not zero: the output is not masked.
        return x.apply_values(lambda ids: jnp.take(table, ids, axis=0))

    def attend(
        self, x: Sequence, embedding_dtype: Any = None, compute_dtype: Any = None
    ) -> Sequence:
        """Logits `[b, t, ..., num_embeddings]`: the dot product of each query
        `[..., dimension]` with every row of the table.

        `embedding_dtype` overrides the table dtype and `compute_dtype` the
        computation dtype (default: `config.compute_dtype`, else promotion).
        """
        if not x.channel_shape or x.channel_shape[-1] != self.config.dimension:
            raise ValueError(
                f"Embedding.attend needs queries [b, t, ..., {self.config.dimension}], got "
                f"{x.shape=}."
            )
        table = self.embedding
        if embedding_dtype is not None:
            table = table.astype(embedding_dtype)
        values, table = nn.dtypes.promote_dtype(
            x.values, table, dtype=compute_dtype or self.config.compute_dtype
        )
        return type(x)(jnp.einsum("...d,nd->...n", values, table), x.mask)


class EmbeddingTranspose(CheckedStep, types.Stateless):
    """Logits `[b, t, ..., num_embeddings]` from queries `[b, t, ...,
    dimension]` using an `Embedding`'s table (weight tying), plus an optional
    learned bias.

    `embedding` says whose table, in one of two forms:

    - An `Embedding` module (the reference API). One built in a parent's
      `setup()` is shared by reference; an unparented one (made outside any
      `setup()`) becomes this layer's child `embedding`, i.e. a table of its
      own. A module shared by reference has no JSON form, so a config holding
      a parented one cannot be serialized (an unparented one can: it is
      written as its `Embedding.Config`).
    - An `Embedding.Config` with a `name`: ties to the `Embedding` layer of
      that name in an enclosing layer, e.g. the `embed` layer of

          Serial.Config([
              Embedding.Config(dimension=512, num_embeddings=V, name="embed"),
              ...,
              EmbeddingTranspose.Config(
                  Embedding.Config(dimension=512, num_embeddings=V, name="embed")
              ),
          ])

      This is the form for models that are a pure tree of configs (served
      models, saved as JSON): the config says which layer to tie to instead
      of holding it. At setup the Flax parent chain is walked upwards and the
      first ancestor with a direct child `Embedding` of that name wins; its
      config must equal the given one (the copy is what the shape and dtype
      methods read, as they run unbound). The table lives only in that
      `Embedding` layer's parameters.
    """

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # The Embedding module whose table is used, or the config (with a
        # name) of the enclosing Embedding layer to tie to.
        embedding: Embedding | Embedding.Config
        # Learn a bias of shape [num_embeddings].
        use_bias: bool = True
        # Initializer of the bias.
        bias_init: Initializer = nn.initializers.zeros
        # Optional sharding of the bias.
        bias_sharding: Sharding = None
        # Computation dtype (None: the embedding's compute dtype or promotion).
        compute_dtype: Any = None
        # Parameter dtype (None: the embedding's param_dtype).
        param_dtype: Any = None
        # Optional layer name.
        name: str | None = None

        def __post_init__(self) -> None:
            object.__setattr__(self, "bias_sharding", as_tuple(self.bias_sharding))
            embedding = self.embedding
            if isinstance(embedding, Embedding.Config):
                # The name is the only link to the layer that owns the table.
                if embedding.name is None:
                    raise ValueError(
                        "EmbeddingTranspose.Config(embedding=Embedding.Config(...)) ties to "
                        "the Embedding layer of the same name in an enclosing layer, so the "
                        "Embedding.Config needs a name (the same one in both places, e.g. "
                        "name='embed'). To give this layer a table of its own, pass an "
                        "Embedding module: Embedding.Config(...).make()."
                    )
            elif not isinstance(embedding, Embedding):
                raise TypeError(
                    "EmbeddingTranspose.Config.embedding must be an Embedding module or a "
                    f"named Embedding.Config, got {type(embedding).__name__}: {embedding!r}."
                )

        def make(self) -> EmbeddingTranspose:
            return EmbeddingTranspose(self, name=self.name)

    config: Config

    def setup(self) -> None:
        embedding = self.config.embedding
        if isinstance(embedding, Embedding.Config):
            self.embedding = self._find_enclosing_embedding(embedding)
        else:
            # Adopts an unparented Embedding as the child `embedding` (flax
            # clones it; the config's module stays unparented); one that
            # already has a parent stays shared with it.
            self.embedding = embedding

    @nn.nowrap
    def _find_enclosing_embedding(self, config: Embedding.Config) -> Embedding:
        """The nearest ancestor's direct child `Embedding` named `config.name`.

        Children are what flax registered on each ancestor so far: combinators
        make their layers in `setup()` (named ones keep `config.name`), which
        has run by the time this layer is set up.
        """
        name = config.name
        parent = self.parent
        while isinstance(parent, nn.Module):
            for child in parent._state.children.values():
                if isinstance(child, Embedding) and child.name == name:
                    if child.config != config:
                        raise ValueError(
                            f"EmbeddingTranspose {self.name!r} ties to the Embedding layer "
                            f"{name!r} in {type(parent).__name__} {parent.name!r}, but their "
                            f"configs differ: the layer has {child.config!r}, this "
                            f"EmbeddingTranspose.Config names {config!r}. Use the same "
                            "Embedding.Config in both places."
                        )
                    return child
            parent = parent.parent
        raise ValueError(
            f"EmbeddingTranspose {self.name!r} found no enclosing Embedding layer named "
            f"{name!r}: none of its ancestors has a direct child Embedding of that name. "
            f"Put Embedding.Config(..., name={name!r}) in an enclosing layer (e.g. earlier "
            "in the same Serial), or pass an Embedding module instead "
            "(Embedding.Config(...).make()) to give this layer a table of its own."
        )

    @property
    def _embedding_config(self) -> Embedding.Config:
        embedding = self.config.embedding
        return embedding if isinstance(embedding, Embedding.Config) else embedding.config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        emb = self._embedding_config
        if not input_shape or input_shape[-1] != emb.dimension:
            raise ValueError(
                f"EmbeddingTranspose needs queries whose last channel axis is the embedding "
                f"dimension {emb.dimension}, got input channel shape {tuple(input_shape)}."
            )
        return (*input_shape[:-1], emb.num_embeddings)

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        emb = self._embedding_config
        return get_promoted_dtype(
            input_dtype,
            self.config.param_dtype or emb.param_dtype,
            dtype=self.config.compute_dtype or emb.compute_dtype,
        )

    @types.check_layer
    @nn.compact
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self.get_output_shape(x.channel_shape)
        emb = self._embedding_config
        y = self.embedding.attend(
            masked(x),
            embedding_dtype=self.config.param_dtype,
            compute_dtype=self.config.compute_dtype,
        )
        if not self.config.use_bias:
            return y
        init = self.config.bias_init
        if self.config.bias_sharding is not None:
            init = nn.with_partitioning(init, self.config.bias_sharding)
        dtype = self.config.param_dtype or emb.param_dtype
        bias = self.param("bias", init, (emb.num_embeddings,), dtype)
        return Sequence(y.values + bias.astype(y.dtype), y.mask)


class Argmax(CheckedStep, types.Stateless):
    """Index of the largest value over the last channel axis: `[b, t, ..., n]
    -> [b, t, ...]` int32."""

    @dataclasses.dataclass(frozen=True)
    class Config(types.SequenceLayerConfig):
        # Optional layer name.
        name: str | None = None

        def make(self) -> Argmax:
            return Argmax(self, name=self.name)

    config: Config

    @nn.nowrap
    def get_output_shape(
        self, input_shape: types.ShapeLike, *, constants: types.Constants | None = None
    ) -> tuple[int, ...]:
        if not input_shape:
            raise ValueError("Argmax needs at least one channel axis, got a [b, t] input.")
        return tuple(input_shape[:-1])

    @nn.nowrap
    def get_output_dtype(self, input_dtype: Any) -> Any:
        return jnp.dtype(jnp.int32)

    @types.check_layer
    def layer(
        self, x: Sequence, *, training: bool, constants: types.Constants | None = None
    ) -> Sequence:
        self.get_output_shape(x.channel_shape)
        # Argmax of a zero frame is 0: masked inputs stay masked.
        return x.apply_values_masked(lambda v: jnp.argmax(v, axis=-1).astype(jnp.int32))
