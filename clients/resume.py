"""How a client follows a moved stream (DESIGN.md section 8).

A draining server sends `moved` with a resume token and `frames_received`,
the input frames it had (all inside the token). The client opens the stream
again (the same URL through a load balancer, or the next URL of its list)
with the token, and sends its input again from `frames_received` on. So it
keeps what it sent that the server may not have: `InputLog`. Outputs carry
offsets; the client drops any it already delivered.

The server acknowledges nothing while a stream runs, but its outputs do:
an output frame exists only once the input under it was stepped. With the
model's `output_latency` L and `output_ratio` r, `d` delivered output frames
prove `floor((d + L) / r)` input frames arrived (`acknowledged_frames`), so
the log drops everything before that and stays bounded: a stream that sends
further ahead than `max_buffered_bytes` waits for outputs to catch up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from fractions import Fraction
from typing import Any, Protocol

import numpy as np
import websockets

from clients.events import (
    Chunks,
    Ended,
    Event,
    Moved,
    MovedMessage,
    Output,
    Speech,
    Started,
    StreamingError,
    UnavailableError,
)

# Refusals worth another try on another replica (or the same load-balanced
# URL): that one is draining or full, or serves another model version (mid
# rollout). Anything else (a bad or expired token, auth) fails everywhere.
RETRYABLE_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"})


@dataclasses.dataclass(frozen=True)
class ResumeOptions:
    """How a client follows `moved`.

    `enabled=False` makes `moved` an UNAVAILABLE error (and keeps no input).
    """

    enabled: bool = True
    # Input kept for a resend, in bytes; sending further ahead waits for
    # outputs. 16 MiB: over 4 minutes of 16 kHz float32 mono.
    max_buffered_bytes: int = 16 << 20
    # Time to find a replica that takes the token, over every attempt.
    timeout_s: float = 30.0
    max_attempts: int = 8
    # Pause between attempts: doubles from `backoff_s` up to `max_backoff_s`.
    backoff_s: float = 0.05
    max_backoff_s: float = 1.0

    def backoff(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**attempt)


def next_url(current: int, attempt: int, count: int) -> int:
    """The URL index for resume attempt `attempt` (0-based) after a move
    off `current`: the next URLs in turn (the current one is draining), or
    the only one (a load balancer that picks a live replica)."""
    return 0 if count == 1 else (current + 1 + attempt) % count


def acknowledged_frames(delivered: int, model: dict[str, Any]) -> int:
    """Input frames the server surely received, given `delivered` output
    frames (see the module docstring); 0 for a model that did not say."""
    ratio = model.get("output_ratio") or {}
    num, den = int(ratio.get("numerator", 0)), int(ratio.get("denominator", 0))
    if num <= 0 or den <= 0 or delivered <= 0:
        return 0
    return math.floor((delivered + int(model.get("output_latency", 0))) / Fraction(num, den))


class InputLog:
    """The stream's input numbered by frame, from one reader task (`pump`)
    that owns the caller's iterator, to any number of connections in turn
    (`chunks_from`): a connection that is dropped never cancels the
    caller's iterator halfway through a chunk.

        log = InputLog(source, max_bytes=16 << 20)
        pump = asyncio.create_task(log.pump())
        async for chunk in log.chunks_from(0): ...      # the first connection
        log.ack(n)                                      # the server has frames < n
        async for chunk in log.chunks_from(received): ...  # after a move
    """

    def __init__(self, source: AsyncIterator[np.ndarray], max_bytes: int, keep: bool = True):
        self._source = source
        self._max = max(1, max_bytes)
        self._bytes = 0  # of the chunks kept
        self._keep = keep
        # (first frame index, chunk [n, ...]) of what the server may lack.
        self._chunks: deque[tuple[int, np.ndarray]] = deque()
        self._changed = asyncio.Condition()
        self.taken = 0  # frames taken from the source
        self.acked = 0  # frames the server surely has
        self.done = False  # the source is exhausted (or failed)

    @property
    def first(self) -> int:
        """The first frame still kept (a resend can start no earlier)."""
        return self._chunks[0][0] if self._chunks else self.taken

    async def pump(self) -> None:
        """Takes the source's chunks until it ends; waits while the log is
        full. Raises what the source raises (after marking the log done)."""
        try:
            async for chunk in self._source:
                chunk = np.asarray(chunk)
                frames = chunk.shape[0] if chunk.ndim else 1
                async with self._changed:
                    await self._changed.wait_for(lambda: self._bytes < self._max)
                    self._chunks.append((self.taken, chunk))
                    self._bytes += chunk.nbytes
                    self.taken += frames
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self.done = True
                self._changed.notify_all()

    async def ack(self, frames: int) -> None:
        """The server has every frame before `frames`: forget them."""
        frames = min(frames, self.taken)
        if frames <= self.acked:
            return
        async with self._changed:
            self.acked = frames
            while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= frames:
                self._bytes -= self._chunks.popleft()[1].nbytes
            self._changed.notify_all()

    async def chunks_from(self, start: int) -> AsyncIterator[np.ndarray]:
        """Input from frame `start` on: what is kept, then new chunks as the
        source gives them; ends when the source ends."""
        if not self.first <= start <= self.taken:
            raise ValueError(
                f"cannot resend from frame {start}: the client kept frames "
                f"{self.first} to {self.taken}."
            )
        position = start
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda p=position: self.taken > p or self.done)
                if self.taken <= position:
                    return
                pieces = []
                for first, chunk in self._chunks:
                    end = first + len(chunk)
                    if end > position:
                        pieces.append(chunk[max(0, position - first) :])
            for piece in pieces:
                yield piece
                position += len(piece)
            if not self._keep:
                await self.ack(position)


async def as_async_iter(
    chunks: Iterable[np.ndarray] | AsyncIterable[np.ndarray],
) -> AsyncIterator[np.ndarray]:
    """A list, generator or async generator of chunks, as an async iterator."""
    if isinstance(chunks, AsyncIterable):
        async for c in chunks:
            yield c
    else:
        for c in chunks:
            yield c


class Connection(Protocol):
    """One transport connection of a stream; a moved stream has several."""

    async def open(self) -> Started: ...

    async def send(self, chunk: np.ndarray) -> None: ...

    async def end(self) -> None: ...

    def events(self) -> AsyncIterator[Output | Speech | Ended | MovedMessage]: ...

    async def close(self) -> None: ...


async def _send_all(conn: Connection, chunks: AsyncIterator[np.ndarray]) -> None:
    """One connection's sender: input from the log, then `end`. A failed
    send means the connection is gone; its reader reports why."""
    with contextlib.suppress(Exception):
        async for chunk in chunks:
            await conn.send(chunk)
        await conn.end()


def _close_later(conn: Connection, closing: set[asyncio.Task[None]]) -> None:
    task = asyncio.ensure_future(conn.close())
    closing.add(task)
    task.add_done_callback(closing.discard)


def _raise_source_error(pump: asyncio.Task[None]) -> None:
    if pump.done() and not pump.cancelled() and (error := pump.exception()) is not None:
        raise error


async def _events(
    conn: Connection, pump: asyncio.Task[None]
) -> AsyncIterator[Output | Speech | Ended | MovedMessage]:
    """`conn`'s events; if the caller's input iterator raised (which closes
    the connection), that error instead of the closed connection's."""
    try:
        async for event in conn.events():
            yield event
    except (StreamingError, OSError, websockets.WebSocketException):
        _raise_source_error(pump)
        raise
    _raise_source_error(pump)


async def follow_moves(
    opener: Callable[[int, bytes | None, int], Connection],
    urls: Sequence[str],
    chunks: Chunks,
    options: ResumeOptions,
    report_moves: bool,
) -> AsyncIterator[Event | Moved]:
    """Runs one stream over as many connections as moves need: opens on
    `urls[0]`, and on `moved` resumes on the next URL (`resume.next_url`)
    with the token, resending input from `frames_received` and dropping
    outputs already delivered. `opener(url_index, token, output_offset)`
    makes an unopened connection."""
    log = InputLog(as_async_iter(chunks), options.max_buffered_bytes, keep=options.enabled)
    pump = asyncio.create_task(log.pump())
    conn = opener(0, None, 0)
    index = 0
    sender: asyncio.Task[None] | None = None

    closing: set[asyncio.Task[None]] = set()

    def source_failed(task: asyncio.Task[None]) -> None:
        # The caller's iterator raised: end the stream so the error surfaces.
        if not task.cancelled() and task.exception() is not None:
            _close_later(conn, closing)

    pump.add_done_callback(source_failed)
    try:
        try:
            started = await conn.open()
        except (StreamingError, OSError, websockets.WebSocketException):
            _raise_source_error(pump)
            raise
        model = started.model
        yield started
        sender = asyncio.create_task(_send_all(conn, log.chunks_from(0)))
        delivered = 0
        while True:
            moved = None
            async with contextlib.aclosing(_events(conn, pump)) as events:
                async for event in events:
                    if isinstance(event, MovedMessage):
                        moved = event
                        break
                    if isinstance(event, Output):
                        n, offset = event.frames.shape[0], event.offset
                        if offset > delivered:
                            raise StreamingError(
                                f"output offset {offset}, expected {delivered}: output frames "
                                "were lost",
                                "INTERNAL",
                            )
                        if offset + n <= delivered:
                            continue  # delivered before the move
                        if offset < delivered:
                            event = Output(event.frames[delivered - offset :], delivered)
                        delivered = offset + n
                        yield event
                        await log.ack(acknowledged_frames(delivered, model))
                        continue
                    yield event
                    if isinstance(event, Ended):
                        return
            if moved is None:
                return  # the server closed the stream without `ended`
            if not options.enabled:
                raise UnavailableError(
                    "the server moved this stream (it is draining) and resume is off: "
                    "enable ResumeOptions to follow moves."
                )
            received = moved.frames_received
            if not log.first <= received <= log.taken:
                raise StreamingError(
                    f"the server received {received} input frames, but the client kept "
                    f"frames {log.first} to {log.taken}: cannot resume without a gap.",
                    "INTERNAL",
                )
            sender.cancel()
            # The old connection closes in the background: its close handshake
            # may wait behind input the draining server no longer reads.
            _close_later(conn, closing)
            conn, index = await _resume(opener, urls, index, moved.resume_token, delivered, options)
            if report_moves:
                yield Moved(received, urls[index])
            sender = asyncio.create_task(_send_all(conn, log.chunks_from(received)))
    finally:
        if sender is not None:
            sender.cancel()
        pump.cancel()
        await conn.close()
        if closing:
            await asyncio.wait(closing)


async def _resume(
    opener: Callable[[int, bytes | None, int], Connection],
    urls: Sequence[str],
    current: int,
    token: bytes,
    delivered: int,
    options: ResumeOptions,
) -> tuple[Connection, int]:
    """Opens the stream with `token` on the first URL that takes it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + options.timeout_s
    failures: list[str] = []
    for attempt in range(options.max_attempts):
        if attempt:
            await asyncio.sleep(min(options.backoff(attempt - 1), deadline - loop.time()))
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        index = next_url(current, attempt, len(urls))
        conn = opener(index, token, delivered)
        try:
            await asyncio.wait_for(conn.open(), remaining)
            return conn, index
        except StreamingError as e:
            await conn.close()
            if e.code not in RETRYABLE_CODES:
                raise
            failures.append(f"{urls[index]}: {e}")
        except (OSError, TimeoutError, websockets.WebSocketException) as e:
            await conn.close()
            failures.append(f"{urls[index]}: {type(e).__name__}: {e}")
    raise UnavailableError(
        f"the stream moved but no server resumed it within {options.timeout_s:.0f} s / "
        f"{options.max_attempts} attempts: {'; '.join(failures) or 'no attempt finished'}."
    )
