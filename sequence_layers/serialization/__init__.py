"""Layer configs as JSON: a model file that needs no Python code to load.

`dumps(config) -> str` and `loads(text) -> config` round-trip every layer
`Config` (and any value a config holds) through canonical, strict JSON:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> from sequence_layers import serialization
    >>> from sequence_layers.combinators import Serial
    >>> from sequence_layers.dense import Dense
    >>> config = Serial.Config(
    ...     (
    ...         Dense.Config(8, activation=jax.nn.relu, param_dtype=jnp.bfloat16),
    ...         Dense.Config(4, kernel_init=serialization.initializer("normal", stddev=0.02)),
    ...     )
    ... )
    >>> text = serialization.dumps(config)
    >>> restored = serialization.loads(text)
    >>> restored == config and hash(restored) == hash(config)
    True
    >>> serialization.dumps(restored) == text  # canonical: sorted keys, stable names
    True

The document is `{"format": "sequence_layers.config", "version": 1, "config": ...}`
(`to_dict` / `from_dict` give and take that dict, for embedding in a larger
JSON file such as a served model's `model.json`). `version` is the oldest
format version that can read the document: 1, or 2 where it holds a layer
module (below); `VERSION` is the newest this code reads, and a newer document
fails with an "upgrade" error. Inside it, JSON null/bool/int/float/str/list
stand for themselves and every other value is an object with one tag:

- configs (frozen dataclasses): `{"type": "Conv1D", "fields": {...}}`, every
  init field written out; the type name is the layer class name (`Conv1D` for
  `Conv1D.Config`), or the fully qualified name where a short name is ambiguous;
- `{"tuple": [...]}` (lists stay JSON arrays), `{"dict": [[k, v], ...]}`,
  `{"fraction": "1/2"}`, `{"float": "inf"}` (also
  `"-inf"`, `"nan"`), `{"complex": [re, im]}`;
- `{"enum": "PaddingMode", "name": "CAUSAL"}`;
- dtypes: `{"dtype": "bfloat16"}` is `jnp.bfloat16`; `"as": "numpy.dtype"` or
  `"as": "numpy.type"` mark `np.dtype(...)` and `np.float32`-style types;
  `{"python_type": "float"}`; numpy scalars `{"scalar": 1.5, "dtype": "float32"}`;
- callables by name: `{"callable": "relu"}`; initializers built by a factory
  with arguments: `{"initializer": "normal", "kwargs": {"stddev": 0.02}}`;
- (version 2) an unparented layer module, as the config it is made from:
  `{"module": {"type": "Embedding", "fields": {...}}}` for
  `EmbeddingTranspose.Config(Embedding.Config(...).make())`; it loads as
  `config.make()`, an equal module (flax modules compare and hash by their
  fields: config, parent, name). A module with a parent (made in a `setup()`)
  or variables is shared by reference and has no JSON form: to tie an
  `EmbeddingTranspose` to an `Embedding` layer, name it in the config instead,
  `EmbeddingTranspose.Config(Embedding.Config(..., name="embed"))`.

Where names come from (no hand-kept lists):

- Types: every frozen-dataclass subclass of `types.SequenceLayerConfig`, plus
  every frozen dataclass and `Enum` defined in a `sequence_layers` module
  (attention projection configs, relative position embedding configs, ...).
  All `sequence_layers` modules are imported on first use. Types defined
  elsewhere (a user's enum) need `register_type`.
- Callables: `register_callable(name, fn)`, pre-populated with `jax.nn`
  activations, common `jnp` functions and flax's default initializer objects
  (`zeros_init()`, `ones_init()`, `nn.linear.default_kernel_init`, ...).
  Functions and module-level objects of `sequence_layers` modules are named
  by their path (`sequence_layers.signal.hann_window`), and a config field's
  default object by `Type.field` (e.g. an `orthogonal()` closure created as a
  default), so defaults always round-trip to the identical object.
- Initializers with arguments: use `initializer("normal", stddev=0.02)`, a
  frozen, hashable callable that behaves like `nn.initializers.normal(0.02)`.
  A raw flax initializer closure (`nn.initializers.lecun_normal()`) is written
  by reading its arguments and loads as the equivalent `initializer(...)`.

Anything else fails with an error that says what is known and how to register.

For layer authors there is nothing to register: plain values, dtypes, enums,
nested configs and any default object (module-level or written in the Config,
e.g. `kernel_init: ... = nn.initializers.lecun_normal()`) round-trip as they
are. Check a config with `assert loads(dumps(config)) == config`.
"""

from __future__ import annotations

from sequence_layers.serialization._codec import FORMAT as FORMAT
from sequence_layers.serialization._codec import VERSION as VERSION
from sequence_layers.serialization._codec import dumps as dumps
from sequence_layers.serialization._codec import from_dict as from_dict
from sequence_layers.serialization._codec import loads as loads
from sequence_layers.serialization._codec import to_dict as to_dict
from sequence_layers.serialization._common import SerializationError as SerializationError
from sequence_layers.serialization._initializers import Initializer as Initializer
from sequence_layers.serialization._initializers import initializer as initializer
from sequence_layers.serialization._initializers import known_initializers as known_initializers
from sequence_layers.serialization._initializers import (
    register_initializer as register_initializer,
)
from sequence_layers.serialization._registry import known_callables as known_callables
from sequence_layers.serialization._registry import known_types as known_types
from sequence_layers.serialization._registry import register_callable as register_callable
from sequence_layers.serialization._registry import register_type as register_type

__all__ = [
    "FORMAT",
    "VERSION",
    "Initializer",
    "SerializationError",
    "dumps",
    "from_dict",
    "initializer",
    "known_callables",
    "known_initializers",
    "known_types",
    "loads",
    "register_callable",
    "register_initializer",
    "register_type",
    "to_dict",
]
