"""Soak: many WebSocket clients held open with pings, each sending a little
audio every second; none may drop. Bounded: 100 clients for 8 s;
--soak: 500 clients for 5 minutes."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import websockets

from tests.reliability.conftest import metric
from tests.server.serving import running_server

pytestmark = pytest.mark.e2e  # starts server processes: not in `make test-fast`


async def _client(url: str, until: float, stats: dict[str, int]) -> None:
    chunk = (np.random.default_rng(0).normal(size=(1600, 1)) * 0.1).astype(np.float32).tobytes()
    async with websockets.connect(url, ping_interval=5, ping_timeout=20) as ws:
        assert json.loads(await ws.recv())["type"] == "started"
        stats["connected"] += 1

        async def read() -> None:
            async for message in ws:
                if isinstance(message, bytes):
                    stats["outputs"] += 1
                elif json.loads(message)["type"] == "ended":
                    stats["ended"] += 1
                    return
                else:
                    stats["errors"] += 1
                    return

        reader = asyncio.create_task(read())
        while time.monotonic() < until:
            await ws.send(chunk)
            await asyncio.sleep(1.0)
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(reader, timeout=60)


def test_many_websocket_clients_held_without_drops(soak: bool) -> None:
    clients, seconds = (500, 300) if soak else (100, 8)
    with running_server(
        ["--model", "logmel", "--max-streams", str(clients), "--buckets", f"16,{clients}"]
    ) as server:
        url = f"{server.ws_url}/v1/models/logmel/stream"
        stats = {"connected": 0, "outputs": 0, "ended": 0, "errors": 0}

        async def main() -> None:
            until = time.monotonic() + seconds
            sem = asyncio.Semaphore(50)  # connect in waves, as real clients arrive

            async def one() -> None:
                async with sem:
                    pass
                await _client(url, until, stats)

            await asyncio.gather(*(one() for _ in range(clients)))

        asyncio.run(main())
        assert stats["connected"] == clients
        assert stats["ended"] == clients and stats["errors"] == 0, stats
        assert stats["outputs"] >= clients
        assert metric(server, "sl_streams_total", outcome="ok") == clients
