"""`Runtime`: every model one process serves, behind the one API the front
doors (gRPC, WebSocket) use: open a stream, send chunks, end or cancel it,
iterate its outputs.

Example:
    runtime = Runtime({"logmel": model}, SchedulerConfig(max_streams=8))
    runtime.start()                     # compiles every bucket; then ready
    session = runtime.open_stream("logmel")
    session.send(samples); session.end()
    async for item in session.outputs(): ...
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from server.errors import ModelNotFound
from server.model import ModelInfo, ServableModel
from server.scheduler import Scheduler, SchedulerConfig
from server.session import Session


class Runtime:
    """Owns one `Scheduler` per model."""

    def __init__(
        self,
        models: Mapping[str, ServableModel],
        config: SchedulerConfig | Mapping[str, SchedulerConfig] | None = None,
        stats_sink: Callable[[Any], None] | None = None,
    ) -> None:
        if not models:
            raise ValueError("a Runtime needs at least one model.")
        # Transports report their own stats (chunk latency, errors) here too.
        self.record: Callable[[Any], None] = stats_sink or (lambda _: None)
        self.schedulers: dict[str, Scheduler] = {}
        for name, model in models.items():
            cfg = config.get(name) if isinstance(config, Mapping) else config
            self.schedulers[name] = Scheduler(model, cfg, stats_sink=stats_sink)
        self.draining = False

    def start(self) -> None:
        """Compiles every model's ticks; `ready` is True afterwards."""
        for scheduler in self.schedulers.values():
            scheduler.start()

    @property
    def ready(self) -> bool:
        return not self.draining and all(s.ready for s in self.schedulers.values())

    def stop(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.stop()

    def drain(self) -> None:
        """Refuse new streams; streams in flight go on."""
        self.draining = True
        for scheduler in self.schedulers.values():
            scheduler.draining = True

    @property
    def active_streams(self) -> int:
        return sum(s.active_streams for s in self.schedulers.values())

    def list_models(self) -> list[ModelInfo]:
        return [s.info for s in self.schedulers.values()]

    def get_model(self, name: str) -> ModelInfo:
        return self._scheduler(name).info

    def open_stream(
        self,
        model: str,
        stream_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Session:
        """Admits a stream or raises at once: ModelNotFound, ResourceExhausted
        (no free slot), Unavailable (draining)."""
        return self._scheduler(model).open_stream(loop, stream_id)

    def _scheduler(self, name: str) -> Scheduler:
        try:
            return self.schedulers[name]
        except KeyError:
            known = ", ".join(sorted(self.schedulers))
            raise ModelNotFound(f"unknown model {name!r}; this server serves: {known}.") from None
