"""A `Session` is one client stream inside a `Scheduler`.

It buffers the client's samples to chunk boundaries, hands one chunk per
tick to the scheduler, drops the stream's first `output_latency` output
frames, flushes `input_latency` invalid frames at the end, and queues only
valid output frames (with their offsets) for the transport to send. So the
frames a client receives equal `layer()` on its whole input.

Threading: transports call `send`/`end`/`cancel`/`outputs` on the asyncio
loop; the scheduler's tick thread calls `_pop_chunk`/`_deliver`. Shared
fields are guarded by the scheduler's lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np

from server.errors import InvalidArgument, ResourceExhausted, StreamError
from server.model import ModelInfo, prepare_input
from server.segments import SegmentOptions, SpeechEvent, SpeechSegmenter

if TYPE_CHECKING:
    from server.scheduler import Scheduler

# Queued when a stream is cancelled: ends `outputs()` quietly (the client left).
_CANCELLED = object()


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


@dataclasses.dataclass(slots=True)
class _InFlight:
    """One chunk of this stream inside a dispatched tick (ticks are delivered
    in dispatch order, so these form a FIFO)."""

    # When the newest input frame of the chunk arrived (see `Output`).
    received_at: float
    # Its outputs are the stream's last: delivering them ends the stream.
    final: bool


# Chunks of one stream that may be in dispatched ticks at once: the tick
# being delivered and the next one, already on the device (host work
# overlapping device work needs two).
MAX_IN_FLIGHT = 2


@dataclasses.dataclass(frozen=True)
class Ended:
    """The stream finished normally; totals for the client."""

    frames_in: int
    frames_out: int
    ticks: int


class Session:
    """One stream. Create with `Scheduler.open_stream`; see module docstring."""

    def __init__(
        self, scheduler: Scheduler, slot: int, stream_id: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.scheduler = scheduler
        self.slot = slot
        self.stream_id = stream_id
        self.info: ModelInfo = scheduler.info
        self._loop = loop
        self._queue: asyncio.Queue[Output | Ended | StreamError] = asyncio.Queue()
        model = scheduler.model
        self._input_shape = model.input_shape
        self._input_dtype = model.input_dtype
        self._chunk = scheduler.chunk_frames
        self._max_backlog = scheduler.config.max_output_backlog
        self._buffer: deque[np.ndarray] = deque()
        self._buffered = 0
        # (input frames received so far, arrival time) per send, for latency.
        self._arrivals: deque[tuple[int, float]] = deque()
        self._consumed = 0
        # Invalid frames still to feed after `end`: the pad to a whole chunk
        # plus `input_latency` frames, so every output `layer()` gives appears.
        self._flush_frames = 0
        self._to_drop = self.info.output_latency
        self.reset_pending = True
        self.ending = False
        self.done = False
        self._in_flight: deque[_InFlight] = deque()
        self.frames_in = 0
        self.frames_out = 0
        self.ticks = 0
        self.backlog = 0
        self.ready_since: float | None = None
        now = time.monotonic()
        self.opened_at = now
        self.last_activity = now
        self.last_read = now
        self.first_output_at: float | None = None
        self.outcome: str | None = None
        # Set by `request_segments`; runs on the transport's loop in `outputs()`.
        self._segmenter: SpeechSegmenter | None = None

    # Transport side (asyncio loop) -------------------------------------------

    def send(self, samples: np.ndarray) -> None:
        """Queues `samples [frames, *input_shape]` (float32, int16 or int32).

        Raises `InvalidArgument` for a bad tensor and `ResourceExhausted` when
        the chunk or the stream's buffer is too large; the stream stays usable
        after neither (the front doors end it).
        """
        if self.done:
            raise InvalidArgument("the stream has already ended; open a new stream.")
        if self.ending:
            raise InvalidArgument("chunk after end of stream; send chunks before `end`.")
        x = self._validate(samples)
        with self.scheduler.lock:
            if self._buffered + x.shape[0] > self.scheduler.config.max_buffered_frames:
                raise ResourceExhausted(
                    f"stream buffer full: {self._buffered} frames are waiting; send at most "
                    f"{self.scheduler.config.max_buffered_frames} frames ahead of processing."
                )
            now = time.monotonic()
            if x.shape[0]:
                self._buffer.append(x)
                self._buffered += x.shape[0]
                self.frames_in += x.shape[0]
                self._arrivals.append((self.frames_in, now))
            self.last_activity = now
            became_ready = self._update_ready()
        # Only a stream becoming ready can start a tick: other sends need not
        # wake the tick thread (hundreds of sends a second at high load).
        if became_ready:
            self.scheduler.wake()

    def end(self) -> None:
        """No more input: flush the latency and finish."""
        if self.done or self.ending:
            return
        with self.scheduler.lock:
            # A stream that never sent a frame has no outputs to flush.
            latency = self.info.input_latency if self.frames_in else 0
            total = self._buffered + latency
            chunks = math.ceil(total / self._chunk) if total else 0
            self._flush_frames = chunks * self._chunk - self._buffered
            self.ending = True
            self.last_activity = time.monotonic()
            if chunks == 0 and self._in_flight:
                # The last tick in flight carries this stream's last outputs;
                # its delivery ends the stream.
                self._in_flight[-1].final = True
            elif chunks == 0:
                self._finish_locked(Ended(self.frames_in, self.frames_out, self.ticks), "ok")
            else:
                self._update_ready()
        self.scheduler.wake()

    def cancel(self) -> None:
        """Client went away: frees the slot at once and ends `outputs()`."""
        with self.scheduler.lock:
            if not self.done:
                self._finish_locked(_CANCELLED, "cancelled")
        self.scheduler.wake()

    def fail(self, error: StreamError, outcome: str = "error") -> None:
        with self.scheduler.lock:
            if not self.done:
                self._finish_locked(error, outcome)
        self.scheduler.wake()

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

    async def outputs(self) -> AsyncIterator[Output | SpeechEvent | Ended]:
        """Yields `Output`s (each followed by the `SpeechEvent`s it causes, if
        requested), then one `Ended`; raises the stream's `StreamError`."""
        while True:
            item = await self._queue.get()
            with self.scheduler.lock:
                self.backlog -= 1
                self.last_read = time.monotonic()
                became_ready = self._update_ready()
            if became_ready:  # backpressure lifted
                self.scheduler.wake()
            if item is _CANCELLED:
                return
            if isinstance(item, StreamError):
                raise item
            yield item
            if isinstance(item, Ended):
                return
            if self._segmenter is not None:
                for event in self._segmenter.push(item.frames[:, 0].tolist()):
                    yield event

    # Validation ---------------------------------------------------------------

    def _validate(self, samples: Any) -> np.ndarray:
        x = np.asarray(samples)
        if x.dtype not in (np.float32, np.int16, np.int32):
            raise InvalidArgument(f"chunk dtype {x.dtype} is not supported; send float32 or int16.")
        if x.ndim == len(self._input_shape) and x.ndim >= 1 and self._input_shape == (1,):
            x = x.reshape(-1, 1)  # mono audio may arrive without its channel axis
        if tuple(x.shape[1:]) != self._input_shape:
            raise InvalidArgument(
                f"chunk shape {list(x.shape)} does not match model {self.info.name!r}: "
                f"expected [frames, {', '.join(map(str, self._input_shape))}]."
            )
        if x.shape[0] > self.scheduler.config.max_chunk_frames:
            raise ResourceExhausted(
                f"chunk of {x.shape[0]} frames exceeds the limit of "
                f"{self.scheduler.config.max_chunk_frames}; split it into smaller chunks."
            )
        x = prepare_input(x, self._input_dtype)
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
            raise InvalidArgument(
                f"chunk has {bad} non-finite values (NaN or inf); send finite samples."
            )
        return x

    # Scheduler side (tick thread, under the lock) ---------------------------------

    @property
    def in_flight(self) -> int:
        """Chunks of this stream in dispatched ticks, not yet delivered."""
        return len(self._in_flight)

    def _update_ready(self) -> bool:
        """Sets `ready_since`; True if the stream just became ready."""
        ready = (
            not self.done
            and len(self._in_flight) < MAX_IN_FLIGHT
            and self.backlog < self._max_backlog
            and self._has_chunk()
        )
        if ready and self.ready_since is None:
            self.ready_since = time.monotonic()
            return True
        if not ready:
            self.ready_since = None
        return False

    def _has_chunk(self) -> bool:
        if self._buffered >= self._chunk:
            return True
        return self.ending and (self._buffered > 0 or self._flush_frames > 0)

    @property
    def waiting_for_input(self) -> bool:
        """Open, not ready, and the reason is the client has not sent enough."""
        return not self.done and not self.ending and self._buffered < self._chunk

    def _pop_chunk(self, out_values: np.ndarray) -> int:
        """Writes the next chunk into `out_values [chunk, *c]` (a reused
        staging row) and zeroes the part past the client's frames, which is
        invalid. Returns the valid frames taken."""
        chunk = self._chunk
        buffer = self._buffer
        taken = 0
        while taken < chunk and buffer:
            head = buffer[0]
            n = min(chunk - taken, head.shape[0])
            out_values[taken : taken + n] = head[:n]
            taken += n
            if n == head.shape[0]:
                buffer.popleft()
            else:
                buffer[0] = head[n:]
        if taken < chunk:  # the stream's last chunk: an invalid tail
            out_values[taken:] = 0
            self._flush_frames -= chunk - taken
        self._buffered -= taken
        self._consumed += taken
        # The newest frame this tick needs arrived with the first send that
        # reaches past it; a pure flush tick waits on `end` instead.
        arrivals = self._arrivals
        while arrivals and arrivals[0][0] < self._consumed:
            arrivals.popleft()
        received_at = arrivals[0][1] if taken and arrivals else self.last_activity
        final = self.ending and self._buffered == 0 and self._flush_frames <= 0
        self._in_flight.append(_InFlight(received_at, final))
        self.ready_since = None
        self._update_ready()  # a second chunk may already be buffered
        return taken

    def _deliver(self, values: np.ndarray, mask: np.ndarray | None = None) -> int:
        """Routes one tick's outputs `[chunk * ratio, *out]` for this stream;
        returns the number of frames queued for the client. `mask` is None
        when every frame is valid (the usual case: no boolean gather)."""
        chunk = self._in_flight.popleft()
        self.ticks += 1
        if self.done:
            return 0
        if self._to_drop:
            drop = min(self._to_drop, values.shape[0])
            self._to_drop -= drop
            values = values[drop:]
            mask = None if mask is None else mask[drop:]
        frames = values if mask is None else values[mask]
        n = frames.shape[0]
        if n:
            if self.first_output_at is None:
                self.first_output_at = time.monotonic()
            self._put(Output(frames, self.frames_out, chunk.received_at))
            self.frames_out += n
        if chunk.final:
            self._finish_locked(Ended(self.frames_in, self.frames_out, self.ticks), "ok")
        else:
            self._update_ready()
        return n

    def _put(self, item: Output | Ended | StreamError) -> None:
        self.backlog += 1
        outbox = self.scheduler._outbox
        if outbox is not None:  # inside a tick's delivery: one wake-up per loop later
            outbox.setdefault(self._loop, []).append((self._queue, item))
        else:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def _finish_locked(self, final: Ended | StreamError | object, outcome: str) -> None:
        self.done = True
        self.outcome = outcome
        self.ready_since = None
        self._buffer.clear()
        self._buffered = 0
        self._put(final)  # type: ignore[arg-type]
        self.scheduler._release(self)
