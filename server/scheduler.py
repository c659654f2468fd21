"""The `Scheduler`: one model's streams, stepped together on the device.

- `state`: the model's state pytree for `max_streams` slots (rounded up to a
  multiple of the device count), the slot axis in place of each leaf's batch axis,
  resident on device and donated to every tick so it updates in place.
- One jit-compiled tick per power-of-two bucket, compiled before `start()`
  returns: gather the slots' state, reset new streams to the initial state,
  `step` one chunk of `[bucket, chunk_frames, *c]`, scatter the state back.
  Streams not in a tick are not stepped at all, so their conv buffers and KV
  windows do not move.
- A tick starts when every stream that can run has a chunk ready, or when
  `max_batch_delay_ms` has passed since the oldest ready chunk.

- Under a backlog (no open stream waiting for input) the next tick is
  staged and dispatched while the current one is still on the device, so
  host work (batching chunks, routing outputs) overlaps device work; each
  stream then has up to two chunks in flight, delivered in order.

Ticks run on a dedicated thread; transports talk to `Session`s on their
asyncio loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import itertools
import logging
import operator
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from server.errors import DeadlineExceeded, ModelLoadError, ResourceExhausted, Unavailable
from server.model import ModelInfo, ServableModel, round_up
from server.programs import LayerProgram, TickPrograms, export_in_memory
from server.session import Session
from server.settings import knob
from server.stats import StreamStats, TickStats

log = logging.getLogger("sl-serve")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Runtime knobs of one model: `sl-serve` flags, `[defaults]` and
    `[models.NAME]` keys of a config file (all generated from these fields)."""

    max_streams: int = knob(32, "concurrent streams per model (device state slots)", positive=True)
    chunk_blocks: int = knob(
        1, "blocks per stream per tick: chunk = chunk_blocks * block_size frames", positive=True
    )
    max_batch_delay_ms: float = knob(
        5.0, "longest a ready chunk waits for other streams before a tick starts"
    )
    idle_timeout_s: float = knob(
        30.0, "a stream that sends nothing this long ends with DEADLINE_EXCEEDED", positive=True
    )
    max_chunk_frames: int = knob(
        16000 * 10, "largest single chunk a client may send, in frames", positive=True
    )
    max_buffered_frames: int = knob(
        16000 * 30, "frames a stream may have buffered ahead of processing", positive=True
    )
    max_output_backlog: int = knob(
        64,
        "output messages queued for a client that is not reading; past this the stream is "
        "not scheduled (backpressure)",
        positive=True,
    )
    slow_consumer_timeout_s: float = knob(
        30.0, "a stream stuck on backpressure this long ends with RESOURCE_EXHAUSTED"
    )
    shard: bool = knob(True, "shard slots over all local devices of the default backend")
    buckets: tuple[int, ...] | None = knob(
        None,
        "batch sizes to compile (default: powers of two up to max_streams); fewer compile "
        "faster at the cost of padding small ticks",
    )
    device: str | None = knob(None, "pin the model to one device, e.g. cpu:0 or gpu:1")


def buckets_for(max_streams: int) -> list[int]:
    """Powers of two up to (and including one >=) max_streams."""
    out, b = [], 1
    while b < max_streams:
        out.append(b)
        b *= 2
    out.append(b)
    return out


class Scheduler:
    """Serves one model. `start()` compiles and starts ticking; see module doc."""

    def __init__(
        self,
        model: ServableModel,
        config: SchedulerConfig | None = None,
        stats_sink: Callable[[Any], None] | None = None,
    ) -> None:
        self.model = model
        self.config = config or SchedulerConfig()
        self.chunk_frames = self.config.chunk_blocks * model.block_size
        ratio = model.output_ratio
        if (self.chunk_frames * ratio).denominator != 1:
            raise ValueError(f"chunk of {self.chunk_frames} frames gives a fractional output.")
        self.out_chunk_frames = int(self.chunk_frames * ratio)
        self.info: ModelInfo = model.info(self.config.max_streams)
        self.buckets = sorted(set(self.config.buckets or buckets_for(self.config.max_streams)))
        if self.buckets[-1] < self.config.max_streams:
            raise ValueError(
                f"largest bucket {self.buckets[-1]} is below max_streams={self.config.max_streams}."
            )
        self.compile_seconds: dict[int, float] = {}
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self._sessions: dict[int, Session] = {}
        self._free_slots = list(range(self.config.max_streams - 1, -1, -1))
        self._stats_sink = stats_sink or (lambda _: None)
        self._thread: threading.Thread | None = None
        self._stopping = False
        # Set while a tick's outputs are routed: event loop -> [(queue, item)].
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] | None = None
        self.draining = False
        self.ready = False
        self.ticks = 0
        # Ticks dispatched while the one before was still on the device.
        self.look_ahead_ticks = 0
        self._last_ready = 0.0
        self._free_staging: dict[int, list[_Staging]] = {}
        self._next_reap = 0.0

    # Lifecycle ---------------------------------------------------------------

    def start(self, ready_first: bool = False) -> None:
        """Allocates device state, compiles every bucket (with `ready_first`:
        those it needs to serve any batch, see `compile_remaining`), starts
        the tick thread."""
        self._build_state()
        self._compile(ready_first)
        if self._stopping:  # stopped while compiling: never start ticking
            return
        self._warm_up()
        # What exists now (JAX, Flax, the compiled programs: hundreds of
        # thousands of objects) lives as long as the process. Freezing it
        # keeps the collector's full passes from walking it: unfrozen, they
        # stalled ticks for 50 ms.
        gc.freeze()
        self._thread = threading.Thread(
            target=self._run, name=f"tick-{self.model.name}", daemon=True
        )
        self._thread.start()
        self.ready = True

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for session in list(self._sessions.values()):
                session._finish_locked(Unavailable("the server is shutting down."), "error")
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    @property
    def active_streams(self) -> int:
        with self.lock:
            return len(self._sessions)

    # Streams -----------------------------------------------------------------

    def open_stream(
        self, loop: asyncio.AbstractEventLoop | None = None, stream_id: str | None = None
    ) -> Session:
        """Admits a stream or refuses at once (no free slot, draining)."""
        loop = loop or asyncio.get_running_loop()
        with self._cond:
            if self.draining or self._stopping:
                self._stats_sink(StreamStats(self.model.name, "rejected"))
                raise Unavailable("the server is draining; reconnect to another replica.")
            if not self.ready:
                self._stats_sink(StreamStats(self.model.name, "rejected"))
                raise Unavailable(
                    f"model {self.model.name!r} is still compiling; retry when /readyz is 200."
                )
            if not self._free_slots:
                self._stats_sink(StreamStats(self.model.name, "rejected"))
                raise ResourceExhausted(
                    f"model {self.model.name!r} is serving its maximum of "
                    f"{self.config.max_streams} streams; retry later or use another replica."
                )
            slot = self._free_slots.pop()
            session = Session(self, slot, stream_id or uuid.uuid4().hex, loop)
            self._sessions[slot] = session
            self._cond.notify_all()
            return session

    def _release(self, session: Session) -> None:
        """Frees a finished session's slot (called under the lock)."""
        if self._sessions.get(session.slot) is session:
            del self._sessions[session.slot]
            self._free_slots.append(session.slot)
            self._stats_sink(
                StreamStats(
                    self.model.name,
                    session.outcome or "ok",
                    frames_in=session.frames_in,
                    frames_out=session.frames_out,
                    first_output_seconds=(
                        None
                        if session.first_output_at is None
                        else session.first_output_at - session.opened_at
                    ),
                )
            )
            self._cond.notify_all()

    # Device state and ticks --------------------------------------------------

    def _build_state(self) -> None:
        devices = jax.local_devices()
        if self.config.device:
            devices = [parse_device(self.config.device)]
            self.model.variables = jax.device_put(self.model.variables, devices[0])
        n_dev = len(devices) if self.config.shard else 1
        self._sharded = n_dev > 1
        program = self.model.program
        if isinstance(program, LayerProgram):
            # Trace the layer code once, with a symbolic batch size, instead
            # of once per bucket: each bucket then traces only a call of the
            # exported step. demo-asr: 1.7 s once + 0.1 s a bucket instead of
            # 1.1 s a bucket; the compiled ticks are identical (same HLO
            # after inlining; outputs bit-equal, tick time equal).
            try:
                program = export_in_memory(program.layer, self.model.variables, program.input_spec)
            except ModelLoadError as e:  # a layer that needs a concrete batch size
                log.info("model %s: tracing per bucket (%s)", self.model.name, e)
        self.program = program
        init = lambda b: program.initial_state(self.model.variables, b)
        one, two = jax.eval_shape(lambda: init(1)), jax.eval_shape(lambda: init(2))
        self._batch_axes = jax.tree.map(_batch_axis, one, two)
        # Rows divisible by the device count. Buckets are padded with an
        # out-of-range slot id: its gather fills zeros and its scatter is
        # dropped, so no scratch row is needed and a full tick (every slot)
        # steps the donated state as is, without copying rows out and back.
        self.rows = round_up(self.config.max_streams, n_dev)
        self.padding_slot = self.rows
        self._init_one = jax.tree.map(jnp.asarray, init(1))
        self._state_sharding: Any = None
        if n_dev == 1 and self.config.device:
            single = jax.sharding.SingleDeviceSharding(devices[0])
            self._state_sharding = jax.tree.map(lambda _: single, self._batch_axes)
        if n_dev > 1:
            mesh = Mesh(np.array(devices[:n_dev]), ("slots",))
            self._state_sharding = jax.tree.map(
                lambda ax: NamedSharding(mesh, PartitionSpec(*([None] * ax), "slots")),
                self._batch_axes,
            )
        # The state and the variables cross every device call as flat lists
        # of leaves: flattening their nested dicts on each call cost a
        # quarter of the call's host time.
        self._state_def = jax.tree.structure(one)
        if self._state_sharding is not None:
            self._state_sharding = jax.tree.leaves(self._state_sharding)
        self._var_def = jax.tree.structure(self.model.variables)
        rows = self.rows
        self._make_state = jax.jit(
            lambda: jax.tree.leaves(
                jax.tree.map(
                    lambda a, ax: jnp.repeat(a, rows, axis=ax), self._init_one, self._batch_axes
                )
            ),
            out_shardings=self._state_sharding,
        )
        # Leaves of the state pytree, in `self._state_def` order.
        self.state: list[jax.Array] = self._make_state()

    def _tick_fns(self) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
        """(partial tick, full tick, reset one slot) on flat leaves, all pure
        functions of the state so jit can donate it and update in place."""
        program, axes, init_one = self.program, self._batch_axes, self._init_one
        n = self.config.max_streams

        frame_index = jnp.arange(self.chunk_frames, dtype=jnp.int32)

        def step(variables, state, x, lengths):  # type: ignore[no-untyped-def]
            # A row's valid frames are always a prefix of the chunk (the
            # client's frames, then the invalid tail), so the mask is built
            # here from per-row lengths instead of sent with every tick.
            mask = frame_index[None, :] < lengths[:, None]
            # Sessions zero every invalid frame (chunk tails, flush, padding
            # rows): the program steps x as a MaskedSequence.
            return program.step(variables, state, x, mask)

        def partial_tick(variables, state, slot_ids, x, lengths):  # type: ignore[no-untyped-def]
            # Some slots: gather their rows, step, scatter back. Rows not in
            # the tick are not stepped at all (their buffers must not move).
            gathered = jax.tree.map(
                lambda a, ax: jnp.take(a, slot_ids, axis=ax, mode="fill", fill_value=0),
                state,
                axes,
            )
            new, y, y_mask = step(variables, gathered, x, lengths)
            state = jax.tree.map(
                lambda a, n, ax: a.at[(slice(None),) * ax + (slot_ids,)].set(n, mode="drop"),
                state,
                new,
                axes,
            )
            return state, y, y_mask

        def full_tick(variables, state, x, lengths):  # type: ignore[no-untyped-def]
            # Every slot, in slot order (full occupancy): no gather or scatter.
            # With rows == max_streams (one device, or a multiple of the
            # device count) this is the bare step on the donated state.
            if self.rows == n:
                return step(variables, state, x, lengths)
            rows = jax.tree.map(lambda a, ax: jax.lax.slice_in_dim(a, 0, n, axis=ax), state, axes)
            new, y, y_mask = step(variables, rows, x, lengths)
            state = jax.tree.map(
                lambda a, r, ax: jax.lax.dynamic_update_slice_in_dim(a, r, 0, axis=ax),
                state,
                new,
                axes,
            )
            return state, y, y_mask

        def reset_slot(state, slot):  # type: ignore[no-untyped-def]
            # A new stream starts from the initial state: one in-place row
            # write per stream, rather than a select in every tick.
            return jax.tree.map(
                lambda a, i, ax: jax.lax.dynamic_update_slice_in_dim(a, i, slot, axis=ax),
                state,
                init_one,
                axes,
            )

        var_def, state_def = self._var_def, self._state_def

        def on_leaves(tick: Callable[..., Any]) -> Callable[..., Any]:
            # (variables, state, ...) -> (variable leaves, state leaves, ...)
            def wrapped(var_leaves, state_leaves, *inputs):  # type: ignore[no-untyped-def]
                variables = jax.tree.unflatten(var_def, var_leaves)
                state = jax.tree.unflatten(state_def, state_leaves)
                new, y, y_mask = tick(variables, state, *inputs)
                return jax.tree.leaves(new), y, y_mask

            return wrapped

        def reset_leaves(state_leaves, slot):  # type: ignore[no-untyped-def]
            state = jax.tree.unflatten(state_def, state_leaves)
            return jax.tree.leaves(reset_slot(state, slot))

        return on_leaves(partial_tick), on_leaves(full_tick), reset_leaves

    def _compile(self, ready_first: bool = False) -> None:
        """Compiles the tick programs (`server.programs.TickPrograms`): all of
        them, or with `ready_first` only those the model needs to serve any
        batch; `compile_remaining()` adds the others later."""
        spec = self.model.input_spec
        out = (self._state_sharding, None, None) if self._state_sharding else None
        partial_tick, full_tick, reset_slot = self._tick_fns()
        self._var_leaves = jax.tree.leaves(self.model.variables)
        x_spec = lambda b: jax.ShapeDtypeStruct((b, self.chunk_frames, *spec.shape), spec.dtype)
        lengths_spec = lambda b: jax.ShapeDtypeStruct((b,), jnp.int32)
        partial = jax.jit(partial_tick, donate_argnums=(1,), out_shardings=out)
        n = self.config.max_streams
        full = jax.jit(full_tick, donate_argnums=(1,), out_shardings=out)
        reset = jax.jit(reset_slot, donate_argnums=(0,), out_shardings=self._state_sharding)
        slot_ids = lambda b: jax.ShapeDtypeStruct((b,), jnp.int32)
        # Lowering reads only shapes and shardings: a later lowering may get
        # these arrays after a tick has donated them.
        v, st = self._var_leaves, self.state
        lowerers: dict[Any, Callable[[], Any]] = {
            b: functools.partial(partial.lower, v, st, slot_ids(b), x_spec(b), lengths_spec(b))
            for b in self.buckets
        }
        lowerers["full"] = lambda: full.lower(v, st, x_spec(n), lengths_spec(n))
        lowerers["reset"] = lambda: reset.lower(st, jax.ShapeDtypeStruct((), jnp.int32))
        self._programs = TickPrograms(lowerers, self.buckets, {}, lambda: self._stopping)
        self._compiled = self._programs.compiled
        first = self._programs.first_keys() if ready_first else self._programs.pending()
        self._programs.compile(first)
        if self._stopping:
            return
        self._full, self._reset = self._compiled["full"], self._compiled["reset"]
        # The metric's "full" bucket counts the full tick and the reset together.
        # Replaced, never updated in place: /metrics reads it from another thread.
        seconds = dict(self._programs.seconds)
        seconds["full"] += seconds.pop("reset", 0.0)
        self.compile_seconds = seconds

    def compile_remaining(self) -> None:
        """Compiles the buckets `start(ready_first=True)` left out, one at a
        time, each warmed up on a scratch state before ticks may use it."""

        def warm_up(bucket: Any, compiled: Any) -> None:
            spec = self.model.input_spec
            x = np.zeros((bucket, self.chunk_frames, *spec.shape), spec.dtype)
            slots = np.full((bucket,), self.padding_slot, np.int32)
            lengths = np.zeros((bucket,), np.int32)
            jax.block_until_ready(compiled(self._var_leaves, self._make_state(), slots, x, lengths))
            self.compile_seconds = {**self.compile_seconds, bucket: self._programs.seconds[bucket]}

        self._programs.compile(self._programs.pending(), warm_up=warm_up, workers=1)

    def _warm_up(self) -> None:
        """Runs every compiled program once: first executions allocate the
        runtime's buffers and took up to 100 ms, which the first streams
        after start-up paid as latency.

        The state may change: partial ticks here use only the padding slot
        (gather fills zeros, scatter is dropped), but the full tick steps
        every row. That is harmless because no stream is active yet and every
        new stream resets its slot before its first step.
        """
        spec = self.model.input_spec
        full = np.arange(self.config.max_streams, dtype=np.int32)
        padding = [
            np.full((b,), self.padding_slot, np.int32) for b in self._compiled if b in self.buckets
        ]
        for slots in [*padding, full]:
            b = slots.shape[0]
            x = np.zeros((b, self.chunk_frames, *spec.shape), spec.dtype)
            self.run_tick(slots, x, np.zeros((b,), np.int32))
        self.reset_slots([0])
        jax.block_until_ready(self.state)

    def reset_slots(self, slots: list[int]) -> None:
        """Puts new streams' slots back to the initial state (tick thread only)."""
        for slot in slots:
            self.state = self._reset(self.state, np.int32(slot))

    def dispatch_tick(self, slot_ids: np.ndarray, x: np.ndarray, lengths: np.ndarray) -> Any:
        """Starts one device call and returns its (not yet ready) outputs.
        `slot_ids` are sorted and padded to a bucket with an out-of-range
        slot. The new state is chained on the device, so a later tick may be
        dispatched before this one's outputs are fetched."""
        n = self.config.max_streams
        if len(slot_ids) == n and slot_ids[0] == 0 and slot_ids[-1] == n - 1:
            self.state, y, y_mask = self._full(self._var_leaves, self.state, x, lengths)
        else:
            compiled = self._compiled[slot_ids.shape[0]]
            self.state, y, y_mask = compiled(self._var_leaves, self.state, slot_ids, x, lengths)
        return y, y_mask

    def run_tick(
        self, slot_ids: np.ndarray, x: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One device call, waited for; returns host outputs. For benchmarks."""
        y, y_mask = self.dispatch_tick(slot_ids, x, lengths)
        return np.asarray(y), np.asarray(y_mask)

    # The tick loop -----------------------------------------------------------

    def _run(self) -> None:
        """Stage, dispatch, deliver, with one tick of look-ahead: while tick N
        runs on the device, the host stages and dispatches N+1 (if its chunks
        are already there) and only then fetches and routes N's outputs. So
        a backlog keeps the device busy while the host does its part."""
        pending: _Tick | None = None
        while True:
            tick = None
            with self._cond:
                batch = self._wait_for_batch(look_ahead=pending is not None)
                if batch is None and pending is None:
                    return
                if batch:
                    tick = self._stage(batch)
                    self.look_ahead_ticks += pending is not None
            if tick is not None:
                self._dispatch(tick, device_idle=pending is None)
            if pending is not None:
                self._complete(pending)
            pending = tick

    def _stage(self, batch: list[Session]) -> _Tick:
        """Takes one chunk from each stream (under the lock) into staging arrays."""
        started_at = time.monotonic()
        host_start = time.perf_counter()
        waits = tuple(started_at - (s.ready_since or started_at) for s in batch)
        # Slot order lets a full-occupancy tick step rows in place.
        batch.sort(key=_slot_of)
        n = len(batch)
        full = n == self.config.max_streams
        bucket = n if full else self._programs.bucket_for(n)
        buffers = self._staging(bucket)
        x, slots, taken = buffers.x, buffers.slots, buffers.taken
        new_streams = []
        for i, session in enumerate(batch):
            taken[i] = session._pop_chunk(x[i])
            slots[i] = session.slot
            if session.reset_pending:
                new_streams.append(session.slot)
                session.reset_pending = False
        if n < bucket:  # padding rows: no stream, all invalid zeros
            x[n:] = 0
            taken[n:] = 0
            slots[n:] = self.padding_slot
        tick = _Tick(batch, bucket, buffers, new_streams, started_at, waits, int(taken.sum()))
        tick.host_seconds = time.perf_counter() - host_start
        return tick

    def _staging(self, bucket: int) -> _Staging:
        """Host arrays for one tick's inputs: reused once the tick that held
        them is delivered, because until the device call has finished the
        runtime may still read them (in place, on CPU)."""
        free = self._free_staging.setdefault(bucket, [])
        if free:
            return free.pop()
        spec = self.model.input_spec
        return _Staging(
            x=aligned_zeros((bucket, self.chunk_frames, *spec.shape), spec.dtype),
            slots=np.full((bucket,), self.padding_slot, np.int32),
            taken=np.zeros((bucket,), np.int32),
        )

    def _dispatch(self, tick: _Tick, device_idle: bool = False) -> None:
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
            self.reset_slots(tick.new_streams)
            staged = tick.staged
            tick.outputs = self.dispatch_tick(staged.slots, staged.x, staged.taken)
        except Exception as e:  # a device failure ends these streams, not the server
            tick.error = e
            self._recover_state(e)
        tick.dispatched = time.perf_counter()
        tick.dispatch_seconds = tick.dispatched - start

    def _recover_state(self, error: Exception) -> None:
        """After a failed device call: if the donated state is gone, every
        stream's state is lost. Those streams end with the error, and the
        slots start over from a fresh state so the server keeps serving."""
        if not any(leaf.is_deleted() for leaf in self.state):
            return
        self.state = self._make_state()
        with self._cond:
            for session in list(self._sessions.values()):
                session._finish_locked(
                    ResourceExhausted(f"device step failed; stream state lost: {error}"), "error"
                )
            self._cond.notify_all()

    def _complete(self, tick: _Tick) -> None:
        """Waits for a dispatched tick's outputs and routes them to streams."""
        try:
            if tick.error is not None:
                raise tick.error
            y, y_mask = (np.asarray(a) for a in tick.outputs)
            # The device call is over: its inputs may be overwritten. Not so
            # with slots sharded over several devices: each device runs its
            # own program and may still read its (aliased, on CPU) slice of
            # the inputs after the outputs are complete; reusing the buffers
            # corrupted 1 run in 8 of tests/server/sharded_check.py. Those
            # ticks stage into fresh buffers.
            if not self._sharded:
                self._free_staging[tick.bucket].append(tick.staged)
        except Exception as e:
            with self._cond:
                for session in tick.batch:
                    # This tick's chunk only: a later tick may hold the next.
                    session._in_flight.popleft()
                    if not session.done:
                        session._finish_locked(
                            ResourceExhausted(f"device step failed: {e}"), "error"
                        )
                self._cond.notify_all()
            return
        ready = time.perf_counter()
        # Device time: from when the device could start it (dispatched, and
        # the tick before it done) until its outputs were on the host.
        device_seconds = ready - max(tick.dispatched, self._last_ready)
        idle_seconds = max(tick.dispatched - self._last_ready, 0.0) if self._last_ready else 0.0
        self._last_ready = ready
        # Rows with an invalid frame need a boolean gather; the rest do not.
        gather = (~y_mask.all(axis=1)).tolist()
        with self._cond:
            # Collect every stream's outputs, then wake each event loop
            # once: a thread-safe call per output costs a syscall each.
            self._outbox = {}
            delivered = 0
            for i, session in enumerate(tick.batch):
                delivered += session._deliver(y[i], y_mask[i] if gather[i] else None)
            outbox, self._outbox = self._outbox, None
            # Still under the lock: anything a transport queues next (an
            # `Ended` after `end()`) must follow these outputs.
            for loop, items in outbox.items():
                loop.call_soon_threadsafe(_put_all, items)
            self.ticks += 1
            self._cond.notify_all()
        tick.host_seconds += time.perf_counter() - ready
        self._stats_sink(
            TickStats(
                self.model.name,
                batch_size=len(tick.batch),
                bucket=tick.bucket,
                started_at=tick.started_at,
                tick_seconds=device_seconds,
                host_seconds=tick.host_seconds,
                dispatch_seconds=tick.dispatch_seconds,
                queue_wait_seconds=tick.waits,
                input_frames=tick.input_frames,
                output_frames=delivered,
                device_idle_seconds=idle_seconds,
            )
        )

    def _wait_for_batch(self, look_ahead: bool = False) -> list[Session] | None:
        """Under the lock: the streams of the next tick, or None to stop.

        Blocks until a tick should start. With `look_ahead` (a tick is on the
        device) it never blocks and returns a batch only if no open stream is
        still waiting for input: that is a backlog, and dispatching now keeps
        the device busy. Partial batches wait for the tick in flight to be
        delivered instead, so they are not split into many small ticks.
        """
        delay = self.config.max_batch_delay_ms / 1000.0
        while True:
            if self._stopping:
                return None
            now = time.monotonic()
            timeout = self._reap(now)
            # Every open stream has a slot, so all ready ones fit in one tick.
            ready = []
            # Streams that could still join this tick: open ones waiting on
            # their client, not those blocked on output backpressure.
            waiting = False
            for s in self._sessions.values():
                if s.ready_since is not None:
                    ready.append(s)
                elif not waiting:
                    waiting = s.waiting_for_input
            if look_ahead:
                return ready if ready and not waiting else []
            if ready:
                oldest = min(s.ready_since for s in ready)  # type: ignore[type-var]
                if not waiting or now - oldest >= delay:
                    return ready
                timeout = min(timeout, oldest + delay - now)
            self._cond.wait(timeout=max(timeout, 0.0005))

    def _reap(self, now: float) -> float:
        """Ends idle and stuck streams; returns seconds until the next may
        expire. Walks the streams at most every `_REAP_INTERVAL_S`: timeouts
        are seconds long, and this runs before every tick."""
        if now < self._next_reap:
            return self._next_reap - now
        next_check = self._reap_all(now)
        self._next_reap = now + min(next_check, _REAP_INTERVAL_S)
        return next_check

    def _reap_all(self, now: float) -> float:
        cfg = self.config
        next_check = 1.0
        for session in list(self._sessions.values()):
            if session.in_flight or session.done:
                continue
            if session.backlog >= cfg.max_output_backlog:
                limit = cfg.slow_consumer_timeout_s
                error: Any = ResourceExhausted(
                    f"the client did not read its outputs for {limit:g} s; stream ended."
                )
                outcome = "error"
                since = session.last_read
            elif not session.ending:
                limit = cfg.idle_timeout_s
                error = DeadlineExceeded(
                    f"no input for {limit:g} s (idle timeout); stream ended. Send chunks more "
                    f"often or end the stream."
                )
                outcome = "timeout"
                since = session.last_activity
            else:
                continue
            left = since + limit - now
            if left <= 0:
                session._finish_locked(error, outcome)
            else:
                next_check = min(next_check, left)
        return next_check

    def stream_ids(self) -> list[str]:
        with self.lock:
            return [s.stream_id for s in self._sessions.values()]


_slot_of = operator.attrgetter("slot")


def parse_device(spec: str) -> jax.Device:
    """`"cpu:0"`, `"gpu:1"` (or `"cuda:1"`) -> a local device."""
    platform, _, index = spec.partition(":")
    platform = {"cuda": "gpu"}.get(platform, platform)
    try:
        devices = jax.local_devices(backend=platform)
        return devices[int(index or 0)]
    except (RuntimeError, ValueError, IndexError) as e:
        raise ValueError(
            f"device {spec!r} is not available here; local devices: {jax.local_devices()}."
        ) from e


# Longest a stream may outlive its idle or slow-consumer timeout.
_REAP_INTERVAL_S = 0.05

# XLA's CPU runtime reads a host array in place only if it is aligned to
# 64 bytes; numpy aligns large arrays to 16 or 32, which costs a copy of
# every tick's input on a runtime thread that competes with the step.
_XLA_ALIGN = 64


def aligned_zeros(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """`np.zeros`, with the data aligned so the CPU runtime need not copy it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + _XLA_ALIGN, np.uint8)
    start = -raw.ctypes.data % _XLA_ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _batch_axis(one: jax.ShapeDtypeStruct, two: jax.ShapeDtypeStruct) -> int:
    for axis, (a, b) in enumerate(itertools.zip_longest(one.shape, two.shape)):
        if a != b:
            return axis
    raise ValueError(
        f"a state leaf of shape {one.shape} does not grow with batch size; the model's state "
        f"is not batch-major, so streams cannot share a tick."
    )


@dataclasses.dataclass
class _Staging:
    """Host input arrays of one tick, padded to its bucket."""

    x: np.ndarray  # [bucket, chunk, *input_shape]
    slots: np.ndarray  # [bucket] slot ids; padding rows hold an out-of-range id
    taken: np.ndarray  # [bucket] valid frames per row: a prefix of each


@dataclasses.dataclass
class _Tick:
    """One tick from staging to delivery."""

    batch: list[Session]
    bucket: int
    staged: _Staging
    new_streams: list[int]
    started_at: float
    waits: tuple[float, ...]
    # Valid input frames staged (for the stats).
    input_frames: int
    host_seconds: float = 0.0
    dispatch_seconds: float = 0.0
    dispatched: float = 0.0
    outputs: Any = None
    error: Exception | None = None


_sched_yield: Callable[[], None] = getattr(os, "sched_yield", lambda: None)  # POSIX only


def _put_all(items: list[tuple[Any, Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
