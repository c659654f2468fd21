"""One stream: its host state in the slot table (`Stream`) and the handle the
front doors hold (`StreamHandle`).

`Stream` buffers the client's samples to chunk boundaries, gives one chunk
per tick, drops the stream's first `output_latency` output frames, flushes
`input_latency` invalid frames at the end, and keeps only valid output
frames (with their offsets). So the frames a client receives equal
`layer()` on its whole input. Its lifecycle is one `Phase`.

Threading: a `Stream` has no lock, and each field one writer. The
`Scheduler` that owns it writes all but two (the engine calls it under its
lock, from the tick thread and from the doors' loops). The client's reads
are counted by its `StreamHandle` on the door's loop, in `items_read` and
`last_read` (`mark_read`), without the lock: a read is the most frequent
event of a stream, and the scheduler only needs the count, which it reads
as `backlog`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import numpy as np

from server.errors import InvalidArgument, ResourceExhausted, StreamError, Unavailable
from server.model import ModelInfo, prepare_input
from server.resume import ResumeTokenError, StreamSnapshot
from server.runtime import policy
from server.runtime.router import Mailbox
from server.segments import SegmentOptions, SpeechEvent, SpeechSegmenter

# Chunks of one stream that may be in dispatched ticks at once: the tick
# being delivered and the next one, already on the device (host work
# overlapping device work needs two).
MAX_IN_FLIGHT = 2

# Queued when a stream is cancelled: ends `outputs()` quietly (the client left).
CANCELLED = object()


class Phase(enum.Enum):
    """Where a stream is in its life; it only moves forward."""

    OPEN = "open"  # taking input
    ENDING = "ending"  # the client ended it: buffered input and latency flush
    DONE = "done"  # finished (ok, cancelled, error, timeout); its slot is free


# Not frozen: a frozen dataclass sets each field through object.__setattr__,
# and one Output is made per stream per tick on the tick thread.
@dataclasses.dataclass(slots=True)
class Output:
    """Valid output frames `[n, *output_shape]` (float32); `offset` is the index
    of the first one in the stream's output."""

    frames: np.ndarray
    offset: int
    # When the newest input frame these outputs needed reached the server
    # (time.monotonic); transports report chunk latency from it.
    received_at: float = 0.0


@dataclasses.dataclass(frozen=True)
class Ended:
    """The stream finished normally; totals for the client."""

    frames_in: int
    frames_out: int
    ticks: int


@dataclasses.dataclass(frozen=True)
class Moved:
    """The server handed the stream off (it drains): the client resumes it
    elsewhere with `resume_token`, resending its input from frame
    `frames_received` on. The stream's last item."""

    resume_token: bytes
    frames_received: int


@dataclasses.dataclass(frozen=True)
class Handoff:
    """Queued by the scheduler in place of `Ended` for a moved stream: its
    host state and state row. Its handle signs it into a `Moved` on the
    door's loop, after the outputs before it (and their speech events)."""

    snapshot: StreamSnapshot


@dataclasses.dataclass(slots=True)
class InFlight:
    """One chunk of a stream inside a dispatched tick (ticks are delivered in
    dispatch order, so these form a FIFO)."""

    received_at: float  # see `Output`
    final: bool  # its outputs are the stream's last: delivering them ends it


class Stream:
    """Host state of one stream in a slot. Written by its `Scheduler` only."""

    def __init__(
        self,
        slot: int,
        stream_id: str,
        chunk_frames: int,
        output_latency: int,
        max_backlog: int,
        now: float,
    ) -> None:
        self.slot = slot
        self.stream_id = stream_id
        self.phase = Phase.OPEN
        self.outcome: str | None = None  # ok, cancelled, error, timeout once DONE
        self.mailbox: Mailbox | None = None  # where its items go (set by the engine)
        self._chunk = chunk_frames
        self._max_backlog = max_backlog
        # Its slot still holds the last stream's state: reset before its first step.
        self.needs_reset = True
        # A resumed stream's state row: written into its slot in the tick
        # that first steps it (the scheduler spreads a burst of them over
        # ticks; until then the stream buffers its input).
        self.restore_state: tuple[Any, ...] | None = None
        # The server drains: no more ticks; once none is in flight, it moves.
        self.moving = False
        # Client samples not yet stepped, with the time each piece arrived.
        self._buffer: deque[tuple[np.ndarray, float]] = deque()
        self.buffered = 0
        # Invalid frames still to feed after `end`: the pad to a whole chunk
        # plus `input_latency` frames, so every output `layer()` gives appears.
        self._flush_frames = 0
        self._to_drop = output_latency
        self.in_flight: deque[InFlight] = deque()
        self.frames_in = 0
        self.frames_out = 0
        self.ticks = 0
        # Items queued for the client (written by the scheduler) and read by
        # it (written by its handle): their difference is the backlog.
        self.items_queued = 0
        self.items_read = 0
        # When its next chunk became ready (None: none is).
        self.ready_since: float | None = None
        # That chunk was completed by the client's input (a real-time
        # arrival), not left over from a backlog.
        self.ready_by_input = False
        self.opened_at = now
        # When it resumed a stream another server handed off (None: it did not).
        self.resumed_at: float | None = None
        self.last_input = now
        self.last_read = now
        self.first_output_at: float | None = None
        # Chunk period, from the intervals between chunks completed by input:
        # the average (`policy.next_period`), and the longest recent one, for
        # when the next is due (`policy.chunk_period`).
        self.period: float | None = None
        self._due_period: float | None = None
        self._intervals: deque[float] = deque(maxlen=policy.PERIOD_INTERVALS)
        self._input_ready_at: float | None = None

    # Input ----------------------------------------------------------------------

    @property
    def restore_bytes(self) -> int:
        """Bytes of the state row still to be written (0: none)."""
        if self.restore_state is None:
            return 0
        return sum(leaf.nbytes for leaf in self.restore_state)

    def push(self, x: np.ndarray, now: float, max_buffered: int) -> bool:
        """Buffers validated samples; True if a chunk just became ready."""
        if self.phase is Phase.DONE:
            if self.outcome == "moved":
                # The client resends these from `frames_received` on its new server.
                return False
            raise InvalidArgument("the stream has already ended; open a new stream.")
        if self.phase is Phase.ENDING:
            raise InvalidArgument("chunk after end of stream; send chunks before `end`.")
        n = x.shape[0]
        if self.buffered + n > max_buffered:
            raise ResourceExhausted(
                f"stream buffer full: {self.buffered} frames are waiting; send at most "
                f"{max_buffered} frames ahead of processing."
            )
        if n:
            self._buffer.append((x, now))
            self.buffered += n
            self.frames_in += n
        self.last_input = now
        return self.update_ready(now, by_input=True)

    def end(self, now: float, input_latency: int) -> bool:
        """No more input: plans the latency flush. True if the stream has
        nothing left to step or deliver (the caller finishes it)."""
        if self.phase is not Phase.OPEN:
            return False
        # A stream that never sent a frame has no outputs to flush.
        total = self.buffered + (input_latency if self.frames_in else 0)
        chunks = math.ceil(total / self._chunk) if total else 0
        self._flush_frames = chunks * self._chunk - self.buffered
        self.phase = Phase.ENDING
        self.last_input = now
        if chunks:
            self.update_ready(now)
            return False
        if self.in_flight:
            # The last tick in flight carries this stream's last outputs.
            self.in_flight[-1].final = True
            return False
        return True

    # Scheduling ------------------------------------------------------------------

    def update_ready(self, now: float, by_input: bool = False) -> bool:
        """Sets `ready_since`; True if a chunk just became ready."""
        ready = (
            self.phase is not Phase.DONE
            and not self.moving
            and len(self.in_flight) < MAX_IN_FLIGHT
            and self.items_queued - self.items_read < self._max_backlog
            and self._has_chunk()
        )
        if not ready:
            self.ready_since = None
            return False
        if self.ready_since is not None:
            return False
        self.ready_since = now
        self.ready_by_input = by_input
        if by_input:
            if self._input_ready_at is not None:
                interval = now - self._input_ready_at
                self.period = policy.next_period(self.period, interval)
                policy.add_interval(self._intervals, interval)
                self._due_period = policy.chunk_period(self._intervals)
            self._input_ready_at = now
        return True

    def _has_chunk(self) -> bool:
        if self.buffered >= self._chunk:
            return True
        return self.phase is Phase.ENDING and (self.buffered > 0 or self._flush_frames > 0)

    @property
    def backlog(self) -> int:
        """Items queued for the client and not read yet."""
        return self.items_queued - self.items_read

    def mark_read(self, now: float) -> bool:
        """The client read one item (its handle calls this, on its loop).
        True if that may have lifted its backpressure: the engine should
        look at the stream again. The backlog moves one item at a time, so
        the read that takes it below the limit sees exactly limit - 1."""
        self.last_read = now
        self.items_read += 1
        return self.items_queued - self.items_read == self._max_backlog - 1

    @property
    def blocked(self) -> bool:
        """Has a chunk but may not tick now (backpressure, or two in flight)."""
        return (
            self.ready_since is None
            and self.phase is not Phase.DONE
            and not self.moving
            and self._has_chunk()
        )

    @property
    def expected_at(self) -> float | None:
        """When its next chunk is predicted to be complete (None: unknown)."""
        if self._due_period is None or self._input_ready_at is None:
            return None
        return self._input_ready_at + self._due_period

    def take_chunk(self, out: np.ndarray, now: float) -> int:
        """Writes the next chunk into `out [chunk, *c]` (a reused staging row)
        and zeroes the part past the client's frames, which is invalid.
        Returns the valid frames taken."""
        chunk = self._chunk
        buffer = self._buffer
        taken = 0
        # The newest frame this tick needs arrived with the last piece taken;
        # a pure flush tick waits on `end` instead.
        received_at = self.last_input
        while taken < chunk and buffer:
            head, arrived = buffer[0]
            n = min(chunk - taken, head.shape[0])
            out[taken : taken + n] = head[:n]
            taken += n
            received_at = arrived
            if n == head.shape[0]:
                buffer.popleft()
            else:
                buffer[0] = (head[n:], arrived)
        if taken < chunk:  # the stream's last chunk: an invalid tail
            out[taken:] = 0
            self._flush_frames -= chunk - taken
        self.buffered -= taken
        final = self.phase is Phase.ENDING and self.buffered == 0 and self._flush_frames <= 0
        self.in_flight.append(InFlight(received_at, final))
        self.needs_reset = False
        self.restore_state = None
        self.ready_since = None
        self.update_ready(now)  # a second chunk may already be buffered
        return taken

    def take_outputs(
        self, values: np.ndarray, mask: np.ndarray | None, now: float
    ) -> tuple[Output | None, bool]:
        """One tick's outputs `[chunk * ratio, *out]` for this stream: the
        `Output` of its valid frames (None if none) and whether that was its
        last tick. `mask` is None when every frame is valid (the usual case:
        no boolean gather). The caller queues the output, then updates
        readiness (the queued output counts against backpressure)."""
        chunk = self.in_flight.popleft()
        self.ticks += 1
        if self.phase is Phase.DONE:
            return None, False
        if self._to_drop:
            drop = min(self._to_drop, values.shape[0])
            self._to_drop -= drop
            values = values[drop:]
            mask = None if mask is None else mask[drop:]
        frames = values if mask is None else values[mask]
        output = None
        if frames.shape[0]:
            if self.first_output_at is None:
                self.first_output_at = now
            output = Output(frames, self.frames_out, chunk.received_at)
            self.frames_out += frames.shape[0]
        return output, chunk.final

    def finish(self, outcome: str) -> None:
        self.phase = Phase.DONE
        self.outcome = outcome
        self.ready_since = None
        self._buffer.clear()
        self.buffered = 0

    def ended(self) -> Ended:
        return Ended(self.frames_in, self.frames_out, self.ticks)

    # Migration ---------------------------------------------------------------------

    def restore(self, snapshot: StreamSnapshot, now: float) -> bool:
        """Continues a stream another server handed off: counters, buffered
        input, the latency flush under way; its state row goes into the
        slot before its first step. True if it has nothing left to do (an
        ending stream whose last outputs were sent): the caller finishes it."""
        self.frames_in = snapshot.frames_received
        self.frames_out = snapshot.frames_emitted
        self.ticks = snapshot.ticks
        self._to_drop = snapshot.outputs_to_drop
        n = snapshot.buffered_input.shape[0]
        if n:
            self._buffer.append((snapshot.buffered_input, now))
            self.buffered = n
        self.restore_state = snapshot.state
        self.resumed_at = now
        self.needs_reset = False
        if snapshot.ending:
            self.phase = Phase.ENDING
            self._flush_frames = snapshot.flush_frames
            if not self._has_chunk():
                return True
        self.update_ready(now)
        return False

    def snapshot(self, state: tuple[np.ndarray, ...], empty_input: np.ndarray) -> StreamSnapshot:
        """Its host state and `state` (its row of the model state) for a
        hand-off; call with nothing in flight, so every output was queued."""
        pieces = [piece for piece, _ in self._buffer]
        buffered = np.concatenate(pieces) if pieces else empty_input
        return StreamSnapshot(
            stream_id=self.stream_id,
            frames_received=self.frames_in,
            frames_consumed=self.frames_in - self.buffered,
            frames_emitted=self.frames_out,
            ticks=self.ticks,
            outputs_to_drop=self._to_drop,
            buffered_input=buffered,
            state=state,
            ending=self.phase is Phase.ENDING,
            flush_frames=self._flush_frames if self.phase is Phase.ENDING else 0,
        )


class StreamOwner(Protocol):
    """What a `StreamHandle` asks of the engine that owns its stream."""

    def push(self, stream: Stream, x: np.ndarray) -> None: ...
    def end(self, stream: Stream) -> None: ...
    def cancel(self, stream: Stream, error: StreamError | None, outcome: str) -> None: ...
    def wake(self) -> None: ...
    def release(self) -> None: ...
    def sign(self, snapshot: StreamSnapshot) -> bytes: ...


class StreamHandle:
    """A front door's handle on one stream. Create with `Runtime.open_stream`.

    Example:
        stream = runtime.open_stream("logmel")
        stream.send(samples); stream.end()
        async for item in stream.outputs(): ...   # Output..., then Ended
    """

    def __init__(
        self,
        owner: StreamOwner,
        stream: Stream,
        info: ModelInfo,
        loop: asyncio.AbstractEventLoop,
        max_chunk_frames: int,
    ) -> None:
        self._owner = owner
        self._stream = stream
        self.stream_id = stream.stream_id
        self.info = info
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.mailbox = Mailbox(loop, self._queue)
        self._max_chunk_frames = max_chunk_frames
        # Set by `request_segments`; runs on the door's loop in `outputs()`.
        self._segmenter: SpeechSegmenter | None = None
        # A resumed stream: the index of its next output frame, and the
        # segmenter's state it carried.
        self.output_offset = stream.frames_out
        self._segments_state: dict[str, Any] | None = None
        self._released = False

    @property
    def backlog(self) -> int:
        """Items queued for this client and not read yet."""
        return self._stream.backlog

    @property
    def done(self) -> bool:
        return self._stream.phase is Phase.DONE

    def send(self, samples: np.ndarray) -> None:
        """Queues `samples [frames, *input_shape]` (float32, int16 or int32).

        Raises `InvalidArgument` for a bad tensor and `ResourceExhausted` when
        the chunk or the stream's buffer is too large; the stream stays usable
        after neither (the front doors end it).
        """
        self._owner.push(self._stream, self._validate(samples))

    def end(self) -> None:
        """No more input: flush the latency and finish."""
        self._owner.end(self._stream)

    def cancel(self) -> None:
        """Client went away (or its door is done with the stream): frees the
        slot at once and ends `outputs()`."""
        self._owner.cancel(self._stream, None, "cancelled")
        if not self._released:
            # The door has written all it will: a draining server waits for this.
            self._released = True
            self._owner.release()

    def resume_segments(self, state: Mapping[str, Any] | None) -> None:
        """A resumed stream's segmenter state (from its token), applied by
        `request_segments` (the client asks for segments again)."""
        self._segments_state = dict(state) if state else None

    def fail(self, error: StreamError, outcome: str = "error") -> None:
        """Ends the stream with `error`, which `outputs()` raises."""
        self._owner.cancel(self._stream, error, outcome)

    def request_segments(self, options: SegmentOptions) -> None:
        """Adds `SpeechEvent`s after the outputs that cause them. Call before
        the first `send`; the model must declare `speech_segments`."""
        info = self.info
        if not info.speech_segments:
            raise InvalidArgument(
                f"model {info.name!r} has no speech-probability output; speech segments are "
                "available on models that declare speech_segments (e.g. silero-vad)."
            )
        window = 1 / info.output_ratio
        if window.denominator != 1:
            raise InvalidArgument(
                f"model {info.name!r}: output_ratio {info.output_ratio} is not 1/n."
            )
        self._segmenter = SpeechSegmenter(options, int(window), info.sample_rate or 16000)
        if self._segments_state is not None:
            self._segmenter.restore(self._segments_state)

    async def outputs(self) -> AsyncIterator[Output | SpeechEvent | Ended | Moved]:
        """Yields `Output`s (each followed by the `SpeechEvent`s it causes, if
        requested), then one `Ended`, or one `Moved` when the draining server
        hands the stream off; raises the stream's `StreamError`."""
        while True:
            item = await self._queue.get()
            if self._stream.mark_read(time.monotonic()):
                self._owner.wake()  # backpressure lifted
            if item is CANCELLED:
                return
            if isinstance(item, StreamError):
                raise item
            if isinstance(item, Handoff):
                yield self._moved(item.snapshot)
                return
            yield item
            if isinstance(item, Ended):
                return
            if self._segmenter is not None:
                for event in self._segmenter.push(item.frames[:, 0].tolist()):
                    yield event

    def _moved(self, snapshot: StreamSnapshot) -> Moved:
        """Signs the hand-off; every output before it went through the
        segmenter, whose state travels too."""
        if self._segmenter is not None:
            snapshot = dataclasses.replace(snapshot, extra={"segments": self._segmenter.state()})
        try:
            token = self._owner.sign(snapshot)
        except ResumeTokenError as e:  # too large, or a state no token can carry
            # As before migration existed: the client reconnects from scratch.
            raise Unavailable(
                f"the server is draining and cannot hand this stream off: {e}"
            ) from None
        return Moved(token, snapshot.frames_received)

    def _validate(self, samples: Any) -> np.ndarray:
        x = np.asarray(samples)
        if x.dtype not in (np.float32, np.int16, np.int32):
            raise InvalidArgument(f"chunk dtype {x.dtype} is not supported; send float32 or int16.")
        shape = self.info.input_shape
        if x.ndim == len(shape) and x.ndim >= 1 and shape == (1,):
            x = x.reshape(-1, 1)  # mono audio may arrive without its channel axis
        if tuple(x.shape[1:]) != shape:
            raise InvalidArgument(
                f"chunk shape {list(x.shape)} does not match model {self.info.name!r}: "
                f"expected [frames, {', '.join(map(str, shape))}]."
            )
        if x.shape[0] > self._max_chunk_frames:
            raise ResourceExhausted(
                f"chunk of {x.shape[0]} frames exceeds the limit of "
                f"{self._max_chunk_frames}; split it into smaller chunks."
            )
        x = prepare_input(x, self.info.input_dtype)
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise InvalidArgument(
                f"chunk has {bad} non-finite values (NaN or inf); send finite samples."
            )
        return x
