"""`sl-serve`: the streaming server process.

Lifecycle: parse flags -> load models -> start HTTP and gRPC (alive, not
ready) -> compile every tick bucket -> ready -> serve -> on SIGTERM/SIGINT
(or `POST /v1/admin/drain`, which may set its own grace period) drain:
readiness false, new streams refused (UNAVAILABLE / close 1013), streams in
flight get `--drain-seconds` to finish, the rest end with UNAVAILABLE (or,
with `--resume-key-file`, move: each gets `moved` with a resume token
another replica continues it from) -> exit 0.

    sl-serve                                 # built-ins: demo-asr, demo-vocoder, logmel, silero-vad
    sl-serve --model asr=./models/asr --max-streams 64 --api-key-file key.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from server.app.config_file import ConfigFileError
from server.app.settings import XLA_THREADS_ENV, build_parser, resolve_settings
from server.compile_cache import enable_compile_cache
from server.errors import ModelLoadError
from server.frontdoors.auth import AdminAccess, ApiKeys
from server.frontdoors.grpc import GrpcServer
from server.frontdoors.http import DrainStatus, create_app
from server.frontdoors.ws_protocol import protocol_class as ws_protocol_class
from server.metrics import Metrics
from server.resume import ResumeKeyError, load_keys
from server.runtime import Runtime
from server.stats import StreamReleased, StreamStats

log = logging.getLogger("sl-serve")

# Longest a drain waits for moved streams' doors to write their `moved`.
_MOVE_SECONDS = 5.0


class Drain:
    """The process's one drain. SIGTERM, SIGINT and `POST /v1/admin/drain`
    all start it; the first start sets the grace period, later ones change
    nothing (a second signal or call during a drain is not a second drain)."""

    def __init__(self, runtime: Runtime, grace_s: float) -> None:
        self.requested = asyncio.Event()
        self.grace_s = grace_s
        self._runtime = runtime

    def start(self, grace_s: float | None = None) -> DrainStatus:
        if not self.requested.is_set():
            if grace_s is not None:
                self.grace_s = grace_s
            # At once, not when `serve` wakes: the caller of the admin call
            # sees /readyz fail and new streams refused as soon as it returns.
            self._runtime.drain()
            self.requested.set()
        return DrainStatus(streams=self._runtime.active_streams, grace_s=self.grace_s)


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: sl-serve drains first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    streams_changed = asyncio.Event()
    registry = CollectorRegistry()
    metrics = Metrics(registry)

    def record(stats: Any) -> None:
        metrics.record(stats)
        if isinstance(stats, StreamStats | StreamReleased):
            loop.call_soon_threadsafe(streams_changed.set)

    settings = resolve_settings(args, size_xla_pool=True)
    cfg = settings.server
    log.info("XLA CPU threads: %s", os.environ.get(XLA_THREADS_ENV) or os.environ.get("NPROC"))
    cache = enable_compile_cache(cfg["compile_cache_dir"])
    log.info("compile cache: %s", cache or "off")
    models = settings.models
    # Stream migration: read the keys before anything starts, so a bad file
    # fails the start (exit 2) rather than the first drain.
    resume_keys = load_keys(cfg["resume_key_file"]) if cfg["resume_key_file"] else None
    runtime = Runtime(models, settings.schedulers, stats_sink=record, resume_keys=resume_keys)
    metrics.attach(runtime)
    keys = ApiKeys(settings.api_keys)
    tls = None
    if cfg["tls_cert"] or cfg["tls_key"]:
        if not (cfg["tls_cert"] and cfg["tls_key"]):
            raise ModelLoadError("--tls-cert and --tls-key go together.")
        tls = (Path(cfg["tls_key"]).read_bytes(), Path(cfg["tls_cert"]).read_bytes())

    drain = Drain(runtime, cfg["drain_seconds"])
    grpc_server = GrpcServer(runtime, cfg["host"], cfg["grpc_port"], keys, tls)
    await grpc_server.set_serving(False)
    await grpc_server.start()
    app = create_app(
        runtime, keys, metrics.render, drainer=drain, admin=AdminAccess(settings.admin_keys)
    )
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
            # No permessage-deflate: audio and float frames barely compress,
            # and zlib cost ~170 us of server CPU per chunk message and its
            # output (loadtests/bench_doors.py). Clients that offer it get
            # plain frames, as RFC 7692 lets a server answer.
            ws_per_message_deflate=False,
            # Reading pauses only past a high-water mark, not around every
            # message (server/frontdoors/ws_protocol.py).
            ws=ws_protocol_class(),
            # Streams were drained already; never hang on a stuck connection.
            timeout_graceful_shutdown=2,
        )
    )
    http_task = asyncio.create_task(http.serve())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain.start)

    log.info("compiling %s", ", ".join(models))
    started = loop.time()

    def model_ready(name: str) -> None:  # on a compile thread
        log.info("model %s ready in %.1f s", name, loop.time() - started)
        asyncio.run_coroutine_threadsafe(grpc_server.set_model_serving([name], True), loop)

    compile_task = loop.run_in_executor(None, runtime.start, model_ready)
    await asyncio.wait(
        [asyncio.ensure_future(compile_task), asyncio.ensure_future(drain.requested.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    if compile_task.done():
        compile_task.result()
        gc.enable()  # off while starting (see main)
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
        await drain.requested.wait()

    if not compile_task.done():
        runtime.stop()  # stops compiling after the bucket in progress
    # Drain: refuse new streams, let streams in flight finish, then move them
    # (with resume keys) or end them.
    # `drain.start` already set the runtime draining (new streams refused).
    log.info("draining for up to %.1f s", drain.grace_s)
    await grpc_server.set_serving(False, list(models))
    deadline = loop.time() + drain.grace_s
    await _wait_until(lambda: not runtime.active_streams, streams_changed, deadline)
    moving = runtime.move_streams()
    if moving:
        # Streams still open move instead of being cut: each gets `moved`
        # once its ticks in flight are delivered (milliseconds), then its
        # door writes it. Bounded: a client that reads nothing must not
        # hold the exit.
        log.info("moving %d streams to other replicas", moving)
        await _wait_until(
            lambda: not runtime.open_handles, streams_changed, loop.time() + _MOVE_SECONDS
        )
    await compile_task
    runtime.stop()
    await grpc_server.stop(grace=1.0)
    http.should_exit = True
    await http_task
    log.info("stopped")
    return 0


async def _wait_until(done: Callable[[], bool], changed: asyncio.Event, deadline: float) -> None:
    """Waits until `done()` (checked each time `changed` is set) or `deadline`."""
    loop = asyncio.get_running_loop()
    while not done() and loop.time() < deadline:
        changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), deadline - loop.time())


# How long a thread may hold the GIL while another waits for it (Python's
# default: 5 ms). The tick thread gives the GIL up and takes it back in
# every device call (dispatch, fetch, a resumed row's write); while a door's
# event loop runs Python, each take-back waits up to this long. A demo-asr
# tick of 32 rows, dispatched and fetched, took 10 ms alone and 110 ms next
# to a thread running Python at 5 ms, 13 ms at 0.5 ms. The loop pays one
# switch (microseconds) a period, only while the tick thread waits.
GIL_SWITCH_INTERVAL_S = 0.0005


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    logging.basicConfig(
        level=(args.log_level or "info").upper(),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        # The collector stays off until the models are ready: building and
        # compiling them makes millions of short-lived objects, and its
        # passes cost 1-2.5 s of a warm start (peak memory is the same).
        gc.disable()
        return asyncio.run(serve(args))
    except (ModelLoadError, ConfigFileError, ResumeKeyError, OSError, ValueError) as e:
        print(f"sl-serve: {e}", file=sys.stderr)
        return 2
    finally:
        gc.enable()


if __name__ == "__main__":
    sys.exit(main())
