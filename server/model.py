"""Servable models: a layer config, its params and serving metadata.

A model directory holds:
- `model.json`: `{"format": "sequence_layers_serving.model", "version": 1,
  "name", "description", "input": {"shape": [...], "dtype": "float32"},
  "sample_rate", "config": <sequence_layers.serialization dict>}`
  optional `"speech_segments": true` (output channel 0 is a speech
  probability; streams may ask for speech segments)
- `params/`: an orbax checkpoint of the layer's variables.
- optionally `programs/` (model.json `"programs"`): the step exported with
  `jax.export` (see `server.programs`), so the model serves without its
  layer code; version 2 of the format. `config` may then be absent or name
  layer types this server cannot import.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sequence_layers as sl
from server import compile_cache
from server.errors import ModelLoadError
from server.programs import (
    ExportedProgram,
    LayerProgram,
    PlatformMismatch,
    StepSignature,
    export_programs,
    load_programs,
)

log = logging.getLogger("sl-serve")

MODEL_FORMAT = "sequence_layers_serving.model"
MODEL_VERSION = 2
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
    for parameter-free models. The step comes from `config`'s layer code, or
    from `exported` programs (then `config` may be None): `program` is the
    one the server runs.
    """

    name: str
    config: sl.SequenceLayerConfig | None
    variables: dict[str, Any]
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"
    sample_rate: int = 0
    description: str = ""
    # Output channel 0 is a speech probability per window: streams may ask
    # for speech_started / speech_stopped events (server/segments.py).
    speech_segments: bool = False
    exported: ExportedProgram | None = None

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        if self.input_dtype not in _DTYPES:
            raise ModelLoadError(
                f"model {self.name!r}: input dtype {self.input_dtype!r} is not one of "
                f"{sorted(_DTYPES)}."
            )
        self.layer: sl.SequenceLayer | None = None
        if self.config is not None:
            self.layer = self.config.make()
            if not self.layer.supports_step:
                raise ModelLoadError(
                    f"model {self.name!r}: its layer does not support step(), so it cannot stream."
                )
        if self.exported is not None:
            self.program: LayerProgram | ExportedProgram = self.exported
        elif self.layer is not None:
            self.program = LayerProgram(self.layer, self.input_spec)
        else:
            raise ModelLoadError(f"model {self.name!r} has neither a config nor programs.")
        self.signature: StepSignature = self.program.signature
        ratio, block = self.signature.output_ratio, self.signature.block_size
        if (block * ratio).denominator != 1:
            raise ModelLoadError(
                f"model {self.name!r}: block_size {block} times output_ratio "
                f"{ratio} is not a whole number of frames."
            )

    @property
    def block_size(self) -> int:
        return self.signature.block_size

    @property
    def output_ratio(self) -> Fraction:
        return self.signature.output_ratio

    @property
    def parameter_count(self) -> int:
        return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(self.variables))

    @property
    def input_spec(self) -> sl.ChannelSpec:
        # int16 PCM is scaled to float32 in [-1, 1) before it reaches the layer.
        dtype = jnp.int32 if self.input_dtype == "int32" else jnp.float32
        return sl.ChannelSpec(self.input_shape, dtype)

    @property
    def output_spec(self) -> sl.ChannelSpec:
        sig = self.signature
        return sl.ChannelSpec(sig.output_shape, jnp.dtype(sig.output_dtype))

    def info(self, max_streams: int = 0) -> ModelInfo:
        sig = self.signature
        return ModelInfo(
            name=self.name,
            description=self.description,
            input_shape=self.input_shape,
            input_dtype=self.input_dtype,
            output_shape=sig.output_shape,
            output_dtype="float32",
            sample_rate=self.sample_rate,
            block_size=sig.block_size,
            output_ratio=sig.output_ratio,
            input_latency=sig.input_latency,
            output_latency=sig.output_latency,
            max_streams=max_streams,
            speech_segments=self.speech_segments,
        )

    def offline(self, x: np.ndarray) -> np.ndarray:
        """`layer()` on one whole input `[frames, *input_shape]`; returns the
        valid output frames `[n, *output_shape]` as float32. The oracle that
        streaming must match. A model served from exported programs alone
        runs them over the whole input instead (equal by the contract)."""
        values = jnp.asarray(prepare_input(x, self.input_dtype))[None]
        if self.layer is None:
            return self._offline_by_steps(values)
        seq = sl.Sequence.from_values(values)
        y = _offline_fn(self.layer)(self.variables, seq)
        mask = np.asarray(y.mask[0])
        return np.asarray(y.values[0], np.float32)[mask]

    def _offline_by_steps(self, values: jax.Array) -> np.ndarray:
        # The contract: layer(x) == step over x padded with input_latency
        # invalid frames, minus the first output_latency outputs.
        sig, program = self.signature, self.program
        frames, block = values.shape[1], sig.block_size
        total = round_up(frames + sig.input_latency, block)
        x = jnp.pad(values, [(0, 0), (0, total - frames)] + [(0, 0)] * (values.ndim - 2))
        blocks = x.reshape(total // block, 1, block, *x.shape[2:])
        masks = (jnp.arange(total) < frames).reshape(total // block, 1, block)

        def body(state: Any, block_in: tuple[jax.Array, jax.Array]) -> tuple[Any, Any]:
            state, y, y_mask = program.step(self.variables, state, *block_in)
            return state, (y[0], y_mask[0])

        state = program.initial_state(self.variables, 1)
        _, (y, y_mask) = jax.jit(lambda s: jax.lax.scan(body, s, (blocks, masks)))(state)
        y = np.asarray(y).reshape(-1, *sig.output_shape)[sig.output_latency :]
        y_mask = np.asarray(y_mask).reshape(-1)[sig.output_latency :]
        return y[y_mask].astype(np.float32)


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
    shapes = variable_shapes(config, input_shape, input_dtype)
    rng = np.random.default_rng(seed)

    def fill(path: Any, spec: jax.ShapeDtypeStruct) -> np.ndarray:
        name = jax.tree_util.keystr(path[-1:]).lower()
        shape = tuple(spec.shape)
        if "bias" in name or "offset" in name or not shape:
            return np.zeros(shape, spec.dtype)
        if "scale" in name or "gamma" in name:
            return np.ones(shape, spec.dtype)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
        values = rng.standard_normal(shape, np.float32) / np.sqrt(max(fan_in, 1))
        # Through float32 first, as `jnp.asarray(values, dtype)` rounds.
        return values.astype(np.float32).astype(spec.dtype)

    # Filled on the host, then one transfer: an XLA op per leaf (jnp.zeros,
    # jnp.asarray) cost demo-asr 0.5 s of its start-up for 180 leaves.
    return dict(jax.device_put(jax.tree_util.tree_map_with_path(fill, shapes)))


def variable_shapes(
    config: sl.SequenceLayerConfig, input_shape: tuple[int, ...], input_dtype: str = "float32"
) -> Any:
    """The variables `config`'s layer creates for this input, as a tree of
    `jax.ShapeDtypeStruct`: its `init`, traced (not run). With the
    compilation cache on, kept there (demo-asr: 1 CPU s of tracing)."""
    dtype = jnp.int32 if input_dtype == "int32" else jnp.float32
    shape = tuple(int(d) for d in input_shape)
    key = compile_cache.trace_key(config, "variables", shape, str(jnp.dtype(dtype)))
    payload = compile_cache.read_traced("variables", key)
    if payload is not None:
        try:
            return _shapes_from_json(json.loads(payload))
        except (ValueError, TypeError, KeyError) as e:
            log.warning("traced cache: unreadable variable shapes (%s); tracing instead", e)
    layer = config.make()
    block = max(layer.block_size, 1)
    # Token models (input_dtype int32, e.g. an Embedding first) need int ids.
    x = sl.Sequence.from_values(jnp.zeros((1, block * 2, *shape), dtype))
    shapes = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x, training=False))
    encoded = _shapes_to_json(shapes)
    if key is not None and encoded is not None:
        compile_cache.write_traced("variables", key, json.dumps(encoded).encode())
    return shapes


def _shapes_to_json(tree: Any) -> Any:
    """Nested str-keyed dicts of shapes as JSON, or None for anything else."""
    if isinstance(tree, jax.ShapeDtypeStruct):
        return {"shape": list(tree.shape), "dtype": str(tree.dtype)}
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        return None
    out = {k: _shapes_to_json(v) for k, v in tree.items()}
    return None if any(v is None for v in out.values()) else {"tree": out}


def _shapes_from_json(data: Any) -> Any:
    if "tree" in data:
        return {k: _shapes_from_json(v) for k, v in data["tree"].items()}
    return jax.ShapeDtypeStruct(tuple(data["shape"]), jnp.dtype(data["dtype"]))


# Model directories ---------------------------------------------------------


def save_model_dir(
    model: ServableModel,
    directory: str | os.PathLike[str],
    programs: bool = False,
    platforms: tuple[str, ...] | None = None,
) -> Path:
    """Writes `model.json` and the orbax checkpoint under `directory`; with
    `programs`, also the step exported with `jax.export` (`platforms`:
    default this process's), so the directory serves without layer code."""
    import orbax.checkpoint as ocp

    from sequence_layers import serialization

    if model.layer is None or model.config is None:
        raise ModelLoadError(f"model {model.name!r} has no layer code to save or export.")
    path = Path(directory).absolute()
    path.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "format": MODEL_FORMAT,
        # Version 1 unless programs need 2: older servers keep reading it.
        "version": 1,
        "name": model.name,
        "description": model.description,
        "input": {"shape": list(model.input_shape), "dtype": model.input_dtype},
        "sample_rate": model.sample_rate,
        "config": serialization.to_dict(model.config),
    }
    if model.speech_segments:
        doc["speech_segments"] = True
    if programs:
        doc["version"] = 2
        doc["programs"] = export_programs(
            model.layer, model.variables, model.input_spec, path, platforms
        )
    (path / "model.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    if _leaf_count(model.variables):
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path / "params", model.variables, force=True)
    return path


def load_model_dir(directory: str | os.PathLike[str], name: str | None = None) -> ServableModel:
    """Loads a model directory, validating it; errors name the file and the fix.

    With exported programs that run on this platform, the model serves from
    them (no tracing of layer code; a config naming layer types this process
    cannot import is fine). Programs for another platform are skipped with a
    warning when the config can be served instead.
    """
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
        input_shape = tuple(int(d) for d in doc["input"]["shape"])
        input_dtype = doc["input"].get("dtype", "float32")
        config, config_error = _load_config(doc, meta_path)
        exported = _load_exported(path, doc, input_shape, input_dtype, config_error)
        if config is None and exported is None:
            raise ModelLoadError(f"{meta_path}: {config_error}")
        model = ServableModel(
            name=name or doc.get("name") or path.name,
            config=config,
            variables={},
            input_shape=input_shape,
            input_dtype=input_dtype,
            sample_rate=int(doc.get("sample_rate", 0)),
            description=doc.get("description", ""),
            speech_segments=bool(doc.get("speech_segments", False)),
            exported=exported,
        )
    except KeyError as e:
        raise ModelLoadError(f"{meta_path}: missing field {e}.") from e
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{meta_path}: {e}") from e
    model.variables = _restore_params(path / "params", model)
    return model


def _load_config(doc: dict[str, Any], meta_path: Path) -> tuple[Any, str]:
    """(config, "") or (None, why not): a config naming layer types this
    process cannot import is an error only without exported programs."""
    from sequence_layers import serialization

    try:
        return serialization.from_dict(doc["config"]), ""
    except KeyError:
        return None, "missing field 'config' (and no exported programs)."
    except (ValueError, TypeError, ImportError) as e:
        return None, str(e)


def _load_exported(
    path: Path,
    doc: dict[str, Any],
    input_shape: tuple[int, ...],
    input_dtype: str,
    config_error: str,
) -> ExportedProgram | None:
    if "programs" not in doc:
        return None
    dtype = jnp.int32 if input_dtype == "int32" else jnp.float32
    try:
        return load_programs(path, doc["programs"], sl.ChannelSpec(input_shape, dtype))
    except PlatformMismatch as e:
        if config_error:
            raise ModelLoadError(
                f"{e} The layer code cannot be served instead: {config_error}"
            ) from e
        log.warning("%s Serving %s from its layer code instead.", e, path)
        return None


def _restore_params(params_path: Path, model: ServableModel) -> dict[str, Any]:
    """The checkpoint, checked against what the layer code (or, without it,
    the exported step) takes; {} for a model without parameters."""
    import orbax.checkpoint as ocp

    if model.config is not None:
        expected = variable_shapes(model.config, model.input_shape, model.input_dtype)
        if not _leaf_count(expected):
            return {}
    elif not params_path.exists() and not model.program.variable_specs:  # type: ignore[union-attr]
        return {}
    if not params_path.exists():
        raise ModelLoadError(f"{params_path} is missing: the model has parameters to restore.")
    with ocp.StandardCheckpointer() as ckpt:
        try:
            metadata = ckpt.metadata(params_path)
            tree = getattr(metadata, "item_metadata", metadata)
            tree = getattr(tree, "tree", tree)
            if model.config is None:
                expected = _specs_from_metadata(tree)
                _check_leaves_match(model.program.variable_specs, expected, params_path)  # type: ignore[union-attr]
            else:
                _check_tree_matches(expected, tree, params_path)
            return dict(ckpt.restore(params_path, expected))
        except ModelLoadError:
            raise
        except Exception as e:  # orbax raises many types; name the file.
            raise ModelLoadError(f"{params_path}: could not restore checkpoint: {e}") from e


def _specs_from_metadata(tree: Any) -> Any:
    def spec(leaf: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype)

    return jax.tree.map(spec, tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def _check_leaves_match(expected: list[Any], stored: Any, where: Path) -> None:
    got = jax.tree.leaves(stored)
    if len(got) != len(expected) or any(
        tuple(g.shape) != tuple(e.shape) for g, e in zip(got, expected, strict=False)
    ):
        raise ModelLoadError(
            f"{where}: checkpoint does not match the exported programs: "
            f"{[tuple(g.shape) for g in got][:5]} vs {[tuple(e.shape) for e in expected][:5]}."
        )


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
