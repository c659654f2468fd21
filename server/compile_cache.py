"""JAX's persistent compilation cache, on by default for `sl-serve`.

Compiling every tick bucket of the built-in models takes minutes on a 2-core
CPU (demo-asr: 4-10 s a bucket). A restarted pod, a scaled-out replica and
every edit-run cycle would pay that again; with the cache, a start with
unchanged models and the same jax/jaxlib reads the compiled executables back
instead. Entries are keyed by the program, the compile options, the device
and the jax version, so a stale entry is never used, only missed.

The directory: `--compile-cache-dir`, else `$SL_COMPILE_CACHE_DIR`, else
`$XDG_CACHE_HOME/sequence-layers-serving/jax` (`~/.cache/...`). `off`
disables it. In Docker and Kubernetes mount a volume there to share it
across restarts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

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
    directory = default_cache_dir() if directory is None else directory
    if directory.strip().lower() in DISABLED:
        return None
    path = Path(directory).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        log.warning("compile cache disabled: %s is not writable (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program: the defaults skip programs that compile in under
    # a second, and a model has many of those (reset, small buckets).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
