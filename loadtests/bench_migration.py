"""Stream migration figures (issue 18): two real `sl-serve` processes that
share a resume key; N real-time streams on the first; SIGTERM it; every
stream moves to the second. Prints JSON:

- `drain_to_all_resumed_s`: from SIGTERM until the last stream resumed on
  the second server, less `--drain-seconds` (the grace period streams get
  to finish before they move);
- `moved_gap_ms`: per stream, the gap between the last output before the
  move and the first after it, next to `normal_gap_ms` (p50 of the gaps
  between outputs otherwise): the latency the move adds to its chunk.

    python -m loadtests.bench_migration [--model demo-asr] [--streams 16]

A figure, not a test: on a shared 2-core machine the servers, the clients
and the compile all compete.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from clients.client import AsyncGrpcClient, Moved, Output
from server.defaults import BUILTIN_MODELS
from tests.server.serving import ServerProcess


async def _paced(x: np.ndarray, frames: int, period_s: float) -> AsyncIterator[np.ndarray]:
    start = time.monotonic()
    for i in range(0, len(x), frames):
        await asyncio.sleep(max(0.0, start + (i // frames) * period_s - time.monotonic()))
        yield x[i : i + frames]


async def _stream(client: AsyncGrpcClient, model: str, x: np.ndarray, chunk: int, period: float):  # type: ignore[no-untyped-def]
    times: list[float] = []
    moved_at: float | None = None
    moved_index = 0
    async for event in client.stream(model, _paced(x, chunk, period), report_moves=True):
        if isinstance(event, Output):
            times.append(time.monotonic())
        elif isinstance(event, Moved):
            moved_at, moved_index = time.monotonic(), len(times)
    return times, moved_at, moved_index


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo-asr")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0, help="audio per stream")
    p.add_argument("--drain-seconds", type=float, default=0.5)
    a = p.parse_args()
    model = BUILTIN_MODELS[a.model]()
    rate = model.sample_rate or 100
    chunk = max(model.block_size, rate // 50)  # ~20 ms a message
    period = chunk / rate
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "keys"
        key_file.write_text("m" * 64 + "\n")
        args = [
            "--model",
            a.model,
            "--resume-key-file",
            str(key_file),
            "--max-streams",
            str(a.streams),
            "--drain-seconds",
            str(a.drain_seconds),
        ]
        source = ServerProcess(args)
        target = ServerProcess(args)
        try:
            rng = np.random.default_rng(0)
            n = int(a.seconds * rate)
            inputs = [
                (rng.normal(size=(n, *model.input_shape)) * 0.1).astype(np.float32)
                for _ in range(a.streams)
            ]

            async def run() -> tuple[list[Any], float]:
                client = AsyncGrpcClient([source.grpc_target, target.grpc_target])
                tasks = [
                    asyncio.create_task(_stream(client, a.model, x, chunk, period)) for x in inputs
                ]
                await asyncio.sleep(a.seconds / 2)
                sigterm = time.monotonic()
                source.proc.send_signal(signal.SIGTERM)
                results = await asyncio.gather(*tasks)
                await client.close()
                return results, sigterm

            results, sigterm = asyncio.run(run())
        finally:
            for server in (source, target):
                if server.proc.poll() is None:
                    server.terminate()
    moved = [r for r in results if r[1] is not None]
    gaps, normal = [], []
    for times, _, index in moved:
        diffs = np.diff(times) * 1000
        if 0 < index < len(times):
            gaps.append(float(diffs[index - 1]))
        normal += [d for i, d in enumerate(diffs) if i != index - 1]
    print(
        json.dumps(
            {
                "model": a.model,
                "streams": a.streams,
                "moved": len(moved),
                "drain_to_all_resumed_s": max(m[1] for m in moved) - sigterm - a.drain_seconds
                if moved
                else None,
                "moved_gap_ms_p50": float(np.median(gaps)) if gaps else None,
                "moved_gap_ms_max": max(gaps) if gaps else None,
                "normal_gap_ms_p50": float(np.median(normal)) if normal else None,
            }
        )
    )


if __name__ == "__main__":
    main()
