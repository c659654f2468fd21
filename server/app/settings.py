"""`sl-serve` settings assembled from their sources: built-in defaults, a
config file (`--config`, see `server.app.config_file`) and flags, in that
order; and the models they name.

The knobs themselves are settings fields (`server.settings`), from which the
flags and the config file's keys are generated.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

from server.app.config_file import load_config_file, scheduler_config
from server.compile_cache import enable_compile_cache
from server.cpus import available_cpus
from server.defaults import BUILTIN_MODELS, DOWNLOADED_MODELS
from server.errors import ModelLoadError
from server.model import ServableModel, load_model_dir
from server.runtime import SchedulerConfig
from server.settings import ServerSettings, add_flags, flag_values, merge


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sl-serve", description="Streaming inference server.")
    p.add_argument("--config", default=None, help="server.toml (see server/app/config_file.py)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="serve the model directory DIR as NAME (repeatable); a built-in name alone "
        f"({', '.join(sorted(BUILTIN_MODELS))}) serves that built-in. Default: all built-ins.",
    )
    p.add_argument("--api-key", action="append", default=[], help="require this key (repeatable)")
    # Every other flag comes from a settings field (server/settings.py).
    add_flags(p, ServerSettings, "server")
    add_flags(p, SchedulerConfig, "per model (a config file can set them per model)")
    return p


@dataclasses.dataclass
class Settings:
    server: dict[str, Any]
    models: dict[str, ServableModel]
    schedulers: dict[str, SchedulerConfig]
    api_keys: list[str]
    # `--admin-key-file`: who may call the admin routes (empty: loopback only).
    admin_keys: list[str] = dataclasses.field(default_factory=list)


def resolve_settings(args: argparse.Namespace, *, size_xla_pool: bool = False) -> Settings:
    """Merges built-in defaults, the config file and the flags (in that order).
    With `size_xla_pool` (`sl-serve`'s start), also sizes XLA's CPU thread
    pool for this process (`configure_xla_cpu_threads`)."""
    file = load_config_file(args.config) if args.config else None
    server = dataclasses.asdict(
        merge(ServerSettings, file.server if file else {}, flag_values(args, ServerSettings))
    )
    # Before the models are built: building starts JAX's backend, which sizes
    # its thread pool once, and reads traced programs and parameter shapes
    # back from this cache.
    if size_xla_pool:
        configure_xla_cpu_threads(server["xla_cpu_threads"])
    enable_compile_cache(server["compile_cache_dir"])
    flag_knobs = flag_values(args, SchedulerConfig)
    defaults = file.defaults if file else {}
    models: dict[str, ServableModel] = {}
    schedulers: dict[str, SchedulerConfig] = {}
    for entry in file.models if file else []:
        if entry.builtin is not None:
            if entry.builtin not in BUILTIN_MODELS:
                raise ModelLoadError(
                    f"{args.config}: [models.{entry.name}] builtin {entry.builtin!r} is not one "
                    f"of {', '.join(sorted(BUILTIN_MODELS))}."
                )
            model = BUILTIN_MODELS[entry.builtin]()
            model.name = entry.name
        else:
            model = load_model_dir(entry.path or "", name=entry.name)
        models[entry.name] = model
        schedulers[entry.name] = scheduler_config(defaults, entry.scheduler, flag_knobs)
    for name, model in load_models(args.model, default_builtins=not models).items():
        models[name] = model
        schedulers[name] = scheduler_config(defaults, flag_knobs)
    keys = list(server["api_keys"]) + list(args.api_key)
    if server["api_key_file"]:
        text = Path(server["api_key_file"]).read_text()
        keys += [line.strip() for line in text.splitlines() if line.strip()]
    admin_keys = []
    if server["admin_key_file"]:
        admin_keys = read_admin_keys(server["admin_key_file"])
    return Settings(server, models, schedulers, keys, admin_keys)


# XLA's CPU client sizes its intra-op thread pool from this variable when the
# backend starts (then NPROC, then the CPUs it may use).
XLA_THREADS_ENV = "PJRT_NPROC"


def default_xla_cpu_threads() -> int:
    """One less than the CPUs this process may use (`available_cpus`), at least 1.

    XLA splits each op of a tick over its pool and waits for every part: with
    a thread per CPU, whenever an event loop or the tick thread runs Python
    (every chunk, every output), one part waits for a core and the whole op
    with it. A bare step alone loses little with one thread fewer: on 2
    cores a 32-row demo-asr tick takes the same time on one thread as on two
    (loadtests/RESULTS.md, issue 16, has the end-to-end figures).
    """
    return max(1, available_cpus() - 1)


def configure_xla_cpu_threads(threads: int | None) -> int | None:
    """Sizes XLA's CPU pool (`--xla-cpu-threads`): `threads`, else the
    environment's PJRT_NPROC or NPROC (the operator's), else
    `default_xla_cpu_threads()`. Returns the size set, None if the
    environment's stays. Only before JAX's backend starts: it reads the
    variable once."""
    if threads is None:
        if XLA_THREADS_ENV in os.environ or "NPROC" in os.environ:
            return None
        threads = default_xla_cpu_threads()
    if _backend_started():
        logging.getLogger(__name__).warning(
            "--xla-cpu-threads %d not applied: JAX's backend already started", threads
        )
        return None
    os.environ[XLA_THREADS_ENV] = str(threads)
    return threads


def _backend_started() -> bool:
    """Whether JAX's backend (and so its pool) exists already. A private API:
    if it moves, assume not, as at `sl-serve`'s start."""
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def read_admin_keys(path: str | Path) -> list[str]:
    """One key a line; blank lines and `#` comments skipped. A file without a
    key is an error: falling back to loopback-only would hide the mistake."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise ValueError(f"--admin-key-file {path}: no key in it; put one key on each line.")
    return keys


def load_models(specs: list[str], default_builtins: bool = True) -> dict[str, ServableModel]:
    if not specs:
        if not default_builtins:
            return {}
        models = {}
        for name, build in BUILTIN_MODELS.items():
            try:
                models[name] = build()
            except ModelLoadError as e:
                if name not in DOWNLOADED_MODELS:
                    raise
                print(f"sl-serve: not serving {name}: {e}", file=sys.stderr, flush=True)
        return models
    models: dict[str, ServableModel] = {}
    for spec in specs:
        if "=" in spec:
            name, directory = spec.split("=", 1)
            models[name] = load_model_dir(directory, name=name)
        elif spec in BUILTIN_MODELS:
            models[spec] = BUILTIN_MODELS[spec]()
        else:
            raise ModelLoadError(
                f"--model {spec!r}: use NAME=DIR or a built-in name ({', '.join(BUILTIN_MODELS)})."
            )
    return models
