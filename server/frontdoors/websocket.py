"""The WebSocket front door: one stream per connection over the stream bridge.

Protocol (pinned), `ws://HOST:PORT/v1/models/{model}/stream?dtype=float32|int16`:
server sends a text `{"type": "started", ...ModelInfo, "stream_id"}`; the client
sends binary little-endian frames `[frames, *C]` and a text `{"type": "end"}`;
the server sends each output as binary float32 `[frames, *C]`, then text
`{"type": "ended", ...}` and closes with 1000. Errors: text `{"type": "error",
"code", "message"}` then a close code from `server.frontdoors.wire.WS_CLOSE_CODES`.

Speech segments (models with `speech_segments`, e.g. silero-vad): add
`&speech_segments=1` and optionally `threshold`, `neg_threshold`,
`min_silence_duration_ms`, `speech_pad_ms` to the URL; after the output that
causes them the server sends text `{"type": "speech_started", "sample": N}`
and `{"type": "speech_stopped", "sample": N}` (input samples from the
stream's start). Clients that do not ask get none.

The handler talks ASGI directly (`receive`/`send` of the connection) rather
than through Starlette's `WebSocket` wrapper: the wrapper re-checks the
connection state and rebuilds a message dict around every chunk and output,
which is per-message work on the hot path and adds nothing a stream needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers, QueryParams

from server.errors import InvalidArgument, ResourceExhausted, StreamError
from server.frontdoors.auth import WEBSOCKET_HINT, ApiKeys
from server.frontdoors.bridge import END, Inbound, StreamBridge, StreamRuntime
from server.frontdoors.wire import (
    decode_ws_frames,
    segment_options_from_query,
    ws_close_code,
    ws_output,
)
from server.resume import token_from_text, token_to_text
from server.runtime import Ended, Moved, Output
from server.segments import SpeechEvent

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Input dtypes a client may declare with `?dtype=`.
STREAM_DTYPES = ("float32", "int16")
# How long a `?resume=1` connection may take to send its token.
_RESUME_MESSAGE_TIMEOUT_S = 10.0


class WebSocketStream:
    """The ASGI endpoint of `/v1/models/{model}/stream` (one call per connection)."""

    def __init__(
        self, runtime: StreamRuntime, keys: ApiKeys, max_message_bytes: int = 16 * 1024 * 1024
    ) -> None:
        self.bridge = StreamBridge(runtime, "websocket")
        self.keys = keys
        self.max_message_bytes = max_message_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        model = scope["path_params"]["model"]
        started = time.monotonic()
        try:
            await self._stream(scope, model, receive, send, started)
        except StreamError as e:
            self.bridge.reject(e, model)
            with contextlib.suppress(Exception):
                await _send_text(send, error_body(e))
                await send(
                    {"type": "websocket.close", "code": ws_close_code(e), "reason": e.message[:120]}
                )
        except OSError:
            # uvicorn's ClientDisconnected: a send after the client left.
            # Nothing to tell it; the bridge has freed the stream.
            pass

    async def _stream(
        self, scope: Scope, model: str, receive: Receive, send: Send, started: float
    ) -> None:
        headers = Headers(scope=scope)
        params = QueryParams(scope["query_string"])
        self.keys.check(headers.get("authorization"), params.get("token"), how=WEBSOCKET_HINT)
        dtype = params.get("dtype", "float32")
        if dtype not in STREAM_DTYPES:
            raise InvalidArgument(f"dtype={dtype!r} is not supported; use float32 or int16.")
        token = await _resume_token(params, receive)
        handle = await self.bridge.open(
            model, params.get("stream_id"), segment_options_from_query(params), token
        )
        info = handle.info
        hello = {"type": "started", **info.to_json(), "stream_id": handle.stream_id}
        if token is not None:
            # Binary outputs carry no offset: where the resumed stream's continue.
            hello["output_offset"] = handle.output_offset
        try:
            await _send_text(send, hello)
        except BaseException:
            handle.cancel()  # the client left first: free the stream now (see grpc.py)
            raise
        inbound = _decode(receive, dtype, info.input_shape, self.max_message_bytes)
        # aclosing: the stream is freed as soon as this connection ends, however it ends.
        async with contextlib.aclosing(self.bridge.pump(handle, inbound)) as items:
            async for item in items:
                if isinstance(item, Output):
                    await send({"type": "websocket.send", "bytes": ws_output(item.frames)})
                elif isinstance(item, SpeechEvent):
                    await _send_text(send, {"type": item.kind, "sample": item.sample})
                elif isinstance(item, Moved):
                    # The server drains: the client resumes elsewhere (1001: going away).
                    moved = {
                        "type": "moved",
                        "resume_token": token_to_text(item.resume_token),
                        "frames_received": item.frames_received,
                    }
                    await _send_text(send, moved)
                    await send({"type": "websocket.close", "code": 1001, "reason": "moved"})
                elif isinstance(item, Ended):
                    await _send_text(
                        send,
                        {
                            "type": "ended",
                            "frames_in": item.frames_in,
                            "frames_out": item.frames_out,
                            "ticks": item.ticks,
                            "duration_seconds": time.monotonic() - started,
                        },
                    )
                    await send({"type": "websocket.close", "code": 1000, "reason": ""})


async def _resume_token(params: QueryParams, receive: Receive) -> bytes | None:
    """The token of a resumed stream: `?resume_token=` (base64url), or with
    `?resume=1` the first text message `{"type": "config", "resume_token"}`
    (tokens too long for a URL). None for a new stream."""
    if "resume_token" in params:
        return token_from_text(params["resume_token"])
    if params.get("resume", "").lower() not in ("1", "true", "yes"):
        return None
    try:
        message = await asyncio.wait_for(receive(), _RESUME_MESSAGE_TIMEOUT_S)
    except TimeoutError:
        raise InvalidArgument(
            f"?resume=1 but no config message within {_RESUME_MESSAGE_TIMEOUT_S:g} s; send "
            '{"type": "config", "resume_token": ...} first.'
        ) from None
    try:
        config = json.loads(message.get("text") or "")
    except json.JSONDecodeError:
        config = None
    if not isinstance(config, dict) or config.get("type") != "config":
        raise InvalidArgument(
            '?resume=1: the first message must be text {"type": "config", "resume_token": ...}.'
        )
    return token_from_text(config.get("resume_token"))


def error_body(error: StreamError) -> dict[str, str]:
    """The pinned error message (WebSocket text, HTTP body)."""
    return {"type": "error", "code": error.code, "message": error.message}


async def _send_text(send: Send, body: dict[str, Any]) -> None:
    await send({"type": "websocket.send", "text": json.dumps(body)})


async def _decode(
    receive: Receive, dtype: str, channel_shape: tuple[int, ...], max_message_bytes: int
) -> AsyncIterator[Inbound]:
    """Client messages as bridge input: binary frames as samples, then `END`
    at `{"type": "end"}`; stops without `END` when the client leaves."""
    while True:
        message = await receive()
        data = message.get("bytes")
        if data is not None:
            if len(data) > max_message_bytes:
                raise ResourceExhausted(
                    f"message of {len(data)} bytes exceeds {max_message_bytes}; "
                    "send smaller chunks."
                )
            yield decode_ws_frames(data, dtype, channel_shape)
            continue
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text") or ""
        try:
            control = json.loads(text)
        except json.JSONDecodeError:
            raise InvalidArgument(
                'text messages must be JSON, e.g. {"type": "end"}; send samples as binary.'
            ) from None
        if isinstance(control, dict) and control.get("type") == "end":
            yield END
            return
        raise InvalidArgument(f'unknown control message {text[:80]!r}; expected {{"type": "end"}}.')
