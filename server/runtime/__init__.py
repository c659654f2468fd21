"""The runtime: every model one process serves, behind the one API the front
doors (gRPC, WebSocket) use: open a stream, send chunks, end or cancel it,
iterate its outputs. No network code here.

One responsibility a module:
- `config`: `SchedulerConfig`, the per-model knobs (flags and TOML keys are
  generated from it);
- `stream`: a stream's host state (`Stream`, one writer) and the doors'
  handle on it (`StreamHandle`);
- `policy`: pure rules: when a tick starts, who timed out, whom to admit;
- `scheduler`: the slot table behind add / push / end / cancel / schedule /
  update_from_output / snapshot;
- `device`: the only jax code: compiled programs, slot state, dispatch, fetch;
- `engine`: one model's tick thread between its scheduler and its device;
- `router`: outputs from the tick thread to the doors' event loops.

Stream migration (DESIGN.md section 8): with `resume_keys`, a stream opens
from a `resume_token` (its state row written into a free slot instead of a
reset; `resume_stream` checks the token and puts its row on the device off
the event loop, between the ticks of the streams running here, a burst of
rows is written over ticks,
`restore_bytes_per_tick` at a time, and resent audio never delays a tick of
chunks on time), and
`move_streams` hands every open stream off: once its ticks in
flight are delivered, its row comes to the host and it ends with `Moved`
(a signed token) instead of `Ended`.

Example:
    runtime = Runtime({"logmel": model}, SchedulerConfig(max_streams=8))
    runtime.start()                     # compiles every bucket; then ready
    stream = runtime.open_stream("logmel")
    stream.send(samples); stream.end()
    async for item in stream.outputs(): ...
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Mapping
from typing import Any

from server.cpus import available_cpus
from server.errors import ModelNotFound
from server.model import ModelInfo, ServableModel
from server.resume import ResumeKeys
from server.runtime.config import SchedulerConfig as SchedulerConfig
from server.runtime.config import buckets_for as buckets_for
from server.runtime.engine import Engine as Engine
from server.runtime.stream import MAX_IN_FLIGHT as MAX_IN_FLIGHT
from server.runtime.stream import Ended as Ended
from server.runtime.stream import Moved as Moved
from server.runtime.stream import Output as Output
from server.runtime.stream import StreamHandle as StreamHandle
from server.segments import SpeechEvent as SpeechEvent
from server.stats import ModelStats

# The name the front doors knew the handle by.
Session = StreamHandle


class Runtime:
    """Owns one `Engine` per model."""

    def __init__(
        self,
        models: Mapping[str, ServableModel],
        config: SchedulerConfig | Mapping[str, SchedulerConfig] | None = None,
        stats_sink: Callable[[Any], None] | None = None,
        resume_keys: ResumeKeys | None = None,
    ) -> None:
        """`resume_keys` turns stream migration on: streams resume from
        tokens signed with one of them, and `move_streams` hands streams off."""
        if not models:
            raise ValueError("a Runtime needs at least one model.")
        # Transports report their own stats (chunk latency, errors) here too.
        self.record: Callable[[Any], None] = stats_sink or (lambda _: None)
        self.engines: dict[str, Engine] = {}
        for name, model in models.items():
            cfg = config.get(name) if isinstance(config, Mapping) else config
            self.engines[name] = Engine(model, cfg, stats_sink=stats_sink)
            self.engines[name].resume_keys = resume_keys
        self.resume_keys = resume_keys
        self.draining = False
        # Resume tokens are verified and decoded here, not on the doors'
        # event loops: a demo-asr token is ~0.5 MB to HMAC and copy, and a
        # drained replica's streams all arrive at once (64 tokens, 32 MB),
        # while the loops also carry the running streams' chunks. Both
        # steps release the GIL. One thread: a burst takes one core at
        # most, leaving the other to the tick thread.
        self._verify_pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="resume-verify"
        )

    def start(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Compiles every model's ticks; each model serves as soon as its own
        programs are ready (`on_ready(name)` is called then), and `ready` is
        True once all are.

        Models compile two at a time, the largest first and the rest fewest
        parameters first: XLA releases the GIL while it compiles, so a second
        core halves a cold start, and small models (logmel: seconds) do not
        wait behind big ones.
        """
        order = sorted(self.engines, key=lambda n: self.engines[n].model.parameter_count)

        def start_one(name: str) -> None:
            self.engines[name].start()
            if on_ready is not None and self.engines[name].ready:
                on_ready(name)

        workers = max(1, min(len(order), 2, available_cpus()))
        if workers > 1:  # the largest at once: it finishes last (warm demo-asr: 4 s later)
            order = order[-1:] + order[:-1]
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="compile") as pool:
            for future in [pool.submit(start_one, name) for name in order]:
                future.result()

    @property
    def ready(self) -> bool:
        return not self.draining and all(e.ready for e in self.engines.values())

    def model_state(self, name: str) -> str:
        """`compiling`, `ready` or `draining`: what `/v1/models` shows."""
        engine = self._engine(name)
        if self.draining:
            return "draining"
        return "ready" if engine.ready else "compiling"

    def model_ready(self, name: str) -> bool:
        return self.model_state(name) == "ready"

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()
        self._verify_pool.shutdown(wait=False, cancel_futures=True)

    def drain(self) -> None:
        """Refuse new streams; streams in flight go on."""
        self.draining = True
        for engine in self.engines.values():
            engine.draining = True

    def move_streams(self) -> int:
        """Hands every open stream off with a resume token (`Moved`, after
        its outputs so far); returns how many move. Without resume keys,
        moves none: the caller ends them as before."""
        if self.resume_keys is None:
            return 0
        return sum(e.move_streams() for e in self.engines.values())

    @property
    def active_streams(self) -> int:
        return sum(e.active_streams for e in self.engines.values())

    @property
    def open_handles(self) -> int:
        """Streams a front door has not finished writing (moved ones included)."""
        return sum(e.open_handles for e in self.engines.values())

    def snapshot(self) -> list[ModelStats]:
        """Every model's stats now (for metrics)."""
        return [
            ModelStats(
                e.snapshot(),
                {str(k): v for k, v in e.compile_seconds.items()},
                e.ready,
            )
            for e in self.engines.values()
        ]

    def list_models(self) -> list[ModelInfo]:
        return [e.info for e in self.engines.values()]

    def get_model(self, name: str) -> ModelInfo:
        return self._engine(name).info

    def open_stream(
        self,
        model: str,
        stream_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        resume_token: bytes | None = None,
    ) -> StreamHandle:
        """Admits a stream or raises at once: ModelNotFound, ResourceExhausted
        (no free slot, or the model is at capacity), Unavailable (draining,
        compiling). With `resume_token` (from a `Moved`), continues that
        stream, or raises the token's `ResumeTokenError` (nothing restored)."""
        return self._engine(model).open_stream(loop, stream_id, resume_token)

    async def resume_stream(
        self, model: str, resume_token: bytes, stream_id: str | None = None
    ) -> StreamHandle:
        """`open_stream` with `resume_token`, for the doors: the token is
        verified and decoded, and its state row put on the device, on a
        worker thread, so the event loop goes on serving other streams
        meanwhile; the stream is admitted back on the loop. Raises as
        `open_stream` does."""
        engine = self._engine(model)
        loop = asyncio.get_running_loop()
        snapshot = await loop.run_in_executor(
            self._verify_pool, engine.verify_between_ticks, resume_token
        )
        return engine.open_stream(loop, stream_id, snapshot=snapshot)

    def _engine(self, name: str) -> Engine:
        try:
            return self.engines[name]
        except KeyError:
            known = ", ".join(sorted(self.engines))
            raise ModelNotFound(f"unknown model {name!r}; this server serves: {known}.") from None
