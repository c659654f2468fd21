"""Servable models: a layer config, its params and serving metadata.

A model directory holds:
- `model.json`: `{"format": "sequence_layers_serving.model", "version": 1,
  "name", "description", "input": {"shape": [...], "dtype": "float32"},
  "sample_rate", "config": <sequence_layers.serialization dict>}`
  optional `"speech_segments": true` (output channel 0 is a speech
  probability; streams may ask for speech segments)
- `params/`: an orbax checkpoint of the layer's variables.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sequence_layers as sl
from server.errors import ModelLoadError

MODEL_FORMAT = "sequence_layers_serving.model"
MODEL_VERSION = 1
_DTYPES = {"float32": np.float32, "int16": np.int16, "int32": np.int32}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a client needs to know to stream to a model (ModelInfo on the wire)."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    input_dtype: str
    output_shape: tuple[int, ...]
    output_dtype: str
    sample_rate: int
    block_size: int
    output_ratio: Fraction
    input_latency: int
    output_latency: int
    max_streams: int = 0
    # Output channel 0 is a speech probability: streams may ask for speech segments.
    speech_segments: bool = False

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["output_shape"] = list(self.output_shape)
        d["output_ratio"] = {
            "numerator": self.output_ratio.numerator,
            "denominator": self.output_ratio.denominator,
        }
        return d


@dataclasses.dataclass
class ServableModel:
    """A layer ready to serve: config, variables and metadata.

    `variables` is the Flax variable dict (`{"params": ...}`), possibly empty
    for parameter-free models.
    """

    name: str
    config: sl.SequenceLayerConfig
    variables: dict[str, Any]
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    sample_rate: int = 0
    description: str = ""
    # Output channel 0 is a speech probability per window: streams may ask
    # for speech_started / speech_stopped events (server/segments.py).
    speech_segments: bool = False

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if self.input_dtype not in _DTYPES:
            raise ModelLoadError(
                f"model {self.name!r}: input dtype {self.input_dtype!r} is not one of "
                f"{sorted(_DTYPES)}."
            )
        self.layer = self.config.make()
        if not self.layer.supports_step:
            raise ModelLoadError(
                f"model {self.name!r}: its layer does not support step(), so it cannot stream."
            )
        ratio = self.layer.output_ratio
        if (self.layer.block_size * ratio).denominator != 1:
            raise ModelLoadError(
                f"model {self.name!r}: block_size {self.layer.block_size} times output_ratio "
                f"{ratio} is not a whole number of frames."
            )

    @property
    def input_spec(self) -> sl.ChannelSpec:
        # int16 PCM is scaled to float32 in [-1, 1) before it reaches the layer.
        dtype = jnp.int32 if self.input_dtype == "int32" else jnp.float32
        return sl.ChannelSpec(self.input_shape, dtype)

    @property
    def output_spec(self) -> sl.ChannelSpec:
        return self.layer.get_output_spec(self.input_spec)

    def info(self, max_streams: int = 0) -> ModelInfo:
        out = self.output_spec
        return ModelInfo(
            name=self.name,
            description=self.description,
            input_shape=self.input_shape,
            input_dtype=self.input_dtype,
            output_shape=tuple(out.shape),
            output_dtype="float32",
            sample_rate=self.sample_rate,
            block_size=self.layer.block_size,
            output_ratio=self.layer.output_ratio,
            input_latency=self.layer.input_latency,
            output_latency=self.layer.output_latency,
            max_streams=max_streams,
            speech_segments=self.speech_segments,
        )

    def offline(self, x: np.ndarray) -> np.ndarray:
        """`layer()` on one whole input `[frames, *input_shape]`; returns the
        valid output frames `[n, *output_shape]` as float32. The oracle that
        streaming must match."""
        values = jnp.asarray(prepare_input(x, self.input_dtype))[None]
        seq = sl.Sequence.from_values(values)
        y = _offline_fn(self.layer)(self.variables, seq)
        mask = np.asarray(y.mask[0])
        return np.asarray(y.values[0], np.float32)[mask]


_OFFLINE_CACHE: dict[int, Any] = {}


def _offline_fn(layer: sl.SequenceLayer) -> Any:
    key = id(layer)
    if key not in _OFFLINE_CACHE:
        _OFFLINE_CACHE[key] = jax.jit(
            lambda v, x: layer.apply(v, x, training=False, method=layer.layer)
        )
    return _OFFLINE_CACHE[key]


def prepare_input(x: np.ndarray, input_dtype: str) -> np.ndarray:
    """Wire samples to model input: int16 PCM scales to float32 in [-1, 1)."""
    if input_dtype == "int16" or x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if input_dtype == "int32":
        return x.astype(np.int32)
    return x.astype(np.float32, copy=False)


def init_variables(
    config: sl.SequenceLayerConfig,
    input_shape: tuple[int, ...],
    seed: int = 0,
    input_dtype: str = "float32",
) -> dict[str, Any]:
    """Deterministic variables for `config` (the built-in models, tests).

    Shapes come from the layer's own `init` (traced, not run); values from
    NumPy's PCG64: fan-in scaled normals for kernels, zeros for biases, ones
    for normalization scales. Running jax.random initializers instead costs
    ~1 s of XLA compilation per layer on CPU (30 s for the demo models), and
    NumPy's stream is stable across JAX versions.
    """
    layer = config.make()
    block = max(layer.block_size, 1)
    # Token models (input_dtype int32, e.g. an Embedding first) need int ids.
    dtype = jnp.int32 if input_dtype == "int32" else jnp.float32
    x = sl.Sequence.from_values(jnp.zeros((1, block * 2, *input_shape), dtype))
    shapes = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x, training=False))
    rng = np.random.default_rng(seed)

    def fill(path: Any, spec: jax.ShapeDtypeStruct) -> jax.Array:
        name = jax.tree_util.keystr(path[-1:]).lower()
        shape = tuple(spec.shape)
        if "bias" in name or "offset" in name or not shape:
            return jnp.zeros(shape, spec.dtype)
        if "scale" in name or "gamma" in name:
            return jnp.ones(shape, spec.dtype)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
        values = rng.standard_normal(shape, np.float32) / np.sqrt(max(fan_in, 1))
        return jnp.asarray(values, spec.dtype)

    return dict(jax.tree_util.tree_map_with_path(fill, shapes))


# Model directories ---------------------------------------------------------


def save_model_dir(model: ServableModel, directory: str | os.PathLike[str]) -> Path:
    """Writes `model.json` and the orbax checkpoint under `directory`."""
    import orbax.checkpoint as ocp

    from sequence_layers import serialization

    path = Path(directory).absolute()
    path.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "name": model.name,
        "description": model.description,
        "input": {"shape": list(model.input_shape), "dtype": model.input_dtype},
        "sample_rate": model.sample_rate,
        "config": serialization.to_dict(model.config),
    }
    if model.speech_segments:
        doc["speech_segments"] = True
    (path / "model.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if _leaf_count(model.variables):
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path / "params", model.variables, force=True)
    return path


def load_model_dir(directory: str | os.PathLike[str], name: str | None = None) -> ServableModel:
    """Loads a model directory, validating it; errors name the file and the fix."""
    from sequence_layers import serialization

    path = Path(directory).absolute()
    meta_path = path / "model.json"
    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist.")
    if not meta_path.is_file():
        raise ModelLoadError(
            f"{meta_path} is missing: a model directory needs model.json "
            f"(write one with `sl-models export NAME DIR`)."
        )
    try:
        doc = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{meta_path}: invalid JSON at line {e.lineno}: {e.msg}.") from e
    if doc.get("format") != MODEL_FORMAT:
        raise ModelLoadError(
            f"{meta_path}: format must be {MODEL_FORMAT!r}, got {doc.get('format')!r}."
        )
    version = doc.get("version")
    if not isinstance(version, int) or version > MODEL_VERSION:
        raise ModelLoadError(
            f"{meta_path}: version {version!r} is not supported (this server reads up to "
            f"{MODEL_VERSION}); upgrade the server."
        )
    try:
        config = serialization.from_dict(doc["config"])
        model = ServableModel(
            name=name or doc.get("name") or path.name,
            config=config,
            variables={},
            input_shape=tuple(doc["input"]["shape"]),
            input_dtype=doc["input"].get("dtype", "float32"),
            sample_rate=int(doc.get("sample_rate", 0)),
            description=doc.get("description", ""),
            speech_segments=bool(doc.get("speech_segments", False)),
        )
    except KeyError as e:
        raise ModelLoadError(f"{meta_path}: missing field {e}.") from e
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{meta_path}: {e}") from e

    expected = jax.eval_shape(
        lambda: init_variables(model.config, model.input_shape, input_dtype=model.input_dtype)
    )
    if not _leaf_count(expected):
        return model
    params_path = path / "params"
    if not params_path.exists():
        raise ModelLoadError(f"{params_path} is missing: the model has parameters to restore.")
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckpt:
        try:
            metadata = ckpt.metadata(params_path)
            tree = getattr(metadata, "item_metadata", metadata)
            tree = getattr(tree, "tree", tree)
            _check_tree_matches(expected, tree, params_path)
            model.variables = ckpt.restore(params_path, expected)
        except ModelLoadError:
            raise
        except Exception as e:  # orbax raises many types; name the file.
            raise ModelLoadError(f"{params_path}: could not restore checkpoint: {e}") from e
    return model


def _leaf_count(tree: Any) -> int:
    return len(jax.tree.leaves(tree))


def _check_tree_matches(expected: Any, stored: Any, where: Path) -> None:
    exp = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(stored)}
    missing = sorted(set(exp) - set(got))
    extra = sorted(set(got) - set(exp))
    if missing or extra:
        raise ModelLoadError(
            f"{where}: checkpoint does not match model.json's config: missing {missing[:5]}, "
            f"unexpected {extra[:5]}."
        )
    for key, spec in exp.items():
        shape = tuple(getattr(got[key], "shape", ()))
        if shape != tuple(spec.shape):
            raise ModelLoadError(
                f"{where}: parameter {key} has shape {shape} in the checkpoint but the config "
                f"needs {tuple(spec.shape)}."
            )


def round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
