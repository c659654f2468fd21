"""Overload at 2x capacity: the excess is refused at once with
RESOURCE_EXHAUSTED, and admitted streams still get exactly their outputs.
(Latency under overload is a benchmark figure, printed here and reported by
sl-loadtest, not a timed assertion.)"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from clients.client import AsyncGrpcClient, StreamingError, chunked, collect
from server.defaults import logmel
from tests.server.serving import ServerProcess

pytestmark = pytest.mark.e2e  # starts server processes: not in `make test-fast`

WAVE = (np.random.default_rng(3).normal(size=(12800, 1)) * 0.1).astype(np.float32)


async def _paced(x: np.ndarray, chunk: int, period: float):  # type: ignore[no-untyped-def]
    for c in chunked(x, chunk):
        yield c
        await asyncio.sleep(period)


async def _stream(client: AsyncGrpcClient) -> tuple[str, float, np.ndarray | None]:
    start = time.monotonic()
    try:
        y, _ = await collect(client.stream("logmel", _paced(WAVE, 1280, 0.02)))
        return "ok", time.monotonic() - start, y
    except StreamingError as e:
        return e.code, time.monotonic() - start, None


def test_twice_capacity_refuses_excess_at_once(server: ServerProcess) -> None:
    async def main() -> list[tuple[str, float, np.ndarray | None]]:
        async with AsyncGrpcClient(server.grpc_target) as client:
            return await asyncio.gather(*(_stream(client) for _ in range(16)))

    results = asyncio.run(main())
    codes = sorted(code for code, _, _ in results)
    assert codes.count("ok") == 8 and codes.count("RESOURCE_EXHAUSTED") == 8, codes
    refused_after = [t for code, t, _ in results if code == "RESOURCE_EXHAUSTED"]
    assert max(refused_after) < 5.0  # refused on admission, not after queueing
    expected = logmel().offline(WAVE)
    for code, _, y in results:
        if code == "ok":
            np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    print(f"refusal took at most {max(refused_after) * 1000:.0f} ms")
