"""JAX's persistent compilation cache, on by default for `sl-serve`.

Compiling every tick bucket of the built-in models takes minutes on a 2-core
CPU (demo-asr: 4-10 s a bucket). A restarted pod, a scaled-out replica and
every edit-run cycle would pay that again; with the cache, a start with
unchanged models and the same jax/jaxlib reads the compiled executables back
instead. Entries are keyed by the program, the compile options, the device
and the jax version, so a stale entry is never used, only missed.

The same directory holds, under `sl-traced/`, what start-up traced from
the models' layer code (each model's exported step, its variable shapes),
so a warm start does not run the layer code's Python at all (see "Traced
artifacts" below).

The directory: `--compile-cache-dir`, else `$SL_COMPILE_CACHE_DIR`, else
`$XDG_CACHE_HOME/sequence-layers-serving/jax` (`~/.cache/...`). `off`
disables both. In Docker and Kubernetes mount a volume there to share it
across restarts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger("sl-serve")

ENV_VAR = "SL_COMPILE_CACHE_DIR"
DISABLED = ("off", "none", "")


def default_cache_dir() -> str:
    """`$SL_COMPILE_CACHE_DIR`, else the per-user cache directory."""
    if ENV_VAR in os.environ:
        return os.environ[ENV_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "sequence-layers-serving" / "jax")


def enable_compile_cache(directory: str | None) -> Path | None:
    """Turns the persistent cache on at `directory` (None: the default);
    returns the directory, or None when disabled or not writable (the server
    then compiles from scratch, which is slower but correct)."""
    global traced_dir
    directory = default_cache_dir() if directory is None else directory
    if directory.strip().lower() in DISABLED:
        traced_dir = None
        return None
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        log.warning("compile cache disabled: %s is not writable (%s)", path, e)
        traced_dir = None
        return None
    traced_dir = path / TRACED_DIR
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program: the defaults skip programs that compile in under
    # a second, and a model has many of those (reset, small buckets).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


# Traced artifacts ------------------------------------------------------------
#
# JAX's cache skips XLA compilation, but a warm start still traced the layer
# code: demo-asr spent 1.2 CPU s exporting its step and 1.0 s tracing its
# `init` for parameter shapes, all of it holding the GIL before any program
# could load. These results are cached next to JAX's entries, in
# `<cache dir>/sl-traced/`, keyed by everything the trace depends on: the
# config (canonical JSON), the source of the layer library and of the server
# modules that wrap it, the source of any other module the config names,
# the jax/jaxlib/flax versions and JAX's trace-time settings. A changed key
# is a miss; an unreadable entry is a warning and a trace. `--compile-cache-dir
# off` turns this off too.

TRACED_DIR = "sl-traced"
# Set by `enable_compile_cache`; None: nothing traced is cached.
traced_dir: Path | None = None
_MAGIC = b"sl-traced/1\n"
# Modules whose code the key covers by version (third-party) or by the
# library source hash (sequence_layers).
_VERSIONED = ("sequence_layers", "jax", "jaxlib", "flax", "numpy", "ml_dtypes", "builtins")
_SERVER_FILES = ("programs.py", "model.py", "compile_cache.py")
# JAX settings that cannot change a trace (they only name caches or logs).
_UNTRACED_SETTINGS = ("cache", "log", "dump", "pprint", "transfer_guard", "timeout", "traceback")


@functools.lru_cache(maxsize=1)
def library_fingerprint() -> str:
    """sha256 of the layer library's source, this package's tracing modules
    and the versions of what they call into: any edit is a new key."""
    import flax
    import jaxlib

    import sequence_layers

    h = hashlib.sha256()
    for version in (jax.__version__, jaxlib.__version__, flax.__version__, np.__version__):
        h.update(version.encode() + b"\0")
    root = Path(sequence_layers.__file__).parent
    here = Path(__file__).parent
    files = sorted(root.rglob("*.py")) + [here / name for name in _SERVER_FILES]
    for path in files:
        h.update(str(path.relative_to(path.parents[1])).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def trace_key(config: Any, *parts: Any) -> str | None:
    """A cache key for something traced from `config`'s layer code and
    `parts` (shapes, dtypes, platforms: anything else the trace reads), or
    None when it cannot be had safely (a config that does not serialize, or
    names code with no source file or a closure we cannot see into)."""
    from sequence_layers import serialization

    if config is None:  # a layer not made from a config: nothing to key it by
        return None
    try:
        text = serialization.dumps(config)
        sources = sorted(_foreign_sources(config, set()))
    except Exception:  # unregistered types, builtins without source
        return None
    # Attribute reads see thread-local overrides (`jax.default_matmul_precision`).
    settings = sorted(
        (k, repr(getattr(jax.config, k, v)))
        for k, v in jax.config.values.items()
        if not any(word in k for word in _UNTRACED_SETTINGS)
    )
    h = hashlib.sha256()
    for item in (_MAGIC, library_fingerprint(), text, settings, sources, parts):
        h.update(repr(item).encode() + b"\0")
    return h.hexdigest()


def _foreign_sources(value: Any, seen: set[int]) -> set[str]:
    """sha256 of the source files of modules `value` names outside the
    versioned packages (a user's custom layer, a registered activation)."""
    if id(value) in seen or value is None or isinstance(value, (str, bytes, int, float, bool)):
        return set()
    seen.add(id(value))
    out: set[str] = set()
    if isinstance(value, (tuple, list, set, frozenset)):
        for item in value:
            out |= _foreign_sources(item, seen)
        return out
    if isinstance(value, dict):
        for item in value.items():
            out |= _foreign_sources(item, seen)
        return out
    if isinstance(value, functools.partial):
        return _foreign_sources((value.func, value.args, value.keywords), seen)
    code_owner = value if isinstance(value, type) or callable(value) else type(value)
    module = getattr(code_owner, "__module__", None) or ""
    if module.split(".")[0] not in _VERSIONED:
        if getattr(value, "__closure__", None):
            raise ValueError(f"{value!r} closes over values the key cannot see")
        source = inspect.getsourcefile(sys.modules[module])  # raises without one
        if source is None:
            raise ValueError(f"module {module} has no source file")
        out.add(hashlib.sha256(Path(source).read_bytes()).hexdigest())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            out |= _foreign_sources(getattr(value, field.name, None), seen)
    return out


def _traced_path(kind: str, key: str) -> Path | None:
    return None if traced_dir is None else traced_dir / f"{kind}-{key}.bin"


def read_traced(kind: str, key: str | None) -> bytes | None:
    """The cached payload, or None (no cache, a miss, or a damaged entry:
    logged, and the caller traces again and overwrites it)."""
    path = _traced_path(kind, key) if key else None
    if path is None:
        return None
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("traced cache: cannot read %s (%s); tracing instead", path, e)
        return None
    magic, digest, payload = (
        data[: len(_MAGIC)],
        data[len(_MAGIC) : len(_MAGIC) + 32],
        data[len(_MAGIC) + 32 :],
    )
    if magic != _MAGIC or digest != hashlib.sha256(payload).digest():
        log.warning("traced cache: %s is damaged; tracing instead", path)
        return None
    return payload


def write_traced(kind: str, key: str | None, payload: bytes) -> None:
    """Stores `payload` atomically (a reader sees the old entry or the new
    one, never half); failures are logged, never raised."""
    path = _traced_path(kind, key) if key else None
    if path is None:
        return
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("traced cache: cannot write %s (%s)", path, e)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
