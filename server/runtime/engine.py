"""`Engine`: serves one model. Owns its `Scheduler` (the slot table), its
`Device` (compiled programs and state) and the tick thread between them.

The tick loop stages, dispatches and delivers with one tick of look-ahead:
while tick N runs on the device, the host stages and dispatches N+1 (when
the scheduler says its chunks are a backlog, or once N is within `_LEAD_S`
of its expected end, with whatever is ready then) and only then fetches and
routes N's outputs. So the device goes from one tick to the next without
waiting for the host, and each stream has up to two chunks in flight,
delivered in order.

Threading: one lock (`_cond`) serializes every call into the scheduler:
the doors' loops (through `StreamHandle`: push, end, cancel) and the tick
thread (schedule, update_from_output). Device calls run outside it, and so
do the clients' reads (counted on the stream without the lock).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import gc
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from server.errors import ResourceExhausted, StreamError, Unavailable
from server.model import ModelInfo, ServableModel
from server.resume import (
    ResumeKeys,
    ResumeNotConfigured,
    StreamSnapshot,
    TokenFingerprintMismatch,
    check_state_layout,
    model_fingerprint,
    sign_token,
    verify_token,
)
from server.runtime import policy, router
from server.runtime.config import SchedulerConfig
from server.runtime.device import Device
from server.runtime.scheduler import Delivery, Scheduler, Staging, Tick
from server.runtime.stream import Handoff, Phase, Stream, StreamHandle
from server.stats import SchedulerStats, StreamReleased, TickStats

# Longest the tick thread sleeps without a reason to wake (timeouts are
# checked on every wake-up anyway).
_MAX_WAIT_S = 1.0
# prctl(2) option that names the calling thread.
_PR_SET_NAME = 15
# Shortest: a wait of ~0 would spin.
_MIN_WAIT_S = 0.0005
# The next tick is planned and dispatched while the one on the device still
# has about this long to run: staging and launching a tick takes the host
# 1-3 ms (more while the event loop holds the GIL). Planned only once the
# tick in flight was delivered, each tick left the device idle that long: at
# 400 demo-asr streams a third of the device's time, with chunks late.
_LEAD_S = 0.005
# Until then, how often the tick thread checks whether the tick in flight
# finished early (its estimate is an average).
_POLL_S = 0.002
# Longest a resume token waits for the ticks of chunks on time in flight to
# end before it is checked anyway (`verify_between_ticks`). Such a tick of
# demo-asr takes 10-12 ms alone; under load one follows another, and each
# token then waits for the ones in flight when it came, never longer.
_VERIFY_YIELD_S = 0.03


class DeviceRunner(Protocol):
    """What the engine needs of a device (`Device`, or a fake in tests)."""

    compile_seconds: dict[Any, float]
    # One stream's state row: (shape, dtype) per leaf, set by `build`.
    row_layout: list[tuple[tuple[int, ...], Any]]

    def build(self) -> None: ...
    def compile(self, stopping: Callable[[], bool]) -> bool: ...
    def warm_up(self) -> dict[int, float]: ...
    def staging(self, bucket: int) -> Staging: ...
    def recycle(self, staged: Staging) -> None: ...
    def reset_slots(self, slots: list[int]) -> None: ...
    def put_row(self, row: tuple[Any, ...]) -> tuple[Any, ...]: ...
    def write_rows(self, rows: list[tuple[int, tuple[Any, ...]]]) -> None: ...
    def read_row(self, slot: int) -> tuple[np.ndarray, ...]: ...
    def initial_row(self) -> tuple[np.ndarray, ...]: ...
    def dispatch(self, slot_ids: np.ndarray, x: np.ndarray, lengths: np.ndarray) -> Any: ...
    def fetch(self, outputs: Any) -> tuple[np.ndarray, np.ndarray]: ...
    def done(self, outputs: Any) -> bool: ...
    def state_lost(self) -> bool: ...
    def reset_state(self) -> None: ...


class Engine:
    """One model's scheduler, device and tick thread. `start()` compiles and
    starts ticking; `open_stream` admits streams."""

    def __init__(
        self,
        model: ServableModel,
        config: SchedulerConfig | None = None,
        stats_sink: Callable[[Any], None] | None = None,
        device: DeviceRunner | None = None,
    ) -> None:
        self.model = model
        self.config = config = config or SchedulerConfig()
        self.chunk_frames = config.chunk_blocks * model.block_size
        if (self.chunk_frames * model.output_ratio).denominator != 1:
            raise ValueError(f"chunk of {self.chunk_frames} frames gives a fractional output.")
        self.info: ModelInfo = model.info(config.max_streams)
        self._record = stats_sink or (lambda _: None)
        self.device: DeviceRunner = device or Device(model, config, self.chunk_frames)
        self.scheduler = Scheduler(
            model.name,
            config,
            chunk_frames=self.chunk_frames,
            input_latency=self.info.input_latency,
            output_latency=self.info.output_latency,
            record=self._record,
        )
        # Stream migration: set by the runtime when it has resume keys.
        self.resume_keys: ResumeKeys | None = None
        self.fingerprint = ""
        # Handles whose door has not finished with them (a draining server
        # waits for these, so `moved` messages are written before it exits).
        self.open_handles = 0
        self._cond = threading.Condition()
        # Ticks holding chunks on time: how many went to the device, and how
        # many came back (`verify_between_ticks` waits on these).
        self._tick_end = threading.Condition(threading.Lock())
        self._on_time_dispatched = 0
        self._on_time_done = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_ready = 0.0
        self.ready = False

    # Lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Allocates device state, compiles every bucket, starts the tick thread."""
        self.device.build()
        if self.resume_keys is not None:
            # Once, at start: it reads every parameter to the host.
            self.fingerprint = model_fingerprint(self.model)
        if not self.device.compile(lambda: self._stopping):
            return  # stopped while compiling: never start ticking
        for bucket, seconds in self.device.warm_up().items():
            self.scheduler.tick_times.seed(bucket, seconds)
        # What exists now (JAX, Flax, the compiled programs: hundreds of
        # thousands of objects) lives as long as the process. Freezing it
        # keeps the collector's full passes from walking it: unfrozen, they
        # stalled ticks for 50 ms.
        gc.freeze()
        self._thread = threading.Thread(
            target=self._run, name=f"tick-{self.model.name}", daemon=True
        )
        self._thread.start()
        with self._cond:
            self.scheduler.accepting = not self._stopping
        self.ready = not self._stopping

    def stop(self) -> None:
        """Ends every stream with UNAVAILABLE and stops the tick thread."""
        with self._cond:
            self._stopping = True
            self.scheduler.draining = True
            self._route(self.scheduler.fail_all(Unavailable("the server is shutting down.")))
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def draining(self) -> bool:
        return self.scheduler.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        with self._cond:
            self.scheduler.draining = value

    @property
    def compile_seconds(self) -> dict[Any, float]:
        return self.device.compile_seconds

    @property
    def active_streams(self) -> int:
        return self.scheduler.active_streams

    @property
    def look_ahead_ticks(self) -> int:
        return self.scheduler.look_ahead_ticks

    def snapshot(self) -> SchedulerStats:
        with self._cond:
            return self.scheduler.snapshot(time.monotonic())

    # Streams (the doors' event loops) ------------------------------------------------

    def open_stream(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        stream_id: str | None = None,
        resume_token: bytes | None = None,
        *,
        snapshot: StreamSnapshot | None = None,
    ) -> StreamHandle:
        """Admits a stream or refuses at once (draining, compiling, full, at
        capacity). With `resume_token`, continues the stream another server
        handed off, or refuses the token (`ResumeTokenError`: nothing is
        restored); with `snapshot`, continues one `verify` already checked
        (how the doors resume: verifying off their event loop)."""
        loop = loop or asyncio.get_running_loop()
        if resume_token is not None:
            snapshot = self.verify(resume_token)
        with self._cond:
            now = time.monotonic()
            if snapshot is None:
                stream = self.scheduler.add(stream_id or uuid.uuid4().hex, now)
                done: list[Delivery] = []
            else:
                stream, done = self.scheduler.resume(stream_id or snapshot.stream_id, now, snapshot)
            handle = StreamHandle(self, stream, self.info, loop, self.config.max_chunk_frames)
            stream.mailbox = handle.mailbox
            if snapshot is not None:
                handle.resume_segments(snapshot.extra.get("segments"))
            self.open_handles += 1
            self._route(done)
            self._cond.notify()  # one more stream that may join a tick
            return handle

    def verify(self, token: bytes) -> StreamSnapshot:
        """The snapshot in a client's token, checked against this model, or
        the `ResumeTokenError` that refuses it. Reads only what `start`
        set, so any thread may call it (`Runtime.resume_stream` does, off
        the doors' loops)."""
        if self.resume_keys is None:
            raise ResumeNotConfigured(
                "this server does not resume streams (it has no --resume-key-file); "
                "resume on a replica of the deployment that moved the stream."
            )
        snapshot = verify_token(
            token, self.resume_keys, model_name=self.model.name, fingerprint=self.fingerprint
        )
        check_state_layout(snapshot.state, self.device.row_layout)
        spec = self.model.input_spec
        buffered = snapshot.buffered_input
        if buffered.shape[1:] != tuple(spec.shape) or buffered.dtype != np.dtype(spec.dtype):
            raise TokenFingerprintMismatch(
                f"resume token's buffered input is {buffered.shape[1:]} {buffered.dtype}; model "
                f"{self.model.name!r} takes {tuple(spec.shape)} {np.dtype(spec.dtype)}."
            )
        # Its row goes to the device here, on the verifying thread, not on
        # the tick thread that writes it into its slot (`Device.put_row`).
        return dataclasses.replace(snapshot, state=self.device.put_row(snapshot.state))

    def verify_between_ticks(self, token: bytes) -> StreamSnapshot:
        """`verify`, once the ticks of chunks on time now on the device have
        ended (at most `_VERIFY_YIELD_S`). For the verifying thread: a
        drained replica's streams all arrive at once, and checking their
        tokens (HMAC over ~0.5 MB each for demo-asr, the row put on the
        device) while the running streams' tick computes took the cores
        that tick needed. 64 streams moved onto a demo-asr replica where 32
        run (`loadtests/bench_migration.py`, 2-core EPYC): the residents'
        tick then took 34-50 ms of device time instead of 10-12, and a
        group of their chunks went over a 50 ms budget in 5 runs of 22;
        checked between their ticks, in none of 22 (RESULTS.md)."""
        with self._tick_end:
            target = self._on_time_dispatched
            self._tick_end.wait_for(lambda: self._on_time_done >= target, _VERIFY_YIELD_S)
        return self.verify(token)

    def _count_tick_end(self, tick: Tick) -> None:
        """A tick counted at dispatch has ended (or failed)."""
        if tick.on_time:
            with self._tick_end:
                self._on_time_done += 1
                self._tick_end.notify_all()

    def sign(self, snapshot: StreamSnapshot) -> bytes:
        """A moving stream's token (on its door's loop); TokenTooLarge if it
        cannot travel."""
        assert self.resume_keys is not None  # only streams of a keyed server move
        return sign_token(
            snapshot, self.resume_keys, model_name=self.model.name, fingerprint=self.fingerprint
        )

    def move_streams(self) -> int:
        """Hands every open stream off (the server drains with resume keys):
        each gets `Moved` once its ticks in flight are delivered. Returns
        how many will move."""
        with self._cond:
            moving = self.scheduler.begin_moves()
            self._cond.notify()
            return moving

    def release(self) -> None:
        with self._cond:
            self.open_handles -= 1
        self._record(StreamReleased(self.model.name))

    def push(self, stream: Stream, x: np.ndarray) -> None:
        with self._cond:
            # Only a stream becoming ready can start a tick: other sends need
            # not wake the tick thread (hundreds of sends a second at load).
            if self.scheduler.push(stream, x, time.monotonic()):
                self._cond.notify()

    def end(self, stream: Stream) -> None:
        with self._cond:
            self._route(self.scheduler.end(stream, time.monotonic()))
            self._cond.notify()

    def cancel(self, stream: Stream, error: StreamError | None, outcome: str) -> None:
        with self._cond:
            self._route(self.scheduler.cancel(stream, error, outcome))
            self._cond.notify()

    def wake(self) -> None:
        """Something changed that the tick thread should look at."""
        with self._cond:
            self._cond.notify()

    def _route(self, deliveries: list[Delivery]) -> None:
        """Under the lock, so a stream's items keep their order."""
        if deliveries:
            router.route((s.mailbox, item) for s, item in deliveries if s.mailbox is not None)

    # The tick loop ---------------------------------------------------------------------

    def _run(self) -> None:
        set_os_thread_name(f"sl-tick-{self.model.name}")
        pending: Tick | None = None
        while True:
            tick = None
            moves: list[Stream] = []
            with self._cond:
                while not self._stopping:
                    start = time.perf_counter()
                    # The device counts as busy until the tick in flight is
                    # about to end: then the next one is planned as if it
                    # were free, and queues behind it.
                    busy = self._work_left(pending) > 0
                    out = self.scheduler.schedule(
                        time.monotonic(), busy, self.device.staging, pending is not None
                    )
                    self._route(out.deliveries)
                    moves = out.moves
                    if out.tick is not None:
                        tick = out.tick
                        tick.host_seconds = time.perf_counter() - start
                        break
                    if pending is not None or moves:
                        break  # deliver the tick in flight; never block on it
                    self._cond.wait(min(max(out.wait_s, _MIN_WAIT_S), _MAX_WAIT_S))
                stopping = self._stopping
            if tick is not None:
                self._dispatch(tick, device_idle=pending is None)
            elif pending is not None and not (moves or stopping) and self._wait_for_lead(pending):
                continue  # the tick in flight is about to end: plan the next one now
            if pending is not None:
                self._complete(pending)
            if moves:
                self._hand_off(moves)
            pending = tick
            if stopping and pending is None:
                return

    def _work_left(self, tick: Tick | None) -> float:
        """Seconds until `tick`, in flight, is `_LEAD_S` from its expected
        end (<= 0: about to end, or nothing in flight)."""
        if tick is None or tick.error is not None:
            return 0.0
        start = max(tick.dispatched, self._last_ready)
        estimate = self.scheduler.tick_times.estimate(tick.bucket)
        return start + estimate - _LEAD_S - time.perf_counter()

    def _wait_for_lead(self, tick: Tick) -> bool:
        """Sleeps (lock and GIL released) until `tick` is `_LEAD_S` from its
        expected end: True then, False if it finished first (deliver it).
        Streams becoming ready meanwhile need not wake this thread: the
        next tick cannot start before this one ends anyway."""
        left = self._work_left(tick)
        if left <= 0:
            return False
        deadline = time.perf_counter() + left
        while not self.device.done(tick.outputs):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return True
            time.sleep(min(remaining, _POLL_S))
        return False

    def _dispatch(self, tick: Tick, device_idle: bool) -> None:
        start = time.perf_counter()
        if device_idle:
            # This thread was most likely just woken by a stream's send, and
            # often shares a core with the waking thread, which is still on
            # its way to sleep. Launching at once puts the launch, that thread
            # and XLA's compute threads on too few cores: on 2 cores the
            # launch took 2.5 ms at p90 instead of 1.3. One yield first lets
            # the waker get off the core.
            _sched_yield()
        try:
            self.device.reset_slots(tick.new_slots)
            if tick.restores:
                self.device.write_rows(tick.restores)
            staged = tick.staged
            # Counted only where tokens are checked: a server without resume
            # keys does no per-tick work for it.
            tick.on_time = self.resume_keys is not None and policy.holds_chunks_on_time(
                (s.resumed_at for s in tick.streams), time.monotonic()
            )
            if tick.on_time:
                with self._tick_end:
                    self._on_time_dispatched += 1
            tick.outputs = self.device.dispatch(staged.slots, staged.x, staged.taken)
        except Exception as e:  # a device failure ends these streams, not the server
            tick.error = e
            self._recover_state(e)
        tick.dispatched = time.perf_counter()
        tick.dispatch_seconds = tick.dispatched - start

    def _recover_state(self, error: Exception) -> None:
        """After a failed device call: if the donated state is gone, every
        stream's state is lost. Those streams end with the error, and the
        slots start over from a fresh state so the server keeps serving."""
        if not self.device.state_lost():
            return
        self.device.reset_state()
        lost = ResourceExhausted(f"device step failed; stream state lost: {error}")
        with self._cond:
            self._route(self.scheduler.fail_all(lost))

    def _hand_off(self, streams: list[Stream]) -> None:
        """Moving streams with nothing in flight: their state rows to the
        host, then each ends with its `Handoff` (after every output it was
        given, in its queue already). Their rows cannot change meanwhile:
        a moving stream is never in a tick."""
        rows: list[tuple[np.ndarray, ...] | Exception] = []
        for stream in streams:
            try:
                if stream.restore_state is not None:  # resumed, never stepped here
                    rows.append(tuple(np.asarray(leaf) for leaf in stream.restore_state))
                elif stream.needs_reset:  # never stepped: its slot holds another's state
                    rows.append(self.device.initial_row())
                else:
                    rows.append(self.device.read_row(stream.slot))
            except Exception as e:  # the device failed: this stream ends as without a key
                rows.append(e)
        spec = self.model.input_spec
        empty = np.zeros((0, *spec.shape), spec.dtype)
        with self._cond:
            for stream, row in zip(streams, rows, strict=True):
                if isinstance(row, Exception):
                    error = Unavailable(f"the server is draining; the stream could not move: {row}")
                    self._route(self.scheduler.cancel(stream, error, "error"))
                elif stream.phase is not Phase.DONE:  # not cancelled meanwhile
                    handoff = Handoff(stream.snapshot(row, empty))
                    self._route(self.scheduler.hand_off(stream, handoff))

    def _complete(self, tick: Tick) -> None:
        """Waits for a dispatched tick's outputs and routes them to streams."""
        try:
            try:
                if tick.error is not None:
                    raise tick.error
                y, y_mask = self.device.fetch(tick.outputs)
            finally:  # off the device, with its outputs or failed
                self._count_tick_end(tick)
            self.device.recycle(tick.staged)
        except Exception as e:
            with self._cond:
                self._route(self.scheduler.fail_tick(tick, e))
            return
        ready = time.perf_counter()
        # Device time: from when the device could start it (dispatched, and
        # the tick before it done) until its outputs were on the host.
        device_seconds = ready - max(tick.dispatched, self._last_ready)
        idle_seconds = max(tick.dispatched - self._last_ready, 0.0) if self._last_ready else 0.0
        self._last_ready = ready
        with self._cond:
            deliveries, frames = self.scheduler.update_from_output(
                tick, y, y_mask, time.monotonic(), device_seconds
            )
            self._route(deliveries)
            tick.host_seconds += time.perf_counter() - ready
            self.scheduler.tick_times.observe_host(tick.host_seconds + tick.dispatch_seconds)
        self._record(
            TickStats(
                self.model.name,
                batch_size=len(tick.streams),
                bucket=tick.bucket,
                started_at=tick.started_at,
                tick_seconds=device_seconds,
                host_seconds=tick.host_seconds,
                dispatch_seconds=tick.dispatch_seconds,
                queue_wait_seconds=tick.waits,
                input_frames=tick.input_frames,
                output_frames=frames,
                device_idle_seconds=idle_seconds,
            )
        )


_sched_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)  # POSIX only


def set_os_thread_name(name: str) -> None:
    """Names the calling thread for the OS (Linux keeps 15 bytes), so `top -H`,
    `ps -L` and /proc show the tick thread apart from the event loop: Python's
    own thread names stay inside Python. Does nothing where prctl is missing."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
