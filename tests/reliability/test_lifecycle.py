"""Streams that end badly: random open/abort/disconnect cycles on both doors,
a client killed mid-stream, and a client that stops reading. Each must leave
no slot occupied and the server serving everyone else."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import websockets

from clients.client import AsyncGrpcClient, chunked, collect
from protos import streaming_pb2 as pb
from protos import streaming_pb2_grpc as pb_grpc
from tests.reliability.conftest import metric, rss_bytes
from tests.server.serving import ServerProcess

pytestmark = pytest.mark.e2e  # starts server processes: not in `make test-fast`

WAVE = (np.random.default_rng(0).normal(size=(16000, 1)) * 0.1).astype(np.float32)


def wait_for_idle(server: ServerProcess, timeout: float = 10.0) -> float:
    """Seconds until sl_streams_active reaches 0 (raises if it does not)."""
    start = time.monotonic()
    while metric(server, "sl_streams_active") > 0:
        assert time.monotonic() - start < timeout, "streams still active"
        time.sleep(0.05)
    return time.monotonic() - start


async def _grpc_cycle(stub: pb_grpc.StreamingInferenceStub, rng: np.random.Generator) -> None:
    mode = int(rng.integers(0, 3))

    async def requests():  # type: ignore[no-untyped-def]
        yield pb.StreamRequest(config=pb.StreamConfig(model="logmel"))
        if mode >= 1:
            data = WAVE[: int(rng.integers(1, 3000))]
            yield pb.StreamRequest(
                chunk=pb.Tensor(shape=list(data.shape), dtype=pb.FLOAT32, data=data.tobytes())
            )
        await asyncio.sleep(10)

    call = stub.Stream(requests())
    try:
        await call.read()  # started
        if mode == 2:
            await asyncio.sleep(float(rng.uniform(0, 0.01)))
    except grpc.aio.AioRpcError:
        pass  # refused when all slots are briefly taken: also a valid cycle
    call.cancel()


async def _ws_cycle(url: str, rng: np.random.Generator) -> None:
    try:
        ws = await websockets.connect(url)
    except OSError:
        return
    try:
        await ws.recv()
        if rng.uniform() < 0.6:
            await ws.send(WAVE[: int(rng.integers(1, 3000))].tobytes())
        if rng.uniform() < 0.5:
            # Abrupt: drop the TCP connection without a close handshake.
            ws.transport.abort()
            return
    finally:
        if ws.transport and not ws.transport.is_closing():
            await ws.close()


def test_open_abort_disconnect_cycles_leave_no_slot_and_flat_memory(
    server: ServerProcess, soak: bool
) -> None:
    cycles = 5000 if soak else 600
    url = f"{server.ws_url}/v1/models/logmel/stream"

    async def run(n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.StreamingInferenceStub(channel)
            sem = asyncio.Semaphore(6)

            async def one(i: int) -> None:
                async with sem:
                    if i % 2:
                        await _grpc_cycle(stub, rng)
                    else:
                        await _ws_cycle(url, rng)

            await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(run(200, 1))  # warm-up: allocator and caches settle
    wait_for_idle(server)
    before = rss_bytes(server)
    asyncio.run(run(cycles, 2))
    wait_for_idle(server)
    after = rss_bytes(server)
    assert metric(server, "sl_streams_active") == 0
    assert after - before < 50 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MB"

    # Still serving correctly afterwards.
    async def check() -> np.ndarray:
        async with AsyncGrpcClient(server.grpc_target) as client:
            return await client.infer("logmel", WAVE)

    y = asyncio.run(check())
    assert y.shape[1] == 80 and np.all(np.isfinite(y))


CLIENT = """
import asyncio, sys, numpy as np
from clients.client import aconnect
async def main():
    client = aconnect(sys.argv[1])
    async def chunks():
        while True:
            yield np.zeros((640, 1), np.float32)
            await asyncio.sleep(0.02)
    async for event in client.stream("logmel", chunks()):
        print("event", flush=True)
asyncio.run(main())
"""


def test_killed_client_frees_its_slot_at_once(server: ServerProcess) -> None:
    wait_for_idle(server)
    for url in (f"grpc://{server.grpc_target}", server.ws_url):
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, url],
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.getcwd(),
        )
        assert proc.stdout is not None
        for _ in range(3):  # streaming for real
            assert proc.stdout.readline().startswith("event")
        assert metric(server, "sl_streams_active") == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert wait_for_idle(server, timeout=5.0) < 5.0


def test_slow_consumer_is_bounded_and_ended(server: ServerProcess) -> None:
    wait_for_idle(server)
    errors_before = metric(server, "sl_streams_total", outcome="error")

    async def main() -> tuple[np.ndarray | None, str]:
        client = AsyncGrpcClient(server.grpc_target)
        healthy = asyncio.create_task(collect(client.stream("logmel", chunked(WAVE, 800))))
        async with websockets.connect(f"{server.ws_url}/v1/models/logmel/stream") as ws:
            json.loads(await ws.recv())

            async def flood() -> None:
                # Up to 5 minutes of audio, never reading: outputs pile up in
                # the server until backpressure (or the input limit) ends it.
                second = np.zeros((16000, 1), np.float32).tobytes()
                for _ in range(300):
                    try:
                        await asyncio.wait_for(ws.send(second), timeout=2)
                    except (TimeoutError, websockets.ConnectionClosed):
                        return

            sender = asyncio.create_task(flood())
            deadline = time.monotonic() + 30
            while metric(server, "sl_streams_total", outcome="error") == errors_before:
                assert time.monotonic() < deadline, "slow consumer was never ended"
                await asyncio.sleep(0.1)
            rss = rss_bytes(server)
            sender.cancel()
            # Reading now finds the outputs sent before the limit, then the error.
            code = ""
            try:
                async for message in ws:
                    if isinstance(message, str) and json.loads(message)["type"] == "error":
                        code = json.loads(message)["code"]
            except websockets.ConnectionClosed:
                pass  # closed with the error's code (1013), after the error message
            assert rss < 4 * 2**30
        y, _ = await healthy
        await client.close()
        return y, code

    y, code = asyncio.run(main())
    assert code == "RESOURCE_EXHAUSTED"
    assert y is not None and y.shape[1] == 80
    wait_for_idle(server)
