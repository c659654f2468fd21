"""uvicorn's WebSocket protocol with flow control by a high-water mark.

uvicorn's `websockets-sansio` protocol pauses reading the socket as soon as
one message waits for the app and resumes when the app has taken it: two
`epoll_ctl` calls and their event-loop bookkeeping around every message. A
stream sends one chunk at a time and its handler is already waiting for it,
so that pause protects nothing; it cost the event loop ~10% of its time per
chunk under load (py-spy of `sl-serve`, 300 demo-asr streams).

`WaterMarkProtocol` pauses only once `HIGH_WATER_MESSAGES` messages or
`HIGH_WATER_BYTES` bytes wait for the app, and resumes, as uvicorn does,
when the app has taken every waiting message. A client sending faster than
its stream is served is still held back by TCP; what the server holds for it
is bounded by the mark plus one message (at most `ws_max_size`).
"""

from __future__ import annotations

import asyncio
from typing import Any

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # uvicorn before its sans-I/O protocol: its default applies
    WebSocketsSansIOProtocol = None  # type: ignore[assignment,misc]

HIGH_WATER_MESSAGES = 4
HIGH_WATER_BYTES = 256 * 1024


if WebSocketsSansIOProtocol is not None:

    class WaterMarkProtocol(WebSocketsSansIOProtocol):  # type: ignore[misc,valid-type]
        """See the module docstring."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.queued_bytes = 0

        def send_receive_event_to_app(self) -> None:
            size = sum(len(f) for f in self.frames)
            paused = self.read_paused
            # The base class pauses after every message unless already
            # paused: stand in as paused for it, and decide here.
            self.read_paused = True
            try:
                before = self.queue.qsize()
                super().send_receive_event_to_app()
            finally:
                self.read_paused = paused
            if self.queue.qsize() == before:
                return  # discarded (the app closed): nothing waits
            self.queued_bytes += size
            if not paused and (
                self.queue.qsize() >= HIGH_WATER_MESSAGES or self.queued_bytes >= HIGH_WATER_BYTES
            ):
                self.read_paused = True
                self.transport.pause_reading()

        async def receive(self) -> Any:
            # The base class resumes reading once nothing waits.
            message = await super().receive()
            if message["type"] == "websocket.receive":  # counted when queued
                data = message.get("bytes") or message.get("text", "").encode()
                self.queued_bytes = max(0, self.queued_bytes - len(data))
            return message


def protocol_class() -> type[asyncio.Protocol] | str:
    """What `uvicorn.Config(ws=...)` should get: the water-mark protocol
    where this uvicorn has the sans-I/O protocol, else its own choice."""
    if WebSocketsSansIOProtocol is None:
        return "auto"
    return WaterMarkProtocol
