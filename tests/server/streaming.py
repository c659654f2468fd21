"""Helpers to drive the runtime like clients do: random chunk sizes, random
start times and pauses, outputs collected by offset."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from server.runtime import Ended, Output, StreamHandle


async def drive(
    open_session: Any,
    x: np.ndarray,
    rng: np.random.Generator,
    max_chunk: int,
    out_shape: tuple[int, ...],
    max_pause_s: float = 0.002,
) -> tuple[np.ndarray, Ended]:
    """Streams `x` in random chunks through a new session; returns the output
    frames (checked contiguous by offset) and the `Ended` record."""
    await asyncio.sleep(float(rng.uniform(0, 0.01)))
    session: StreamHandle = open_session()
    outputs: list[np.ndarray] = []

    async def read() -> Ended:
        received = 0
        async for item in session.outputs():
            if isinstance(item, Output):
                assert item.offset == received, (item.offset, received)
                received += item.frames.shape[0]
                outputs.append(item.frames)
            else:
                return item
        raise AssertionError("outputs ended without Ended")

    reader = asyncio.create_task(read())
    i = 0
    while i < len(x):
        n = int(rng.integers(1, max_chunk + 1))
        session.send(x[i : i + n])
        i += n
        if rng.uniform() < 0.5:
            await asyncio.sleep(float(rng.uniform(0, max_pause_s)))
    session.end()
    ended = await asyncio.wait_for(reader, timeout=120)
    y = np.concatenate(outputs) if outputs else np.zeros((0, *out_shape), np.float32)
    return y, ended
