"""Serializable flax initializers: the `Initializer` wrapper, `initializer(...)`
and the registry of initializer factories."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types as pytypes
from collections.abc import Callable
from typing import Any

import jax

from sequence_layers.serialization._common import (
    SerializationError,
    _bump_registry_version,
    _did_you_mean,
    _lock,
)

_initializer_factories: dict[str, Callable[..., Any]] = {}


def register_initializer(name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    """Makes `initializer(name, **kwargs)` build `factory(**kwargs)`."""
    with _lock:
        existing = _initializer_factories.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"Initializer factory {name!r} is already registered: {existing!r}.")
        _initializer_factories[name] = factory
        _bump_registry_version()
    return factory


def known_initializers() -> list[str]:
    return sorted(_initializer_factories)


@dataclasses.dataclass(frozen=True, repr=False)
class Initializer:
    """A serializable, hashable flax initializer: `factory(**kwargs)` by name.

    Call it like the flax initializer it stands for: `init(key, shape, dtype)`.
    Build it with `initializer(name, *args, **kwargs)`, which normalizes the
    arguments (sorted, lists as tuples, factory defaults dropped) so equal
    initializers compare and hash equal.
    """

    # Factory name in the registry (e.g. "normal", "variance_scaling").
    name: str
    # Sorted (argument, value) pairs, without arguments equal to their default.
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        factory = _initializer_factories.get(self.name)
        if factory is None:
            hint = _did_you_mean(self.name, _initializer_factories)
            raise SerializationError(
                f"Unknown initializer {self.name!r}{hint}; known: "
                f"{', '.join(known_initializers())}. Register a factory with "
                f"sl.serialization.register_initializer(name, factory)."
            )
        params = inspect.signature(factory).parameters
        normalized = {}
        for key, value in dict(self.kwargs).items():
            if key not in params:
                raise SerializationError(
                    f"Initializer {self.name!r} has no argument {key!r}; its arguments: "
                    f"{list(params)}."
                )
            value = _freeze(value)
            default = params[key].default
            if type(value) is type(default) and _same(value, default):
                continue
            normalized[key] = value
        object.__setattr__(self, "kwargs", tuple(sorted(normalized.items())))
        try:
            hash(self.kwargs)
        except TypeError as e:
            raise SerializationError(
                f"Arguments of initializer {self.name!r} must be hashable: {e}"
            ) from e
        _build_initializer(self.name, self.kwargs)  # Fails early on bad arguments.

    def __call__(self, key: jax.Array, shape: Any, dtype: Any = None) -> jax.Array:
        init = _build_initializer(self.name, self.kwargs)
        return init(key, shape) if dtype is None else init(key, shape, dtype)

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs)
        return f"initializer({self.name!r}{args})"


def initializer(name: str, *args: Any, **kwargs: Any) -> Initializer:
    """`Initializer` for the flax/jax factory `name` (or one registered with
    `register_initializer`), e.g. `initializer("normal", stddev=0.02)` or
    `initializer("variance_scaling", 2.0, "fan_in", "truncated_normal")`."""
    factory = _initializer_factories.get(name)
    if factory is None:
        Initializer(name)  # Raises the unknown-name error.
    try:
        bound = inspect.signature(factory).bind(*args, **kwargs)
    except TypeError as e:
        raise SerializationError(
            f"Bad arguments for initializer {name!r}{inspect.signature(factory)}: {e}"
        ) from e
    return Initializer(name, tuple(bound.arguments.items()))


@functools.lru_cache(maxsize=256)
def _build_initializer(name: str, kwargs: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
    try:
        return _initializer_factories[name](**dict(kwargs))
    except Exception as e:
        raise SerializationError(f"initializer({name!r}, **{dict(kwargs)}) failed: {e}") from e


def _freeze(value: Any) -> Any:
    # Initializer arguments must be hashable; flax accepts tuples wherever lists go.
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _initializer_from_closure(fn: Any) -> Initializer | None:
    """Reads the factory arguments out of a jax/flax initializer closure such as
    `nn.initializers.lecun_normal()` (qualname `variance_scaling.<locals>.init`)."""
    if not isinstance(fn, pytypes.FunctionType) or not fn.__module__.startswith("jax."):
        return None
    factory_name, sep, local = fn.__qualname__.partition(".<locals>.")
    factory = _initializer_factories.get(factory_name)
    if not sep or local != "init" or factory is None:
        return None
    params = inspect.signature(factory).parameters
    kwargs: dict[str, Any] = {}
    for var, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        if var not in params:
            return None  # Captures something we cannot name; refuse to guess.
        kwargs[var] = cell.cell_contents
    dtype = inspect.signature(fn).parameters.get("dtype")
    if dtype is not None and dtype.default not in (None, inspect.Parameter.empty):
        if "dtype" in params:
            kwargs["dtype"] = dtype.default
    try:
        return Initializer(factory_name, tuple(kwargs.items()))
    except SerializationError:
        return None
