"""Shared pieces of `sequence_layers.serialization`: the error type, the
registry lock and generation counter, and "did you mean" hints."""

from __future__ import annotations

import difflib
import threading
from collections.abc import Iterable
from typing import Any

_PACKAGE = "sequence_layers"


class SerializationError(ValueError):
    """A value cannot be written to, or read from, the config JSON format."""


# Guards every registry (callables, initializers, types) and the catalog cache.
_lock = threading.RLock()
_registry_version = 0


def _bump_registry_version() -> None:
    """Marks the registries as changed, so the discovery catalog is rebuilt.
    Call with `_lock` held."""
    global _registry_version
    _registry_version += 1


def _current_registry_version() -> int:
    return _registry_version


def _did_you_mean(name: Any, choices: Iterable[str]) -> str:
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
