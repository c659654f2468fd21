"""Helpers to drive the runtime like clients do: random chunk sizes, random
start times and pauses, outputs collected by offset."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import numpy as np

from server.runtime import Ended, Engine, Moved, Output, StreamHandle


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


async def move_and_resume(engine: Engine, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Stream migration on one engine standing for two replicas (it compiles
    once; its `resume_keys` must be set before `start`): `inputs[0]` moves
    after half its input, `inputs[1]` after all of it and `end`, with its
    latency flush planned. Both resume (the rest of their input sent) into
    slots other streams were reset and stepped in meanwhile, so only the
    tokens' state rows can give the right outputs. Returns each stream's
    output frames, checked contiguous by offset."""
    loop = asyncio.get_running_loop()
    outputs: list[dict[int, np.ndarray]] = [{} for _ in inputs]

    async def read(handle: StreamHandle, into: dict[int, np.ndarray]) -> object:
        async for item in handle.outputs():
            if isinstance(item, Output):
                into[item.offset] = item.frames
            elif isinstance(item, Ended | Moved):
                handle.cancel()
                return item
        raise AssertionError("outputs() stopped without Ended or Moved")

    sent = [len(inputs[0]) // 2, len(inputs[1])]
    handles = [engine.open_stream(loop) for _ in inputs]
    for handle, x, n in zip(handles, inputs, sent, strict=True):
        handle.send(x[:n])
    await asyncio.sleep(0.02)  # some ticks, far from all
    handles[1].end()
    engine.move_streams()
    moves = [await read(h, o) for h, o in zip(handles, outputs, strict=True)]
    for _ in inputs:  # reuse the freed slots
        filler = engine.open_stream(loop)
        filler.send(inputs[0][: engine.chunk_frames])
        filler.end()
        assert isinstance(await read(filler, {}), Ended)
    for x, moved, into, n in zip(inputs, moves, outputs, sent, strict=True):
        assert isinstance(moved, Moved) and moved.frames_received == n, moved
        resumed = engine.open_stream(loop, resume_token=moved.resume_token)
        if n < len(x):
            resumed.send(x[n:])
        resumed.end()
        assert isinstance(await read(resumed, into), Ended)
    joined = []
    for into in outputs:
        offsets = sorted(into)
        assert all(a + len(into[a]) == b for a, b in itertools.pairwise(offsets)), offsets
        joined.append(np.concatenate([into[k] for k in offsets]))
    return joined
