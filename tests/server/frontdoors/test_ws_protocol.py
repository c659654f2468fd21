"""The WebSocket protocol's flow control, over a real socket and a real client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
import websockets
from uvicorn.server import ServerState

from server.frontdoors import ws_protocol
from server.frontdoors.ws_protocol import HIGH_WATER_BYTES, HIGH_WATER_MESSAGES

pytestmark = pytest.mark.skipif(
    ws_protocol.WebSocketsSansIOProtocol is None, reason="uvicorn without its sans-I/O protocol"
)


class _HeldApp:
    """Accepts, then reads nothing until `release` is set; keeps what it read."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.received: list[bytes] = []
        self.done = asyncio.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        await self.release.wait()
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                break
            self.received.append(message["bytes"])
        self.done.set()


async def _serve(app: _HeldApp) -> tuple[asyncio.Server, ServerState, int]:
    config = uvicorn.Config(app, ws_per_message_deflate=False, log_level="warning")
    config.load()
    state = ServerState()
    server = await asyncio.get_running_loop().create_server(
        lambda: ws_protocol.WaterMarkProtocol(config=config, server_state=state, app_state={}),
        "127.0.0.1",
        0,
    )
    return server, state, server.sockets[0].getsockname()[1]


async def _until(condition: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def _flow(sizes: list[int]) -> tuple[list[bool], bool, list[bytes], list[bytes]]:
    """Sends messages of `sizes` to a server that reads none yet; returns
    whether reading was paused after each, whether it is after the app read
    them all, what was sent and what the app got."""
    app = _HeldApp()
    server, state, port = await _serve(app)
    sent = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    paused = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/", compression=None) as client:
        await _until(lambda: len(state.connections) == 1)
        (protocol,) = state.connections
        for i, message in enumerate(sent):
            await client.send(message)
            await _until(lambda i=i: protocol.queue.qsize() >= i + 1 or protocol.read_paused)
            paused.append(protocol.read_paused)
            if protocol.read_paused:
                break
        app.release.set()
        rest = sent[len(paused) :]
        for message in rest:
            await client.send(message)
        await _until(lambda: len(app.received) == len(sent))
        resumed = not protocol.read_paused
    await asyncio.wait_for(app.done.wait(), 5)
    server.close()
    await server.wait_closed()
    return paused, resumed, sent, app.received


def test_small_messages_pause_reading_only_at_the_high_water_mark() -> None:
    sizes = [1000] * (HIGH_WATER_MESSAGES + 3)
    paused, resumed, sent, received = asyncio.run(_flow(sizes))
    # uvicorn's own protocol pauses after the first message.
    assert paused == [False] * (HIGH_WATER_MESSAGES - 1) + [True]
    assert resumed
    assert received == sent  # every byte, in order


def test_bytes_past_the_mark_pause_reading_at_once() -> None:
    sizes = [HIGH_WATER_BYTES + 1, 10, 10]
    paused, resumed, sent, received = asyncio.run(_flow(sizes))
    assert paused == [True]
    assert resumed
    assert received == sent
