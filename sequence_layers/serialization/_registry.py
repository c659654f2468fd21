"""Name registries (callables, types) and discovery: the catalog of every
type and callable `sequence_layers` defines, found by walking
`SequenceLayerConfig` subclasses and scanning the package's modules."""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import os
import sys
import types as pytypes
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from sequence_layers import types
from sequence_layers.serialization._common import (
    _PACKAGE,
    _bump_registry_version,
    _current_registry_version,
    _lock,
)
from sequence_layers.serialization._initializers import register_initializer

# This package. Its own types (`Initializer`) are not config types, and its
# private submodules are not scanned for callables (their public functions are
# reachable through the package itself, e.g. `sequence_layers.serialization.dumps`).
_SELF = __name__.rpartition(".")[0]

T = TypeVar("T")

# name -> object (canonical names and aliases).
_callables: dict[str, Any] = {}
# id(object) -> (canonical name, object); the object is kept so ids stay unique.
_callable_names: dict[int, tuple[str, Any]] = {}
_explicit_types: dict[str, type] = {}


def register_callable(name: str, fn: T) -> T:
    """Makes `fn` serializable as `{"callable": name}`; returns `fn`.

    An object registered twice keeps its first name as canonical (the later
    ones become aliases that `loads` also accepts). Rebinding a name to a
    different object raises.
    """
    if not callable(fn):
        raise TypeError(f"register_callable({name!r}, ...) needs a callable, got {fn!r}.")
    with _lock:
        existing = _callables.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(
                f"Callable name {name!r} is already registered for {existing!r}; "
                f"pick another name for {fn!r}."
            )
        _callables[name] = fn
        _callable_names.setdefault(id(fn), (name, fn))
        _bump_registry_version()
    return fn


def register_type(cls: type[T] | None = None, *, name: str | None = None) -> Any:
    """Registers a dataclass or Enum defined outside `sequence_layers` (layer
    Configs and types in `sequence_layers` modules are found automatically).
    Usable as a decorator, with or without `name=`."""

    def register(c: type[T]) -> type[T]:
        if not (dataclasses.is_dataclass(c) or issubclass(c, enum.Enum)):
            raise TypeError(f"register_type needs a dataclass or Enum class, got {c!r}.")
        key = name or _short_name(c)
        with _lock:
            existing = _explicit_types.get(key)
            if existing is not None and existing is not c:
                raise ValueError(
                    f"Type name {key!r} is already registered for {_full_name(existing)}; "
                    f"pass register_type({c.__qualname__}, name=...) with another name."
                )
            _explicit_types[key] = c
            _bump_registry_version()
        return c

    return register if cls is None else register(cls)


def known_types() -> dict[str, type]:
    """Every type name `loads` accepts (canonical and fully qualified)."""
    return dict(_catalog().types)


def known_callables() -> dict[str, Any]:
    """Every callable name `loads` accepts (registered and path names)."""
    catalog = _catalog()
    return {**catalog.callables_by_path, **_callables}


def _known_callable_names() -> str:
    # Canonical names only: the jax.nn.* / jnp.* aliases would double the list.
    return ", ".join(sorted(name for name, _ in _callable_names.values()))


# Built-in names -----------------------------------------------------------

_JAX_NN_ACTIVATIONS = (
    "celu elu gelu glu hard_sigmoid hard_silu hard_swish hard_tanh identity leaky_relu "
    "log_sigmoid log_softmax logsumexp mish one_hot relu relu6 selu sigmoid silu soft_sign "
    "softmax softplus sparse_plus sparse_sigmoid squareplus standardize swish tanh"
).split()
_JNP_FUNCTIONS = (
    "abs arctan ceil cos cosh exp expm1 floor log log1p negative reciprocal sign sin sinh "
    "sqrt square tanh"
).split()
_INITIALIZER_FACTORY_NAMES = (
    "constant delta_orthogonal glorot_normal glorot_uniform he_normal he_uniform "
    "kaiming_normal kaiming_uniform lecun_normal lecun_uniform normal ones_init orthogonal "
    "truncated_normal uniform variance_scaling xavier_normal xavier_uniform zeros_init"
).split()


def _register_builtins() -> None:
    for name in _JAX_NN_ACTIVATIONS:
        if hasattr(jax.nn, name):
            register_callable(name, getattr(jax.nn, name))
    for name in _JAX_NN_ACTIVATIONS:
        if hasattr(jax.nn, name):
            register_callable(f"jax.nn.{name}", getattr(jax.nn, name))
    for name in _JNP_FUNCTIONS:
        if hasattr(jnp, name):
            fn = getattr(jnp, name)
            if id(fn) not in _callable_names:
                register_callable(name, fn)
            register_callable(f"jnp.{name}", fn)
    # Module-level initializer objects that flax/the reference use as defaults.
    # `zeros_init()` / `ones_init()` return these same objects.
    register_callable("zeros", jax.nn.initializers.zeros)
    register_callable("ones", jax.nn.initializers.ones)
    register_callable("default_kernel_init", nn.linear.default_kernel_init)
    if hasattr(nn.linear, "default_embed_init"):
        register_callable("default_embed_init", nn.linear.default_embed_init)
    for name in _INITIALIZER_FACTORY_NAMES:
        if hasattr(nn.initializers, name):
            register_initializer(name, getattr(nn.initializers, name))


_register_builtins()


# Discovery ----------------------------------------------------------------


@dataclasses.dataclass
class _Catalog:
    # name -> type, for canonical, short (when unique), full and explicit names.
    types: dict[str, type]
    # type -> its canonical name.
    type_names: dict[type, str]
    # Short names shared by several types -> their full names.
    ambiguous: dict[str, list[str]]
    # id(object) -> (path name, object) for package functions, module-level
    # objects and config field defaults.
    callable_paths: dict[int, tuple[str, Any]]
    callables_by_path: dict[str, Any]
    import_errors: dict[str, str]


_imported = False
_import_errors: dict[str, str] = {}
_cached: tuple[Any, _Catalog] | None = None


def _import_package_modules() -> None:
    """Imports every module under `sequence_layers/` once, so that discovery
    sees every layer; a module that fails to import is noted, not fatal."""
    global _imported
    if _imported:
        return
    _imported = True
    package = sys.modules[_PACKAGE]
    for root in list(package.__path__):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames if d.isidentifier() and not d.startswith((".", "__"))
            )
            rel = os.path.relpath(dirpath, root)
            prefix = _PACKAGE if rel == "." else f"{_PACKAGE}.{rel.replace(os.sep, '.')}"
            for filename in sorted(filenames):
                stem, ext = os.path.splitext(filename)
                if ext != ".py" or not stem.isidentifier():
                    continue
                module = prefix if stem == "__init__" else f"{prefix}.{stem}"
                if module in sys.modules:
                    continue
                try:
                    importlib.import_module(module)
                except Exception as e:  # A broken sibling must not break loading.
                    _import_errors[module] = f"{type(e).__name__}: {e}"


def _package_modules() -> list[pytypes.ModuleType]:
    names = sorted(
        n
        for n in list(sys.modules)
        if n.split(".")[0] == _PACKAGE and not n.startswith(_SELF + ".")
    )
    return [m for n in names if isinstance(m := sys.modules.get(n), pytypes.ModuleType)]


def _is_frozen_dataclass(cls: Any) -> bool:
    params = getattr(cls, "__dataclass_params__", None) if isinstance(cls, type) else None
    return params is not None and params.frozen and not inspect.isabstract(cls)


def _config_subclasses() -> list[type]:
    seen: list[type] = []
    stack = [types.SequenceLayerConfig]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen.append(sub)
                stack.append(sub)
    return [c for c in seen if _is_frozen_dataclass(c)]


def _module_types(module: pytypes.ModuleType) -> list[type]:
    found: list[type] = []

    def visit(cls: type, depth: int) -> None:
        if cls in found or depth > 4:
            return
        # flax.struct nodes (Sequence, emits) are runtime values, not configs.
        config_like = _is_frozen_dataclass(cls) and not issubclass(cls, struct.PyTreeNode)
        if config_like or (issubclass(cls, enum.Enum) and len(cls) > 0):
            found.append(cls)
        for inner in vars(cls).values():
            if isinstance(inner, type) and inner.__qualname__.startswith(cls.__qualname__ + "."):
                visit(inner, depth + 1)

    for value in list(vars(module).values()):
        if isinstance(value, type) and value.__module__ == module.__name__:
            visit(value, 0)
    return found


def _short_name(cls: type) -> str:
    qualname = cls.__qualname__.rpartition("<locals>.")[2]
    if qualname.endswith(".Config"):
        qualname = qualname[: -len(".Config")]
    return qualname


def _full_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _catalog() -> _Catalog:
    global _cached
    # Outside the lock: a module being imported may call register_callable.
    _import_package_modules()
    with _lock:
        modules = _package_modules()
        subclasses = _config_subclasses()
        version = _current_registry_version()
        key = (version, tuple(m.__name__ for m in modules), tuple(map(id, subclasses)))
        if _cached is not None and _cached[0] == key:
            return _cached[1]
        catalog = _build_catalog(modules, subclasses)
        _cached = (key, catalog)
        return catalog


def _build_catalog(modules: list[pytypes.ModuleType], subclasses: list[type]) -> _Catalog:
    discovered: list[type] = list(subclasses)
    for module in modules:
        if module.__name__ == _SELF:
            continue
        discovered.extend(c for c in _module_types(module) if c not in discovered)

    by_short: dict[str, list[type]] = {}
    for cls in discovered:
        by_short.setdefault(_short_name(cls), []).append(cls)

    names: dict[str, type] = {}
    type_names: dict[type, str] = {}
    for cls in discovered:
        names[_full_name(cls)] = cls
    ambiguous: dict[str, list[str]] = {}
    for short, classes in by_short.items():
        # A package class keeps its short name even when a user or test class
        # shares it, so what a name means does not depend on what is imported.
        owners = [c for c in classes if c.__module__.startswith(_PACKAGE + ".")]
        owner = classes[0] if len(classes) == 1 else owners[0] if len(owners) == 1 else None
        if owner is not None and short not in _explicit_types:
            names[short] = owner
            type_names[owner] = short
        else:
            ambiguous[short] = sorted(_full_name(c) for c in classes)
    for cls in discovered:
        type_names.setdefault(cls, _full_name(cls))
    names["jax.lax.Precision"] = jax.lax.Precision
    type_names[jax.lax.Precision] = "jax.lax.Precision"
    for name, cls in _explicit_types.items():
        names[name] = cls
        type_names[cls] = name
        ambiguous.pop(name, None)

    # Callables reachable by a path: package functions at their definition
    # site first, then public and private module-level objects (a name pins the
    # object), then config field defaults ("Conv1D.kernel_init").
    candidates: list[tuple[tuple[int, int, str], str, Any]] = []
    for module in modules:
        for attr, value in list(vars(module).items()):
            if attr.startswith("__") or isinstance(value, type | pytypes.ModuleType):
                continue
            if not callable(value) or id(value) in _callable_names:
                continue
            path = f"{module.__name__}.{attr}"
            home = (
                getattr(value, "__module__", None) == module.__name__
                and getattr(value, "__qualname__", None) == attr
            )
            rank = 0 if home else 2 if attr.startswith("_") else 1
            candidates.append(((rank, len(path), path), path, value))
    for cls, type_name in sorted(type_names.items(), key=lambda item: item[1]):
        if not dataclasses.is_dataclass(cls):
            continue
        for field in dataclasses.fields(cls):
            default = field.default
            if default is dataclasses.MISSING or isinstance(default, type):
                continue
            if callable(default) and id(default) not in _callable_names:
                path = f"{type_name}.{field.name}"
                candidates.append(((3, len(path), path), path, default))
    candidates.sort(key=lambda c: c[0])
    callable_paths: dict[int, tuple[str, Any]] = {}
    by_path: dict[str, Any] = {}
    for _, path, value in candidates:
        callable_paths.setdefault(id(value), (path, value))
        by_path.setdefault(path, value)
    return _Catalog(names, type_names, ambiguous, callable_paths, by_path, dict(_import_errors))
