"""Encoding and decoding of values, and the JSON document around them
(`{"format": FORMAT, "version": ..., "config": ...}`)."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sequence_layers import types
from sequence_layers.serialization._common import SerializationError, _did_you_mean
from sequence_layers.serialization._initializers import Initializer, _initializer_from_closure
from sequence_layers.serialization._registry import (
    _callable_names,
    _callables,
    _Catalog,
    _catalog,
    _explicit_types,
    _full_name,
    _is_frozen_dataclass,
    _known_callable_names,
)

FORMAT = "sequence_layers.config"
# The newest format version this code reads. A document is stamped with the
# oldest version that can read it, so that readers of older versions keep
# loading documents that use no newer feature:
#   1: everything but the below.
#   2: unparented layer modules (`{"module": <config>}`).
VERSION = 2


# Public API ---------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """`config` (usually a layer Config) as a JSON-compatible dict:
    `{"format": FORMAT, "version": v, "config": ...}`, `v` the oldest format
    version that can read it (at most `VERSION`)."""
    encoded = _encode(config, _catalog(), "config")
    return {"format": FORMAT, "version": _required_version(encoded), "config": encoded}


def from_dict(d: Mapping[str, Any]) -> Any:
    """Inverse of `to_dict`; checks the format name and version."""
    if not isinstance(d, Mapping) or d.get("format") != FORMAT:
        got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
        raise SerializationError(
            f"Not a serialized sequence_layers config: expected a JSON object with "
            f'"format": "{FORMAT}", "version" and "config"; got {got}.'
        )
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SerializationError(f"Invalid {FORMAT} version {version!r}: expected an integer >= 1.")
    if version > VERSION:
        raise SerializationError(
            f"This config was written in {FORMAT} format version {version}, newer than "
            f"the versions this sequence_layers can read (up to {VERSION}). Upgrade "
            f"sequence_layers to load it."
        )
    extra = sorted(set(d) - {"format", "version", "config"})
    if extra or "config" not in d:
        raise SerializationError(
            f'A {FORMAT} document has exactly the keys "format", "version", "config"; '
            f"got {sorted(d)}."
        )
    return _decode(d["config"], _catalog(), "config")


def dumps(config: Any, *, indent: int | None = None) -> str:
    """Canonical JSON for `config`: sorted keys, strict JSON (no NaN tokens), so
    equal configs give identical text."""
    return json.dumps(to_dict(config), indent=indent, sort_keys=True, allow_nan=False)


def loads(text: str | bytes) -> Any:
    """The config `dumps` wrote: `loads(dumps(c)) == c`."""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise SerializationError(f"Invalid JSON in serialized config: {e}") from e
    return from_dict(d)


# Encoding -----------------------------------------------------------------

_PYTHON_TYPES = {"bool": bool, "int": int, "float": float, "complex": complex, "str": str}
_JNP_SCALAR_TYPE = type(jnp.float32)


def _encode(value: Any, catalog: _Catalog, where: str) -> Any:
    # Order matters: Enum before str/int (IntEnum, StrEnum), numpy scalars
    # before float (np.float64 subclasses float), bool before int.
    if isinstance(value, enum.Enum):
        return {"enum": _type_name(type(value), catalog, where), "name": value.name}
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, np.generic):
        return {"scalar": _encode(value.item(), catalog, where), "dtype": value.dtype.name}
    if isinstance(value, int):
        return int(value) if type(value) is not int else value
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"float": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, complex):
        return {
            "complex": [
                _encode(value.real, catalog, f"{where}.real"),
                _encode(value.imag, catalog, f"{where}.imag"),
            ]
        }
    if isinstance(value, Fraction):
        return {"fraction": str(value)}
    if isinstance(value, Initializer):
        kwargs = {k: _encode(v, catalog, f"{where}.{k}") for k, v in value.kwargs}
        return {"initializer": value.name, "kwargs": kwargs}
    if isinstance(value, list):
        return [_encode(v, catalog, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, catalog, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, nn.Module):  # Before dataclasses: modules are dataclasses.
        return {"module": _encode_module(value, catalog, where)}
    if isinstance(value, dict):
        items = [
            [_encode(k, catalog, f"{where}.key"), _encode(v, catalog, f"{where}[{k!r}]")]
            for k, v in value.items()
        ]
        return {"dict": sorted(items, key=lambda kv: json.dumps(kv[0], sort_keys=True))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        name = _type_name(type(value), catalog, where)
        fields = {
            f.name: _encode(getattr(value, f.name), catalog, f"{where}.{f.name}")
            for f in dataclasses.fields(value)
            if f.init
        }
        return {"type": name, "fields": fields}
    if isinstance(value, _JNP_SCALAR_TYPE):
        return {"dtype": jnp.dtype(value).name}
    if isinstance(value, np.dtype):
        return {"dtype": value.name, "as": "numpy.dtype"}
    if isinstance(value, type) and issubclass(value, np.generic):
        return {"dtype": jnp.dtype(value).name, "as": "numpy.type"}
    if isinstance(value, type) and value in _PYTHON_TYPES.values():
        return {"python_type": value.__name__}
    if callable(value) and not isinstance(value, type):
        return _encode_callable(value, catalog, where)
    raise SerializationError(
        f"Cannot serialize {value!r} of type {type(value).__qualname__} at {where}. "
        f"Supported: None, bool, int, float, complex, str, list, tuple, dict, "
        f"Fraction, Enum, dtypes, registered dataclasses and callables."
    )


def _type_name(cls: type, catalog: _Catalog, where: str) -> str:
    name = catalog.type_names.get(cls)
    if name is None:
        kind = "Enum" if issubclass(cls, enum.Enum) else "dataclass"
        hint = "" if _is_frozen_dataclass(cls) or kind == "Enum" else " (configs must be frozen)"
        raise SerializationError(
            f"Unregistered {kind} type {_full_name(cls)} at {where}{hint}: register it with "
            f"sl.serialization.register_type({cls.__name__})."
        )
    return name


def _encode_module(module: nn.Module, catalog: _Catalog, where: str) -> Any:
    """An unparented layer module as the config it is made from.

    Such a module is a template (flax clones it when a layer adopts it), fully
    determined by its config: `config.make()` rebuilds an equal one (flax
    modules compare and hash by their fields `config`, `parent`, `name`). A
    module with a parent or variables is shared by reference, which JSON
    cannot express.
    """
    cls = type(module)
    config = getattr(module, "config", None)
    if not (
        isinstance(module, types.SequenceLayer)
        and isinstance(config, types.SequenceLayerConfig)
        and getattr(cls, "Config", None) is type(config)
    ):
        raise SerializationError(
            f"Cannot serialize the flax module {cls.__qualname__} at {where}: only sequence "
            f"layers (made by their Config.make()) have a JSON form. Serialize configs, "
            f"not modules."
        )
    if module.parent is not None or module.scope is not None:
        owner = module.parent
        owned_by = (
            f"{type(owner).__name__} {owner.name!r}"
            if isinstance(owner, nn.Module)
            else "variables (it is bound)"
        )
        hint = (
            f"{cls.__name__}.Config(..., name={config.name!r})"
            if getattr(config, "name", None)
            else f"{cls.__name__}.Config(..., name=...)"
        )
        raise SerializationError(
            f"Cannot serialize the {cls.__name__} module {module.name!r} at {where}: it "
            f"belongs to {owned_by}, and a module shared by reference has no JSON form. "
            f"Refer to the layer by its config instead, e.g. "
            f"EmbeddingTranspose.Config(embedding={hint}) ties to the enclosing layer of "
            f"that name. Only an unparented module (made outside any setup()) is written, "
            f"as its config."
        )
    extra = [
        f.name
        for f in dataclasses.fields(module)
        if f.init and f.name not in ("config", "parent", "name")
    ]
    if module.name != config.name or extra:
        why = f"fields {extra}" if extra else f"name {module.name!r} (config: {config.name!r})"
        raise SerializationError(
            f"Cannot serialize the {cls.__name__} module at {where}: its {why} would not "
            f"be rebuilt by config.make(); make it with {cls.__name__}.Config(...).make()."
        )
    return _encode(config, catalog, f"{where}.config")


def _required_version(data: Any) -> int:
    """The oldest format version that reads the encoded `data`."""
    if isinstance(data, list):
        return max((_required_version(v) for v in data), default=1)
    if not isinstance(data, dict):
        return 1
    if "module" in data:
        return 2
    # The keys of a config's "fields" and an initializer's "kwargs" are names,
    # not tags: look at their values only.
    if "type" in data:
        data = data.get("fields", {})
    elif "initializer" in data:
        data = data.get("kwargs", {})
    return max((_required_version(v) for v in data.values()), default=1)


def _encode_callable(fn: Any, catalog: _Catalog, where: str) -> dict[str, Any]:
    entry = _callable_names.get(id(fn))
    if entry is not None and entry[1] is fn:
        return {"callable": entry[0]}
    entry = catalog.callable_paths.get(id(fn))
    if entry is not None and entry[1] is fn:
        return {"callable": entry[0]}
    init = _initializer_from_closure(fn)
    if init is not None:
        return _encode(init, catalog, where)
    name = getattr(fn, "__name__", None) or "fn"
    name = name if name.isidentifier() else "fn"
    raise SerializationError(
        f"Unregistered callable {fn!r} at {where}: register it with "
        f"sl.serialization.register_callable({name!r}, {name}) (for an initializer with "
        f"arguments use sl.serialization.initializer(...)); known: "
        f"{_known_callable_names()}."
    )


# Decoding -----------------------------------------------------------------


def _decode(data: Any, catalog: _Catalog, where: str) -> Any:
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [_decode(v, catalog, f"{where}[{i}]") for i, v in enumerate(data)]
    if not isinstance(data, dict):
        raise SerializationError(f"Unexpected JSON value {data!r} at {where}.")
    keys = set(data)
    for tag, allowed in _TAGS.items():
        if tag in keys:
            if not keys <= allowed:
                raise SerializationError(
                    f"Malformed {tag!r} value at {where}: unexpected keys "
                    f"{sorted(keys - allowed)} (allowed: {sorted(allowed)})."
                )
            return _decode_tagged(tag, data, catalog, where)
    raise SerializationError(
        f"Unknown JSON object at {where} with keys {sorted(keys)}; every object must carry "
        f"one of the tags {sorted(_TAGS)}."
    )


def _decode_dataclass(data: dict[str, Any], catalog: _Catalog, where: str) -> Any:
    cls = _lookup_type(data["type"], catalog, where)
    if not dataclasses.is_dataclass(cls):
        raise SerializationError(f"{data['type']!r} at {where} is an Enum, not a config.")
    payload = data.get("fields", {})
    if not isinstance(payload, dict):
        raise SerializationError(f'"fields" of {data["type"]} at {where} must be an object.')
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(payload) - fields)
    if unknown:
        raise SerializationError(
            f"Unknown field(s) {unknown} for {data['type']} at {where}; its fields: "
            f"{sorted(fields)}. Was it written by a newer sequence_layers?"
        )
    kwargs = {k: _decode(v, catalog, f"{where}.{k}") for k, v in payload.items()}
    try:
        return cls(**kwargs)
    except Exception as e:
        raise SerializationError(f"Cannot build {data['type']} at {where}: {e}") from e


def _lookup_type(name: Any, catalog: _Catalog, where: str) -> type:
    cls = catalog.types.get(name) if isinstance(name, str) else None
    if cls is not None:
        return cls
    if name in catalog.ambiguous:
        raise SerializationError(
            f"Ambiguous type name {name!r} at {where}: it could be any of "
            f"{catalog.ambiguous[name]}; use the fully qualified name."
        )
    known = sorted({*(n for n in catalog.types if "." not in n), *_explicit_types})
    known = [n for n in known if not n.startswith("_")]
    kind = "layer type" if isinstance(name, str) and "." not in name else "type"
    message = (
        f"Unknown {kind} {name!r} at {where}{_did_you_mean(name, catalog.types)}; known: "
        f"{', '.join(known)}."
    )
    if catalog.import_errors:
        failed = "; ".join(f"{m} ({e})" for m, e in sorted(catalog.import_errors.items()))
        message += f" These modules failed to import: {failed}."
    raise SerializationError(message)


def _decode_callable(name: Any, catalog: _Catalog, where: str) -> Any:
    fn = _callables.get(name, catalog.callables_by_path.get(name))
    if fn is None:
        raise SerializationError(
            f"Unknown callable {name!r} at {where}{_did_you_mean(name, _callables)}; known: "
            f"{_known_callable_names()} (and {len(catalog.callables_by_path)} functions "
            f"of sequence_layers modules, by path). Register it with "
            f"sl.serialization.register_callable({name!r}, fn) before loading."
        )
    return fn


def _decode_dtype(name: Any, kind: str, where: str) -> Any:
    try:
        if not isinstance(name, str):
            raise TypeError("dtype names are strings")
        dtype = jnp.dtype(name)
    except TypeError as e:
        raise SerializationError(f"Unknown dtype {name!r} at {where}: {e}") from e
    if kind == "jnp":
        for attr in (name, f"{name}_"):
            if isinstance(candidate := getattr(jnp, attr, None), _JNP_SCALAR_TYPE):
                return candidate
    if kind in ("jnp", "numpy.type"):
        return dtype.type
    if kind == "numpy.dtype":
        return dtype
    raise SerializationError(f'Unknown dtype "as": {kind!r} at {where}; expected {_DTYPE_KINDS}.')


def _decode_module(data: Any, catalog: _Catalog, where: str) -> nn.Module:
    config = _decode(data, catalog, f"{where}.config")
    if not isinstance(config, types.SequenceLayerConfig):
        raise SerializationError(
            f'"module" at {where} must hold a layer config, got {type(config).__name__}.'
        )
    module = config.make()
    if module.parent is not None:
        raise SerializationError(
            f"Cannot load the {type(module).__name__} module at {where} inside a flax "
            f"module's setup() or compact method: it would be attached to that module. "
            f"Load configs outside any module."
        )
    return module


def _decode_tagged(tag: str, data: dict[str, Any], catalog: _Catalog, where: str) -> Any:
    value = data[tag]

    def items() -> list[Any]:
        if not isinstance(value, list):
            raise SerializationError(f"Expected a JSON array in {tag!r} at {where}: {value!r}.")
        return [_decode(v, catalog, f"{where}[{i}]") for i, v in enumerate(value)]

    match tag:
        case "type":
            return _decode_dataclass(data, catalog, where)
        case "tuple":
            return tuple(items())
        case "dict":
            pairs = items()
            if not all(isinstance(kv, list) and len(kv) == 2 for kv in pairs):
                raise SerializationError(f'"dict" at {where} must hold [key, value] pairs.')
            return {k: v for k, v in pairs}
        case "enum":
            cls = _lookup_type(value, catalog, where)
            if not issubclass(cls, enum.Enum) or data.get("name") not in cls.__members__:
                members = list(cls.__members__) if issubclass(cls, enum.Enum) else []
                raise SerializationError(
                    f"Unknown member {data.get('name')!r} of {value} at {where}; members: "
                    f"{members}."
                )
            return cls[data["name"]]
        case "callable":
            return _decode_callable(value, catalog, where)
        case "initializer":
            kwargs = data.get("kwargs", {})
            if not isinstance(kwargs, dict):
                raise SerializationError(
                    f'"kwargs" of the initializer at {where} must be an object.'
                )
            decoded = {k: _decode(v, catalog, f"{where}.{k}") for k, v in kwargs.items()}
            return Initializer(value, tuple(decoded.items()))
        case "float" if value in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[value]
        case "complex":
            parts = items()
            if len(parts) != 2 or not all(isinstance(p, int | float) for p in parts):
                raise SerializationError(f'"complex" at {where} must be [real, imag].')
            return complex(*parts)
        case "fraction" if isinstance(value, str):
            try:
                return Fraction(value)
            except (ValueError, ZeroDivisionError) as e:
                raise SerializationError(f"Bad fraction {value!r} at {where}: {e}") from e
        case "scalar":
            dtype = _decode_dtype(data.get("dtype"), "numpy.dtype", where)
            return dtype.type(_decode(value, catalog, where))
        case "dtype":
            return _decode_dtype(value, data.get("as", "jnp"), where)
        case "python_type" if value in _PYTHON_TYPES:
            return _PYTHON_TYPES[value]
        case "module":
            return _decode_module(value, catalog, where)
    raise SerializationError(f"Bad {tag!r} value {value!r} at {where}.")


_SPECIAL_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_DTYPE_KINDS = ["numpy.dtype", "numpy.type"]
# Tag -> the keys an object with that tag may have (checked in this order).
_TAGS: dict[str, set[str]] = {
    "type": {"type", "fields"},
    "tuple": {"tuple"},
    "enum": {"enum", "name"},
    "callable": {"callable"},
    "initializer": {"initializer", "kwargs"},
    "fraction": {"fraction"},
    "float": {"float"},
    "complex": {"complex"},
    "dict": {"dict"},
    "scalar": {"scalar", "dtype"},
    "dtype": {"dtype", "as"},
    "python_type": {"python_type"},
    "module": {"module"},
}
