"""The one stream bridge both front doors use: transport-neutral plumbing
between a client connection and a runtime stream.

A door (gRPC, WebSocket) only decodes its messages and encodes outputs; the
bridge does the rest, the same way for both:

- `open`: admit the stream (`runtime.open_stream`, or `resume_stream` with
  a resume token, verified off the loop) and ask for speech segments,
  cancelling the stream if the request is refused;
- `pump`: feed the client's decoded messages into the stream from a reader
  task (chunks -> `send`, `END` -> `end`, a client that leaves -> `cancel`,
  a bad message -> `fail` with its `StreamError`), yield the stream's outputs
  to the door, record each output's chunk latency once the door has written
  it, and free the stream however the door stops;
- `reject`: count an error returned to a client.

Example (what a door's handler boils down to):

    bridge = StreamBridge(runtime, "websocket")
    try:
        handle = await bridge.open(model, stream_id=None, segments=None)
        await send_started(handle.info, handle.stream_id)
        async with contextlib.aclosing(bridge.pump(handle, decoded_messages())) as items:
            async for item in items:
                await send(item)          # Output, SpeechEvent or Ended
    except StreamError as e:
        bridge.reject(e, model)
        await send_error(e)               # grpc_status(e) / ws_close_code(e)

The runtime interface the doors rely on is `StreamRuntime` / `StreamHandle`
below, and nothing else.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import numpy as np

from server.errors import StreamError
from server.model import ModelInfo
from server.runtime import Ended, Moved, Output
from server.segments import SegmentOptions, SpeechEvent
from server.stats import ChunkStats, ErrorStats


class StreamHandle(Protocol):
    """One admitted stream, as `runtime.open_stream` returns it."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def stream_id(self) -> str: ...

    def request_segments(self, options: SegmentOptions) -> None: ...

    def send(self, samples: np.ndarray) -> None: ...

    def end(self) -> None: ...

    def cancel(self) -> None: ...

    def fail(self, error: StreamError) -> None: ...

    @property
    def output_offset(self) -> int: ...

    def outputs(self) -> AsyncIterator[Output | SpeechEvent | Ended | Moved]: ...


class StreamRuntime(Protocol):
    """What the front doors need from the runtime."""

    @property
    def draining(self) -> bool: ...

    @property
    def ready(self) -> bool: ...

    def open_stream(self, model: str, stream_id: str | None = None) -> StreamHandle: ...

    async def resume_stream(
        self, model: str, resume_token: bytes, stream_id: str | None = None
    ) -> StreamHandle: ...

    def model_state(self, name: str) -> str: ...

    def record(self, stats: Any) -> None: ...

    def list_models(self) -> list[ModelInfo]: ...

    def get_model(self, name: str) -> ModelInfo: ...


class EndOfInput:
    """The client's `end` message (or gRPC half-close): flush and finish."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "END"


END = EndOfInput()

# What a door's message decoder yields: samples `[frames, *C]` or `END`. A
# decoder that stops without `END` means the client went away.
Inbound = np.ndarray | EndOfInput


class StreamBridge:
    """Connects client connections of one transport to `runtime` streams.

    One per door (it holds no per-stream state); `transport` labels the
    metrics (`grpc` or `websocket`).
    """

    def __init__(self, runtime: StreamRuntime, transport: str) -> None:
        self.runtime = runtime
        self.transport = transport

    async def open(
        self,
        model: str,
        stream_id: str | None,
        segments: SegmentOptions | None,
        resume_token: bytes | None = None,
    ) -> StreamHandle:
        """Admits a stream or raises its `StreamError` (NOT_FOUND,
        RESOURCE_EXHAUSTED, UNAVAILABLE, INVALID_ARGUMENT for segments on a
        model without a speech output). With `resume_token`, continues a
        moved stream, or raises the token's refusal (INVALID_ARGUMENT,
        PERMISSION_DENIED, FAILED_PRECONDITION, DEADLINE_EXCEEDED); the
        token is checked off this loop (`resume_stream`), which goes on
        serving the other streams meanwhile."""
        if resume_token is None:
            handle = self.runtime.open_stream(model, stream_id)
        else:
            handle = await self.runtime.resume_stream(model, resume_token, stream_id)
        if segments is not None:
            try:
                handle.request_segments(segments)
            except BaseException:
                handle.cancel()  # never leave a refused stream holding its slot
                raise
        return handle

    async def pump(
        self, handle: StreamHandle, inbound: AsyncIterator[Inbound]
    ) -> AsyncIterator[Output | SpeechEvent | Ended | Moved]:
        """Feeds `inbound` into `handle` and yields its outputs until `Ended`
        (or `Moved`: the server drains and hands the stream off).

        Raises the stream's `StreamError` (a bad message from `inbound`
        included: the reader fails the stream with it). The chunk latency of
        an `Output` is recorded when the door asks for the next item, i.e.
        after it wrote this one. On exit, however it happens (the door
        stopped iterating, the client left, an error), the reader stops and
        the stream is cancelled; cancelling an ended stream does nothing.
        Iterate it under `contextlib.aclosing`: an async generator a door
        abandons mid-iteration is otherwise only closed when collected.
        """
        reader = asyncio.create_task(feed(handle, inbound))
        # Bound once: these run per output message.
        record = self.runtime.record
        monotonic = time.monotonic
        model = handle.info.name
        transport = self.transport
        try:
            async for item in handle.outputs():
                yield item
                if isinstance(item, Output):
                    record(
                        ChunkStats(
                            model, transport, monotonic() - item.received_at, item.frames.shape[0]
                        )
                    )
        finally:
            reader.cancel()
            handle.cancel()

    def reject(self, error: StreamError, model: str = "") -> None:
        """Counts `error` as returned to a client of this transport."""
        self.runtime.record(ErrorStats(model, error.code, self.transport))


async def feed(handle: StreamHandle, inbound: AsyncIterator[Inbound]) -> None:
    """The read loop: client messages into the stream until `END`.

    A `StreamError` while decoding or sending (bad tensor, buffer full)
    fails the stream with it, so `outputs()` raises it to the door; a
    decoder that stops without `END` (the client left) or breaks (the
    connection dropped) cancels the stream.
    """
    send = handle.send
    try:
        async for item in inbound:
            if isinstance(item, EndOfInput):
                handle.end()
                return
            send(item)
        handle.cancel()
    except StreamError as e:
        handle.fail(e)
    except asyncio.CancelledError:
        raise
    except Exception:  # the transport broke mid-read: the client is gone
        handle.cancel()
