"""The `Scheduler`: one model's slot table behind a small interface.

    add(stream_id) / resume   admit a stream (or continue a moved one) into a free slot
    push / end / cancel       a stream's input and lifecycle
    schedule(now, ...)        the next tick's streams, staged; or how long to wait
    update_from_output(...)   route a tick's outputs to its streams
    begin_moves / hand_off    migration: stop ticking, then end each with its state
    snapshot()                a `SchedulerStats`

It is plain single-threaded code: no jax, no locks, no clock (callers pass
`now`). The engine calls it under its lock from the tick thread and the
doors' loops; tests drive it directly with a fake device. The rules it
applies (when to tick, who timed out, whom to admit) are in `policy`.

Methods that end streams return deliveries: `(stream, item)` pairs the
engine routes to each stream's event loop, in order.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from server.errors import DeadlineExceeded, ResourceExhausted, StreamError
from server.resume import StreamSnapshot
from server.runtime import policy
from server.runtime.config import SchedulerConfig
from server.runtime.stream import CANCELLED, Phase, Stream
from server.stats import SchedulerStats, StreamStats

Delivery = tuple[Stream, Any]

# Longest a stream may outlive its idle or slow-consumer timeout: timeouts
# are seconds long, and the check walks every stream.
_EXPIRE_INTERVAL_S = 0.05
# How long one pass over the streams serves admission (`Scheduler._senders`).
SENDERS_TTL_S = 0.05


@dataclasses.dataclass
class Staging:
    """Host input arrays of one tick, padded to its bucket."""

    x: np.ndarray  # [bucket, chunk, *input_shape]
    slots: np.ndarray  # [bucket] slot ids; padding rows hold an out-of-range id
    taken: np.ndarray  # [bucket] valid frames per row: a prefix of each
    # A slot id no stream has (past the device's rows): its gather reads
    # zeros and its scatter is dropped.
    padding_slot: int


@dataclasses.dataclass
class Tick:
    """One tick from staging to delivery."""

    streams: list[Stream]
    bucket: int
    staged: Staging
    # Slots of streams stepped for the first time: reset to the initial state.
    new_slots: list[int]
    started_at: float
    waits: tuple[float, ...]
    input_frames: int  # valid input frames staged
    # Resumed streams stepped for the first time: (slot, state row) to write,
    # at most `restore_bytes_per_tick` of rows (or one row) a tick.
    restores: list[tuple[int, tuple[np.ndarray, ...]]] = dataclasses.field(default_factory=list)
    # Set by the engine on its way through the device.
    host_seconds: float = 0.0
    dispatch_seconds: float = 0.0
    dispatched: float = 0.0
    # Holds chunks on time (not only resent audio): resume tokens wait for
    # it (counted only with resume keys).
    on_time: bool = False
    outputs: Any = None
    error: Exception | None = None


@dataclasses.dataclass
class SchedulerOutput:
    """What `schedule` decided: a staged tick, or none and how long to wait."""

    tick: Tick | None
    wait_s: float
    deliveries: list[Delivery]
    # Moving streams with nothing in flight: the engine hands them off now.
    moves: list[Stream] = dataclasses.field(default_factory=list)


class Scheduler:
    """The slot table of one model; see the module docstring."""

    def __init__(
        self,
        name: str,
        config: SchedulerConfig,
        *,
        chunk_frames: int,
        input_latency: int,
        output_latency: int,
        record: Callable[[Any], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.chunk_frames = chunk_frames
        self.input_latency = input_latency
        self.output_latency = output_latency
        self.buckets = config.tick_buckets()
        self._record = record or (lambda _: None)
        self._streams: dict[int, Stream] = {}
        self._free_slots = list(range(config.max_streams - 1, -1, -1))
        # Set by the engine: the programs are compiled / the server drains.
        self.accepting = False
        self.draining = False
        self.ticks = 0
        self.look_ahead_ticks = 0
        self.tick_times = policy.TickTimes()
        self.late = policy.LateMeter()
        self.steps = policy.StepRate()
        self._next_expiry = 0.0
        self._delay_s = config.max_batch_delay_ms / 1000.0
        self._budget_s = config.latency_budget_ms / 1000.0
        # When a stream last resumed here: until `RESEND_S` after it, ticks
        # look out for resent audio (`_resent_as_padding`).
        self._last_resumed = -math.inf
        # `_senders`' last pass over the streams, and when it was.
        self._sender_periods: list[float] = []
        self._sender_count = 0
        self._senders_at = -math.inf

    # Streams ---------------------------------------------------------------------

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def streams(self) -> list[Stream]:
        return list(self._streams.values())

    def add(self, stream_id: str, now: float) -> Stream:
        """Admits a stream into a free slot, or raises the `StreamError` that
        says why not (draining, compiling, full, over capacity)."""
        late, total = self.late.counts(now)
        self.steps.update(policy.overloaded(late, total))
        refusal = policy.admission_refusal(
            self.name,
            accepting=self.accepting,
            draining=self.draining,
            open_streams=len(self._streams),
            max_streams=self.config.max_streams,
            late=late,
            total=total,
            budget_ms=self.config.latency_budget_ms,
            predicted=policy.predicted_overload(
                *self._senders(now),
                # Until the buckets have run, the warm-up's (idle) figures.
                self.tick_times.served() or self.tick_times.as_dict(),
                self.steps.capacity,
            ),
        )
        if refusal is not None:
            self._record(StreamStats(self.name, "rejected", reason=refusal.reason))
            raise refusal.error
        slot = self._free_slots.pop()
        stream = Stream(
            slot,
            stream_id,
            self.chunk_frames,
            self.output_latency,
            self.config.max_output_backlog,
            now,
        )
        self._streams[slot] = stream
        self._sender_count += 1  # counted so until the next pass
        return stream

    def _senders(self, now: float) -> tuple[list[float], int]:
        """What admission predicts the load from: the chunk periods of the
        streams still taking input (those that have one), and how many
        such streams there are.

        Ending streams are left out: they send nothing more, their flush
        is a tick or two, and their slots free soon after. Counted, a
        client's next utterance arriving while its last one flushed was
        refused: at 310 demo-asr streams, 20 of them flushing put the
        prediction 5% over a device that had 10% of its time free.

        One pass over the streams serves `SENDERS_TTL_S` of handshakes (a
        pass a handshake was O(streams) each, ~8% of an event loop taking
        a refused storm); streams admitted meanwhile are added to its count.
        """
        if not 0 <= now - self._senders_at <= SENDERS_TTL_S:
            periods: list[float] = []
            count = 0
            for stream in self._streams.values():
                if stream.phase is Phase.OPEN:
                    count += 1
                    if stream.period is not None:
                        periods.append(stream.period)
            self._sender_periods, self._sender_count = periods, count
            self._senders_at = now
        return self._sender_periods, self._sender_count

    def resume(
        self, stream_id: str, now: float, snapshot: StreamSnapshot
    ) -> tuple[Stream, list[Delivery]]:
        """`add`, continuing the verified `snapshot` of a stream another
        server handed off (its state row is written into the slot before its
        first step). Also returns the deliveries of a stream already done."""
        stream = self.add(stream_id, now)
        self._last_resumed = now
        out: list[Delivery] = []
        if stream.restore(snapshot, now):
            self._finish(stream, stream.ended(), "ok", out)
        return stream, out

    def push(self, stream: Stream, x: np.ndarray, now: float) -> bool:
        """Buffers a stream's validated input; True if a chunk became ready
        (only then can a tick start sooner: wake the tick loop)."""
        return stream.push(x, now, self.config.max_buffered_frames)

    def end(self, stream: Stream, now: float) -> list[Delivery]:
        """The client's end of input; a stream with nothing left ends at once."""
        out: list[Delivery] = []
        if stream.end(now, self.input_latency):
            self._finish(stream, stream.ended(), "ok", out)
        return out

    def cancel(self, stream: Stream, error: StreamError | None, outcome: str) -> list[Delivery]:
        """Ends a stream now: with `error` (raised by its `outputs()`), or
        quietly (None: the client left). Frees its slot at once."""
        out: list[Delivery] = []
        if stream.phase is not Phase.DONE:
            self._finish(stream, CANCELLED if error is None else error, outcome, out)
        return out

    def begin_moves(self) -> int:
        """The server drains with migration on: no stream ticks again, and
        each one moves once its ticks in flight are delivered (`schedule`
        returns it in `moves`). Returns the streams that will move."""
        for stream in self._streams.values():
            stream.moving = True
            stream.ready_since = None
        return len(self._streams)

    def hand_off(self, stream: Stream, item: Any) -> list[Delivery]:
        """Ends a moved stream with its `Handoff` item and frees its slot."""
        out: list[Delivery] = []
        if stream.phase is not Phase.DONE:
            self._finish(stream, item, "moved", out)
        return out

    # Ticks -----------------------------------------------------------------------

    def schedule(
        self,
        now: float,
        device_busy: bool,
        staging: Callable[[int], Staging],
        in_flight: bool | None = None,
    ) -> SchedulerOutput:
        """Ends timed-out streams, then decides on the next tick: its streams
        with one chunk each staged into `staging(bucket)`, or how long to wait
        (a stream becoming ready should wake the caller sooner).
        `device_busy`: plan as if the device had work for a while yet;
        `in_flight`: a tick is on the device (default: `device_busy`); a
        tick staged then is a look-ahead tick."""
        deliveries: list[Delivery] = []
        wait_s = self._expire(now, deliveries)
        ready: list[Stream] = []
        joinable = 0
        expected: list[float] = []
        moves: list[Stream] = []
        # Every open stream, every call (several a tick). The common case is
        # tested first and inline: a stream open and short of a chunk, waiting
        # for its client (never `blocked`, which needs a chunk). With 400
        # streams a call took 150 us through properties, 68 us with this test
        # as one, 38 us inline.
        chunk, open_ = self.chunk_frames, Phase.OPEN
        for s in self._streams.values():
            if s.moving:
                if not s.in_flight:
                    moves.append(s)
            elif s.ready_since is not None:
                ready.append(s)
            elif s.phase is open_ and s.buffered < chunk:
                joinable += 1
                eta = s.expected_at
                if eta is not None:
                    expected.append(eta)
            elif s.blocked:
                # Its client may have read since (see `Stream.mark_read`).
                if s.update_ready(now):
                    ready.append(s)
        if ready:
            ready, hold = self._resent_as_padding(ready, now, expected)
            if hold is not None:
                return SchedulerOutput(None, min(wait_s, hold), deliveries, moves)
            ready = self._within_restore_budget(ready)
            size = policy.tick_size(
                len(ready), self.buckets, self.config.max_streams, self.tick_times.estimate
            )
            if size < len(ready):
                # A filled bucket: on-time streams first, then the longest
                # waiting; a resumed stream's resent audio after the
                # streams running here (`policy.tick_priority`).
                budget = self._budget_s
                ready.sort(
                    key=lambda s: policy.tick_priority(
                        s.ready_since, s.ready_by_input, s.resumed_at, now, budget
                    )
                )
                ready = ready[:size]
        oldest = min(s.ready_since for s in ready) if ready else None  # type: ignore[type-var]
        bucket = self._bucket(len(ready)) if ready else 0
        plan = policy.plan_tick(
            now,
            oldest_ready=oldest,
            ready=len(ready),
            joinable=joinable,
            expected=expected,
            device_busy=device_busy,
            delay_s=self._delay_s,
            budget_s=policy.planning_budget(self._budget_s),
            tick_latency=self._tick_latency,
        )
        if not plan.go:
            return SchedulerOutput(None, min(wait_s, plan.wait_s), deliveries, moves)
        tick = self._stage(ready, bucket, now, staging)
        self.look_ahead_ticks += device_busy if in_flight is None else in_flight
        return SchedulerOutput(tick, 0.0, deliveries, moves)

    def _resent_as_padding(
        self, ready: list[Stream], now: float, expected: list[float]
    ) -> tuple[list[Stream], float | None]:
        """`ready` less the resent audio that would make a tick of chunks on
        time bigger or slower: a resumed stream's chunk within its resend
        (`policy.resent_waits`) joins them only on a row their bucket pads
        anyway, and not if its state row is still to be written. Those wait
        for a tick of their own, right after. With 32 streams on time
        here and 60 resuming, a tick of 48 (bucket 64) with 8 rows to write
        ended 39 ms after it started, not 13: the 32's chunks missed a 50 ms
        budget. Resent audio is late already; a tick later costs it little.

        Resent audio alone goes in ticks of a filled bucket at most, and not
        while chunks on time are due before such a tick would end
        (`policy.resent_yields`: then the second value says how long to
        wait for them)."""
        if now - self._last_resumed >= policy.RESEND_S:
            return ready, None  # no stream is resending: the common case, at no cost
        budget = self._budget_s
        resent = [
            policy.resent_waits(s.ready_since, s.resumed_at, now, budget)  # type: ignore[arg-type]
            for s in ready
        ]
        others = [s for s, r in zip(ready, resent, strict=True) if not r]
        n_others = len(others)
        if n_others == len(ready) or not (n_others == 0 or any(s.ready_by_input for s in others)):
            return ready, None  # nobody's chunk is on time: nobody to hold back for
        if n_others == 0:
            # A short tick: 38 resumed streams in one tick of 64 held 32
            # chunks on time 20 ms, and their tick ended 62 ms after they
            # came in. Waiting for chunks due meanwhile: 32 chunks on time
            # that came in during a tick of 32 resumed streams waited for
            # it 15-25 ms while the cores were busy with the move.
            batch = sorted(ready, key=_ready_since)[: policy.MIN_FILLED_BUCKET]
            tick_end = now + self._tick_latency(len(batch))
            return batch, policy.resent_yields(now, expected, tick_end, self._delay_s)
        room = self._bucket(n_others) - n_others
        fill = sorted(
            (s for s, r in zip(ready, resent, strict=True) if r and s.restore_state is None),
            key=_ready_since,
        )[:room]
        return others + fill, None

    def _within_restore_budget(self, ready: list[Stream]) -> list[Stream]:
        """`ready` less the resumed streams whose state rows do not fit this
        tick's `restore_bytes_per_tick` (the longest waiting go first, at
        least one). Those stay ready, buffering input, and go in a later
        tick: a burst of resumed streams is written over several ticks
        instead of delaying one tick of every running stream."""
        restoring = [s for s in ready if s.restore_state is not None]
        if len(restoring) <= 1:
            return ready
        restoring.sort(key=_ready_since)
        n = policy.restores_within(
            (s.restore_bytes for s in restoring), self.config.restore_bytes_per_tick
        )
        if n == len(restoring):
            return ready
        held = set(restoring[n:])
        return [s for s in ready if s not in held]

    def _bucket(self, n: int) -> int:
        return policy.bucket_for(n, self.buckets, self.config.max_streams)

    def _tick_latency(self, n: int) -> float:
        """What a tick of `n` streams adds to their chunks' latency."""
        return self.tick_times.latency(self._bucket(n), self.steps.busy_share())

    def _stage(
        self, batch: list[Stream], bucket: int, now: float, staging: Callable[[int], Staging]
    ) -> Tick:
        """Takes one chunk from each stream into the staging arrays."""
        waits = tuple(now - s.ready_since for s in batch)  # type: ignore[operator]
        # Real-time chunks that waited longer than the whole budget before
        # their tick: the overload signal. Not "longer than the budget less
        # the tick": batching spends exactly that much waiting for company,
        # so with a 50 ms budget chunks that batching held to its limit
        # counted as late and 120 demo-asr streams (a third of capacity)
        # were refused. Past the whole budget only a device that cannot
        # keep up holds a chunk.
        realtime = [w for s, w in zip(batch, waits, strict=True) if s.ready_by_input]
        if realtime:
            late = sum(w > self._budget_s for w in realtime)
            self.late.observe(now, late, len(realtime))
        # Slot order lets a full-occupancy tick step rows in place.
        batch.sort(key=_slot_of)
        n = len(batch)
        staged = staging(bucket)
        x, slots, taken = staged.x, staged.slots, staged.taken
        new_slots = []
        restores = []
        for i, stream in enumerate(batch):
            if stream.needs_reset:
                new_slots.append(stream.slot)
            elif stream.restore_state is not None:
                restores.append((stream.slot, stream.restore_state))
            taken[i] = stream.take_chunk(x[i], now)
            slots[i] = stream.slot
        if n < bucket:  # padding rows: no stream, all invalid zeros
            x[n:] = 0
            taken[n:] = 0
            slots[n:] = staged.padding_slot
        tick = Tick(batch, bucket, staged, new_slots, now, waits, int(taken[:n].sum()))
        tick.restores = restores
        return tick

    def update_from_output(
        self,
        tick: Tick,
        y: np.ndarray,
        y_mask: np.ndarray,
        now: float,
        device_seconds: float,
    ) -> tuple[list[Delivery], int]:
        """Gives each stream of `tick` its outputs `y [bucket, out_chunk, *c]`;
        returns the deliveries and the valid output frames among them."""
        self.tick_times.observe(tick.bucket, device_seconds)
        self.steps.observe(now, len(tick.streams), device_seconds)
        # Rows with an invalid frame need a boolean gather; the rest do not.
        gather = (~y_mask.all(axis=1)).tolist()
        out: list[Delivery] = []
        frames = 0
        for i, stream in enumerate(tick.streams):
            output, final = stream.take_outputs(y[i], y_mask[i] if gather[i] else None, now)
            if output is not None:
                self._emit(stream, output, out)
                frames += output.frames.shape[0]
            if final:
                self._finish(stream, stream.ended(), "ok", out)
            else:
                stream.update_ready(now)
        self.ticks += 1
        return out, frames

    def fail_tick(self, tick: Tick, error: Exception) -> list[Delivery]:
        """A tick's device call failed: its streams end with the error."""
        out: list[Delivery] = []
        for stream in tick.streams:
            stream.in_flight.popleft()  # this tick's chunk only: a later one may hold the next
            if stream.phase is not Phase.DONE:
                failure = ResourceExhausted(f"device step failed: {error}")
                self._finish(stream, failure, "error", out)
        return out

    def fail_all(self, error: StreamError) -> list[Delivery]:
        """Ends every stream with `error` (stopping, or the device state lost)."""
        out: list[Delivery] = []
        for stream in list(self._streams.values()):
            self._finish(stream, error, "error", out)
        return out

    def snapshot(self, now: float) -> SchedulerStats:
        late, total = self.late.counts(now)
        return SchedulerStats(
            model=self.name,
            active_streams=len(self._streams),
            slots=self.config.max_streams,
            ready_streams=sum(s.ready_since is not None for s in self._streams.values()),
            ticks=self.ticks,
            look_ahead_ticks=self.look_ahead_ticks,
            recent_chunks=total,
            late_chunks=late,
            overloaded=policy.overloaded(late, total),
            tick_estimates=self.tick_times.as_dict(),
        )

    # Internals -------------------------------------------------------------------

    def _emit(self, stream: Stream, item: Any, out: list[Delivery]) -> None:
        stream.items_queued += 1
        out.append((stream, item))

    def _finish(self, stream: Stream, item: Any, outcome: str, out: list[Delivery]) -> None:
        """Ends a stream with its last item and frees its slot."""
        stream.finish(outcome)
        self._emit(stream, item, out)
        if self._streams.get(stream.slot) is not stream:
            return
        del self._streams[stream.slot]
        self._free_slots.append(stream.slot)
        if not self._streams:
            self.late.reset()  # no load left: what was late says nothing now
        first = stream.first_output_at
        self._record(
            StreamStats(
                self.name,
                outcome,
                frames_in=stream.frames_in,
                frames_out=stream.frames_out,
                first_output_seconds=None if first is None else first - stream.opened_at,
            )
        )

    def _expire(self, now: float, out: list[Delivery]) -> float:
        """Ends idle and stuck streams; returns seconds until the next may
        expire. Walks the streams at most every `_EXPIRE_INTERVAL_S`."""
        if now < self._next_expiry:
            return self._next_expiry - now
        cfg = self.config
        next_check = 1.0
        for stream in list(self._streams.values()):
            kind, left = policy.timeout_of(
                now,
                ending=stream.phase is Phase.ENDING,
                in_flight=len(stream.in_flight),
                backlog=stream.backlog,
                last_input=stream.last_input,
                last_read=stream.last_read,
                max_backlog=cfg.max_output_backlog,
                idle_timeout_s=cfg.idle_timeout_s,
                slow_consumer_timeout_s=cfg.slow_consumer_timeout_s,
            )
            if kind == "idle":
                error: StreamError = DeadlineExceeded(
                    f"no input for {cfg.idle_timeout_s:g} s (idle timeout); stream ended. Send "
                    "chunks more often or end the stream."
                )
                self._finish(stream, error, "timeout", out)
            elif kind == "slow_consumer":
                error = ResourceExhausted(
                    f"the client did not read its outputs for {cfg.slow_consumer_timeout_s:g} s; "
                    "stream ended."
                )
                self._finish(stream, error, "error", out)
            else:
                next_check = min(next_check, left)
        self._next_expiry = now + min(next_check, _EXPIRE_INTERVAL_S)
        return max(next_check, 0.0) if math.isfinite(next_check) else 1.0


_slot_of = operator.attrgetter("slot")
_ready_since = operator.attrgetter("ready_since")
