"""`sl-serve`: the streaming server process.

Lifecycle: parse flags -> load models -> start HTTP and gRPC (alive, not
ready) -> compile every tick bucket -> ready -> serve -> on SIGTERM/SIGINT
drain: readiness false, new streams refused (UNAVAILABLE / close 1013),
streams in flight get `--drain-seconds` to finish, the rest end with
UNAVAILABLE -> exit 0.

    sl-serve                                 # built-ins: demo-asr, demo-vocoder, logmel, silero-vad
    sl-serve --model asr=./models/asr --max-streams 64 --api-key-file key.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from server.compile_cache import enable_compile_cache
from server.config_file import ConfigFileError, load_config_file, scheduler_config
from server.defaults import BUILTIN_MODELS, DOWNLOADED_MODELS
from server.errors import ModelLoadError
from server.grpc_server import GrpcServer
from server.http_server import create_app
from server.metrics import Metrics
from server.model import ServableModel, load_model_dir
from server.runtime import Runtime
from server.scheduler import SchedulerConfig
from server.settings import ServerSettings, add_flags, flag_values, merge
from server.stats import StreamStats

log = logging.getLogger("sl-serve")


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: sl-serve drains first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sl-serve", description="Streaming inference server.")
    p.add_argument("--config", default=None, help="server.toml (see server/config_file.py)")
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


def resolve_settings(args: argparse.Namespace) -> Settings:
    """Merges built-in defaults, the config file and the flags (in that order)."""
    file = load_config_file(args.config) if args.config else None
    server = dataclasses.asdict(
        merge(ServerSettings, file.server if file else {}, flag_values(args, ServerSettings))
    )
    enable_compile_cache(server["compile_cache_dir"])  # before models: they read it too
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
    return Settings(server, models, schedulers, keys)


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


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    streams_changed = asyncio.Event()
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def record(stats: Any) -> None:
        metrics.record(stats)
        if isinstance(stats, StreamStats):
            loop.call_soon_threadsafe(streams_changed.set)

    settings = resolve_settings(args)
    cfg = settings.server
    cache = enable_compile_cache(cfg["compile_cache_dir"])
    log.info("compile cache: %s", cache or "off")
    models = settings.models
    runtime = Runtime(models, settings.schedulers, stats_sink=record)
    metrics.attach(runtime)
    keys = settings.api_keys
    tls = None
    if cfg["tls_cert"] or cfg["tls_key"]:
        if not (cfg["tls_cert"] and cfg["tls_key"]):
            raise ModelLoadError("--tls-cert and --tls-key go together.")
        tls = (Path(cfg["tls_key"]).read_bytes(), Path(cfg["tls_cert"]).read_bytes())

    grpc_server = GrpcServer(runtime, cfg["host"], cfg["grpc_port"], keys, tls)
    await grpc_server.set_serving(False)
    await grpc_server.start()
    app = create_app(runtime, keys, metrics.render)
    http = _EmbeddedUvicorn(
        uvicorn.Config(
            app,
            host=cfg["host"],
            port=cfg["http_port"],
            log_level=cfg["log_level"].lower(),
            ssl_certfile=cfg["tls_cert"],
            ssl_keyfile=cfg["tls_key"],
            ws_ping_interval=20.0,
            ws_ping_timeout=20.0,
            # Streams were drained already; never hang on a stuck connection.
            timeout_graceful_shutdown=2,
        )
    )
    http_task = asyncio.create_task(http.serve())

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    log.info("compiling %s", ", ".join(models))
    started = loop.time()

    def model_ready(name: str) -> None:  # on a compile thread
        log.info("model %s ready in %.1f s", name, loop.time() - started)
        asyncio.run_coroutine_threadsafe(grpc_server.set_model_serving([name], True), loop)

    compile_task = loop.run_in_executor(None, runtime.start, model_ready, True)
    await asyncio.wait(
        [asyncio.ensure_future(compile_task), asyncio.ensure_future(stop.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    if compile_task.done():
        compile_task.result()
        gc.enable()  # off since main(): see there
        await grpc_server.set_serving(True)
        log.info(
            "ready in %.1f s: grpc %s:%d, http %s:%d",
            loop.time() - started,
            cfg["host"],
            grpc_server.port,
            cfg["host"],
            cfg["http_port"],
        )
        print(f"sl-serve ready grpc={grpc_server.port} http={cfg['http_port']}", flush=True)
        await stop.wait()

    if not compile_task.done():
        runtime.stop()  # stops compiling after the bucket in progress
    # Drain: refuse new streams, let streams in flight finish, then end them.
    log.info("draining for up to %.1f s", cfg["drain_seconds"])
    runtime.drain()
    await grpc_server.set_serving(False, list(models))
    deadline = loop.time() + cfg["drain_seconds"]
    while runtime.active_streams and loop.time() < deadline:
        streams_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(streams_changed.wait(), deadline - loop.time())
    await compile_task
    runtime.stop()
    await grpc_server.stop(grace=1.0)
    http.should_exit = True
    await http_task
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "info").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    # Start-up allocates millions of short-lived objects (tracing, lowering,
    # loading programs); collecting them cost 1-2.5 s of a warm start and
    # freed next to nothing (peak RSS equal). On again once ready.
    gc.disable()
    try:
        return asyncio.run(serve(args))
    except (ModelLoadError, ConfigFileError, OSError, ValueError) as e:
        print(f"sl-serve: {e}", file=sys.stderr)
        return 2
    finally:
        gc.enable()


if __name__ == "__main__":
    sys.exit(main())
