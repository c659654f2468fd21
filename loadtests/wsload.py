"""Lean WebSocket streams for `sl-loadtest`: the pinned stream protocol on a
bare `asyncio.Protocol`, so the load generator takes little of the cores it
shares with the server it measures.

Why not `clients.client`: a py-spy of `sl-loadtest` at 300 real-time
demo-asr streams (8 s utterances) put 38% of its busy samples in the
`websockets` library's connect and close (proxy lookup in the environment,
handshake objects, the closing handshake and its timeout task) and most of
the rest in the chain of async generators between a paced chunk and the
socket (chunks -> follow_moves -> InputLog -> send). On one machine every
core-second it spends is taken from the server under test
(loadtests/bench_e2e.py runs both side by side).

Here a run builds each chunk's frame once (masked, as RFC 6455 requires of
a client) and every stream writes the same bytes; a stream is one protocol
object whose sends are event-loop timers, whose reads parse frame headers
and count output bytes without copying them. Latency is measured exactly as
`loadtest.one_utterance` measures it.

What it leaves out, being a load generator and not a client: following a
`moved` hand-off (the stream ends with error "MOVED"), compression, proxies.
Masks are fixed per chunk for the whole run: a mask guards proxies against
cache poisoning by page scripts, which a load generator on a test network
has no use for; the server only unmasks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import os
import socket
import ssl
import struct
import time
from typing import Any
from urllib.parse import quote, urlparse

import numpy as np

# RFC 6455 section 1.3: appended to the key to make Sec-WebSocket-Accept.
_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _BINARY, _CLOSE, _PING, _PONG, _CONTINUATION = 0x1, 0x2, 0x8, 0x9, 0xA, 0x0
# websockets' default open_timeout: a server that never answers the upgrade.
_OPEN_TIMEOUT_S = 10.0
_MAX_HANDSHAKE_BYTES = 64 * 1024
# After `ended`: how long to wait for the server's close before dropping the socket.
_CLOSE_TIMEOUT_S = 2.0


def client_frame(opcode: int, payload: bytes, mask: bytes) -> bytes:
    """One final client frame of `opcode` with `payload` masked by `mask` (4 bytes)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = np.frombuffer(mask * (n // 4 + 1), np.uint8)[:n]
    masked = (np.frombuffer(payload, np.uint8) ^ key).tobytes()
    return header + mask + masked


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer to Sec-WebSocket-Key `key`."""
    return base64.b64encode(hashlib.sha1(key.encode() + _ACCEPT_GUID).digest()).decode()


class Plan:
    """One utterance, framed once for every stream of a run.

    `audio [samples, *C]` goes in chunks of `chunk` samples; `needed[i]` is
    how many output frames answer chunk i (<= 0: none, nothing to time),
    as `loadtest.one_utterance` counts them.
    """

    def __init__(
        self,
        audio: np.ndarray,
        rate: int,
        chunk: int,
        info: dict[str, Any],
        server_chunk_blocks: int,
        fast: bool,
    ) -> None:
        rng = np.random.default_rng(1)
        wire = np.ascontiguousarray(audio, dtype="<f4")
        self.rate = rate
        self.fast = fast
        self.audio_seconds = len(audio) / rate
        self.frames: list[bytes] = []
        self.due: list[float] = []  # seconds after the stream's start
        self.samples: list[int] = []
        self.needed: list[int] = []
        sent = 0
        for i in range(0, len(audio), chunk):
            piece = wire[i : i + chunk]
            self.frames.append(client_frame(_BINARY, piece.tobytes(), rng.bytes(4)))
            self.due.append(i / rate)
            sent += len(piece)
            self.samples.append(len(piece))
            self.needed.append(frames_answering(sent, info, server_chunk_blocks))
        self.end_frame = client_frame(_TEXT, b'{"type": "end"}', rng.bytes(4))


class LeanStream(asyncio.Protocol):
    """One utterance over one connection. `done` resolves to
    `(latencies, first_output, error, samples_in_window)` once it ends."""

    def __init__(
        self,
        plan: Plan,
        request: bytes,
        key: str,
        start: float,
        window_end: float,
    ) -> None:
        self.plan = plan
        self.request = request
        self.key = key
        self.start = start
        self.window_end = window_end
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[tuple[list[float], float | None, str | None, int]] = (
            self.loop.create_future()
        )
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.next_chunk = 0
        self.pending: list[tuple[int, float]] = []  # (output frames needed, time sent)
        self.pending_at = 0
        self.latencies: list[float] = []
        self.first: float | None = None
        self.frame_bytes = 0  # bytes of one output frame, from `started`
        self.output_bytes = 0
        self.in_window = 0
        self.fragments: bytearray | None = None  # a fragmented text message
        self.fragment_opcode = 0
        self.stopped = False  # refused, failed or ended: nothing more to send
        self.send_timer: asyncio.TimerHandle | None = None
        # Until `started`; then, after the server's close, until it drops the connection.
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(
            _OPEN_TIMEOUT_S, self._abort, "TimeoutError"
        )

    # asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_timer()
        if not self.closed.done():
            self.closed.set_result(None)
        # websockets names a close without `ended` ConnectionClosedError.
        self._finish(type(exc).__name__ if exc is not None else "ConnectionClosedError")

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.upgraded and not self._upgrade():
            return
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            at = pos + 2
            if length == 126:
                if size - at < 2:
                    break
                length = int.from_bytes(buf[at : at + 2], "big")
                at += 2
            elif length == 127:
                if size - at < 8:
                    break
                length = int.from_bytes(buf[at : at + 8], "big")
                at += 8
            if size - at < length:
                break
            if b1 & 0x80:  # RFC 6455 5.1: a server never masks
                self._abort("ProtocolError")
                return
            pos = at + length
            self._frame(b0 & 0x80, b0 & 0x0F, buf, at, length)
        del buf[:pos]

    # Frames ----------------------------------------------------------------------------

    def _upgrade(self) -> bool:
        buf = self.buffer
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HANDSHAKE_BYTES:
                self._abort("InvalidMessage")
            return False
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or parts[1] != "101":
            self._abort("InvalidStatus")  # as websockets names a refused upgrade
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept") != accept_key(self.key):
            self._abort("InvalidHandshake")
            return False
        self.upgraded = True
        return True

    def _frame(self, fin: int, opcode: int, buf: bytearray, at: int, length: int) -> None:
        if opcode == _CONTINUATION:
            opcode = self.fragment_opcode
        elif not fin:
            self.fragment_opcode = opcode
        if opcode == _BINARY:
            # Counted, never copied: the outputs' values are not checked here.
            self._outputs(length)
        elif opcode == _TEXT:
            if self.fragments is None:
                self.fragments = bytearray()
            self.fragments += buf[at : at + length]
            if fin:
                text, self.fragments = bytes(self.fragments), None
                self._control(json.loads(text))
        elif opcode == _PING:  # uvicorn pings every 20 s by default
            self._write(client_frame(_PONG, bytes(buf[at : at + length]), os.urandom(4)))
        elif opcode == _CLOSE:
            # Answer the close with its status code; the server then drops the connection.
            self._write(client_frame(_CLOSE, bytes(buf[at : at + min(length, 2)]), os.urandom(4)))
            self._finish("ConnectionClosedError")
            self._cancel_timer()
            self.timer = self.loop.call_later(_CLOSE_TIMEOUT_S, self._abort, None)

    def _outputs(self, length: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now - self.start
        self.output_bytes += length
        received = self.output_bytes // self.frame_bytes if self.frame_bytes else 0
        pending, at = self.pending, self.pending_at
        while at < len(pending) and pending[at][0] <= received:
            self.latencies.append(now - pending[at][1])
            at += 1
        self.pending_at = at

    def _control(self, event: Any) -> None:
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "started":
            self._cancel_timer()
            shape = event.get("output_shape") or []
            self.frame_bytes = 4 * math.prod(shape)
            self._send_chunk()
        elif kind == "ended":
            self._finish(None)
        elif kind == "error":
            self._finish(str(event.get("code")))
        elif kind == "moved":
            self._finish("MOVED")  # a load generator does not follow hand-offs
        # speech_started / speech_stopped: nothing to time

    # Sending ---------------------------------------------------------------------------

    def _send_chunk(self) -> None:
        """Writes every chunk that is due (all of them with --fast), then
        `end` after the last, and sets a timer for the next."""
        self.send_timer = None
        plan = self.plan
        while self.next_chunk < len(plan.frames):
            if self.stopped or self.transport is None:
                return
            i = self.next_chunk
            due = self.start + plan.due[i]
            now = time.monotonic()
            if not plan.fast and due > now:
                self.send_timer = self.loop.call_at(due, self._send_chunk)
                return
            self.transport.write(plan.frames[i])
            self.next_chunk = i + 1
            if plan.needed[i] > 0:
                self.pending.append((plan.needed[i], now))
            if now < self.window_end:
                self.in_window += plan.samples[i]
        self._write(plan.end_frame)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # Ending ----------------------------------------------------------------------------

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.done.set_result((self.latencies, self.first, error, self.in_window))
        if error is not None:
            # Refused or failed: the server closes next; stop sending meanwhile.
            self.stopped = True
            if self.send_timer is not None:
                self.send_timer.cancel()
                self.send_timer = None

    def _abort(self, error: str | None) -> None:
        """Drops the connection at once (no closing handshake)."""
        self._finish(error or "ConnectionClosedError")
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()  # connection_lost follows

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class LeanClient:
    """Opens `LeanStream`s to one server: `ws://HOST:PORT` or `wss://`."""

    def __init__(
        self,
        base_url: str,
        model: str,
        plan: Plan,
        *,
        api_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlparse(base_url)
        if url.scheme not in ("ws", "wss"):
            raise ValueError(f"lean streams speak ws:// or wss://, not {base_url!r}")
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "wss" else 80)
        self.ssl = ssl_context if url.scheme == "wss" else None
        if url.scheme == "wss" and self.ssl is None:
            self.ssl = ssl.create_default_context()
        # Resolved once for the run, not per connection (a getaddrinfo in a thread each).
        family, _, _, _, address = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        )[0]
        self.family, self.address = family, address
        path = f"/v1/models/{quote(model)}/stream?dtype=float32"
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        self._head = (
            f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"{auth}Sec-WebSocket-Key: "
        )
        self.plan = plan

    async def utterance(
        self, window_end: float = math.inf
    ) -> tuple[list[float], float | None, str | None, int, float, float]:
        """One utterance: (latencies, first output, error or None, samples
        sent before `window_end`, audio seconds, wall seconds)."""
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        key = base64.b64encode(os.urandom(16)).decode()
        request = f"{self._head}{key}\r\n\r\n".encode()
        stream = LeanStream(self.plan, request, key, start, window_end)
        try:
            async with asyncio.timeout(_OPEN_TIMEOUT_S):
                await loop.create_connection(
                    lambda: stream,
                    self.address[0],
                    self.port,
                    family=self.family,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl is not None else None,
                )
            latencies, first, error, in_window = await stream.done
        except (OSError, TimeoutError) as e:
            stream._abort(type(e).__name__)
            return [], None, type(e).__name__, 0, self.plan.audio_seconds, time.monotonic() - start
        except BaseException:
            stream._abort(None)
            raise
        wall = time.monotonic() - start
        # An ended or refused stream closes on its own (the server's close,
        # answered in `_frame`, or `_CLOSE_TIMEOUT_S`); the next utterance
        # starts once it has, as with `clients.client`.
        await stream.closed
        return latencies, first, error, in_window, self.plan.audio_seconds, wall


def lean_url(url: str) -> bool:
    """Whether lean streams can carry a run against `url`."""
    return url.startswith(("ws://", "wss://"))


def frames_answering(sent: int, info: dict[str, Any], server_chunk_blocks: int) -> int:
    """Output frames that answer a stream's first `sent` input samples once
    the server has stepped every whole chunk of them (<= 0: none yet)."""
    ratio = info["output_ratio"]["numerator"] / info["output_ratio"]["denominator"]
    server_chunk = info["block_size"] * server_chunk_blocks
    return math.floor((sent // server_chunk) * server_chunk * ratio) - info["output_latency"]
