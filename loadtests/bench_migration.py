"""Stream migration figures (issue 18): two real `sl-serve` processes that
share a resume key; `--streams` real-time streams on the first and
`--resident` real-time streams on the second; SIGTERM the first; every
stream on it moves to the second while the residents keep running there.
Prints JSON, then the headline line:

- `drain_to_all_resumed_s`: from SIGTERM until the last stream resumed on
  the second server, less `--drain-seconds` (the grace period streams get
  to finish before they move);
- `moved_gap_ms`: per moved stream, the gap between the last output before
  the move and the first after it, next to `normal_gap_ms` (p50 of the gaps
  between outputs otherwise): the latency the move adds to its chunk;
- `resident`: the residents' chunk latency (chunk sent until the outputs it
  makes possible arrived, as `sl-loadtest` measures it) and gaps between
  outputs, before the SIGTERM, during the migration (from the SIGTERM to
  the last stream resumed, plus 1 s) and after it (every stream on the
  target: the load the migration leaves, without one going on), next to
  the servers' `--latency-budget-ms`: "migration under load: none of the
  residents is delayed past its budget" as a figure;
- `resident.*.server`: the same windows as the target measures them
  (`sl_chunk_latency_seconds`, chunk received until its outputs are
  written: the span the budget bounds). The residents use the other
  transport than the moving streams (`--resident-transport`), so the
  target's histogram of that transport holds the residents alone: the
  share of their chunks over the budget, and the histogram bucket that
  holds their p99.

    python -m loadtests.bench_migration [--model demo-asr] [--streams 64] [--resident 32]
        [--chunk-ms 20] [--chunk-blocks 1] [--json FILE]

A figure, not a test: on a shared 2-core machine the servers, the clients
and the compile all compete. The budget is the server's (chunk ready until
its outputs); client-side latency adds the client's and the sockets' share.
The server-side figures are read from `/metrics` every `_SCRAPE_S`, so
each window's edges are that coarse.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import math
import multiprocessing
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from clients.client import AsyncGrpcClient, AsyncWebSocketClient, Moved, Output
from server.defaults import BUILTIN_MODELS
from server.model import ModelInfo
from server.runtime import SchedulerConfig
from tests.server.serving import ServerProcess

# Resident outputs this soon after the start are start-up, not steady state.
_WARM_UP_S = 1.0
# The migration window ends this long after the last stream resumed.
_AFTER_RESUME_S = 1.0
# Width of a bin of the migration's timeline.
_BIN_S = 0.2
# How often the target's latency histogram is read: often enough for the
# windows' edges, seldom enough that rendering /metrics (on the event loop
# the residents' chunks go through) costs the target next to nothing.
_SCRAPE_S = 0.2
# Each door's `transport` label in `sl_chunk_latency_seconds`.
_LABEL = {"grpc": "grpc", "ws": "websocket"}


@dataclasses.dataclass
class StreamTimes:
    """One stream's outputs as its client saw them."""

    outputs: list[float] = dataclasses.field(default_factory=list)  # arrival times
    # (arrival time of the answer, chunk latency) per chunk answered.
    latencies: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    moved_at: float | None = None  # resumed on the other server (the client's `Moved`)
    moved_index: int = 0  # outputs before the move


async def _stream(
    client: AsyncGrpcClient | AsyncWebSocketClient,
    info: ModelInfo,
    x: np.ndarray,
    chunk: int,
    period: float,
    server_chunk: int,
) -> StreamTimes:
    """Streams `x` in real time; records outputs, chunk latencies and the
    move. `server_chunk`: the frames the server steps per tick."""
    times = StreamTimes()
    ratio = info.output_ratio
    pending: list[tuple[int, float]] = []  # (output frames needed, time sent)

    async def chunks() -> AsyncIterator[np.ndarray]:
        start = time.monotonic()
        sent = 0
        for i in range(0, len(x), chunk):
            await asyncio.sleep(max(0.0, start + (i // chunk) * period - time.monotonic()))
            piece = x[i : i + chunk]
            sent += len(piece)
            stepped = (sent // server_chunk) * server_chunk
            needed = math.floor(stepped * ratio) - info.output_latency
            if needed > 0:
                pending.append((needed, time.monotonic()))
            yield piece

    received = 0
    async for event in client.stream(info.name, chunks(), report_moves=True):
        now = time.monotonic()
        if isinstance(event, Output):
            times.outputs.append(now)
            received += event.frames.shape[0]
            while pending and pending[0][0] <= received:
                times.latencies.append((now, now - pending.pop(0)[1]))
        elif isinstance(event, Moved):
            times.moved_at, times.moved_index = now, len(times.outputs)
    return times


async def _residents(
    target: str,
    transport: str,
    info: ModelInfo,
    inputs: list[np.ndarray],
    chunk: int,
    period: float,
    server_chunk: int,
) -> list[StreamTimes]:
    """`target`: the target's gRPC address, or its ws:// URL."""
    client = AsyncGrpcClient(target) if transport == "grpc" else AsyncWebSocketClient(target)
    try:
        return list(
            await asyncio.gather(
                *(_stream(client, info, x, chunk, period, server_chunk) for x in inputs)
            )
        )
    finally:
        await client.close()


def _residents_main(conn: Connection, target: str, *args: Any) -> None:
    """The residents' client in its own process: sends its start time, then
    each stream's (outputs, latencies)."""
    conn.send(time.monotonic())  # CLOCK_MONOTONIC: one clock for both processes
    times = asyncio.run(_residents(target, *args))
    conn.send([(t.outputs, t.latencies) for t in times])


class _ResidentsApart:
    """`_residents` in a spawned process (jax and grpc are loaded here: no fork)."""

    def __init__(self, target: str, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_residents_main, args=(child, target, *args), daemon=True)
        self._proc.start()
        child.close()

    def started(self) -> float:
        if not self._conn.poll(120):
            raise RuntimeError("the residents' client process did not start")
        return float(self._conn.recv())

    def results(self) -> list[StreamTimes]:
        if not self._conn.poll(120):
            raise RuntimeError("the residents' client process did not finish")
        times = [StreamTimes(outputs=o, latencies=lat) for o, lat in self._conn.recv()]
        self._proc.join(10)
        return times


class _LatencyScraper:
    """Reads a server's `sl_chunk_latency_seconds` histogram of one model and
    transport every `_SCRAPE_S` on a thread: (time, cumulative count per
    bucket bound) snapshots, from which `window` takes any span's chunks."""

    def __init__(self, http_url: str, model: str, transport: str) -> None:
        self._url = http_url + "/metrics"
        self._labels = {"model": model, "transport": transport}
        self.snapshots: list[tuple[float, dict[float, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _read(self) -> dict[float, float]:
        text = urllib.request.urlopen(self._url, timeout=10).read().decode()
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "sl_chunk_latency_seconds":
                continue
            for sample in family.samples:
                labels = sample.labels
                if sample.name.endswith("_bucket") and all(
                    labels.get(k) == v for k, v in self._labels.items()
                ):
                    buckets[float(labels["le"])] = sample.value
        return buckets

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.snapshots.append((time.monotonic(), self._read()))
            except OSError:
                pass  # the server is not up yet, or has gone
            self._stop.wait(_SCRAPE_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def window(self, start: float, end: float, budget_ms: float) -> dict[str, Any]:
        """The chunks answered between the last snapshot at or before `start`
        and the first at or after `end`: how many, the share over the
        smallest bucket bound at or above the budget, and the bound of the
        bucket that holds the p99."""
        first = [c for t, c in self.snapshots if t <= start]
        last = [c for t, c in self.snapshots if t >= end]
        if not first or not last:
            return {"count": 0}
        a, b = first[-1], last[0]
        delta = {le: b.get(le, 0.0) - a.get(le, 0.0) for le in sorted(b)}
        total = delta.get(math.inf, 0.0)
        if not total:
            return {"count": 0}
        bound = min(le for le in delta if le * 1000 >= budget_ms)
        p99 = min(le for le, n in delta.items() if n >= 0.99 * total)
        return {
            "count": int(total),
            "over_ms": round(bound * 1000, 1),
            "share_over": round(1.0 - delta[bound] / total, 5),
            "p99_at_most_ms": None if math.isinf(p99) else round(p99 * 1000, 1),
        }


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    a = np.asarray(values) * 1000
    if not a.size:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    pct = lambda q: round(float(np.percentile(a, q)), 1)
    return {"count": int(a.size), "p50": pct(50), "p99": pct(99), "max": round(float(a.max()), 1)}


def _resident_figures(
    residents: list[StreamTimes], spans: dict[str, tuple[float, float]]
) -> dict[str, Any]:
    """Chunk latency and output gaps of the residents in each of `spans`
    (name: [start, end) of arrival times)."""
    figures: dict[str, Any] = {}
    for name, (t0, t1) in spans.items():
        latencies = [lat for r in residents for t, lat in r.latencies if t0 <= t < t1]
        gaps = [b - a for r in residents for a, b in itertools.pairwise(r.outputs) if t0 <= b < t1]
        figures[name] = {"latency_ms": _percentiles(latencies), "gap_ms": _percentiles(gaps)}
    return figures


def _timeline(
    residents: list[StreamTimes], moved: list[StreamTimes], sigterm: float, end: float
) -> list[dict[str, Any]]:
    """Per `_BIN_S` from the SIGTERM: the residents' worst chunk latency and
    how many moved streams resumed then, to tell which part of a migration
    (hand-off, resumes, catching up) delays the residents."""
    bins = []
    start = sigterm
    while start < end:
        stop = start + _BIN_S
        lat = [x for r in residents for t, x in r.latencies if start <= t < stop]
        bins.append(
            {
                "t_s": round(start - sigterm, 2),
                "resident_max_ms": round(1000 * max(lat), 1) if lat else None,
                "resumed": sum(
                    r.moved_at is not None and start <= r.moved_at < stop for r in moved
                ),
            }
        )
        start = stop
    return bins


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="demo-asr")
    p.add_argument("--streams", type=int, default=64, help="streams that move")
    p.add_argument(
        "--resident", type=int, default=32, help="streams that keep running on the target"
    )
    p.add_argument("--seconds", type=float, default=8.0, help="audio per moving stream")
    p.add_argument("--drain-seconds", type=float, default=0.5)
    p.add_argument(
        "--chunk-ms",
        type=float,
        default=20.0,
        help="audio per message (at least one block); fewer, larger messages cost the "
        "clients and the doors less CPU",
    )
    p.add_argument(
        "--chunk-blocks",
        type=int,
        default=1,
        help="both servers' --chunk-blocks (one output message per stream per tick: at 1 "
        "block, logmel's 10 ms, 96 streams are 9,600 output messages a second)",
    )
    p.add_argument(
        "--latency-budget-ms",
        type=float,
        default=SchedulerConfig().latency_budget_ms,
        help="both servers' --latency-budget-ms",
    )
    p.add_argument(
        "--residents-apart",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the residents' client in a process of its own: in the moving streams' "
        "process, its event loop also carries 64 tokens of ~0.5 MB in and out at the move, "
        "which delayed the residents' own sends and reads",
    )
    p.add_argument(
        "--resident-transport",
        choices=sorted(_LABEL),
        default="ws",
        help="the residents' transport; the moving streams use gRPC. With ws, the target's "
        "WebSocket latency histogram is the residents' alone",
    )
    p.add_argument(
        "--restore-bytes-per-tick",
        type=int,
        default=None,
        help="the target's --restore-bytes-per-tick (default: the server's)",
    )
    p.add_argument("--json", default=None, help="also write the report to this file")
    a = p.parse_args()
    model = BUILTIN_MODELS[a.model]()
    info = model.info(a.streams + a.resident)
    rate = model.sample_rate or 100
    server_chunk = model.block_size * a.chunk_blocks
    chunk = max(server_chunk, int(rate * a.chunk_ms / 1000))
    period = chunk / rate
    # Residents outlast the migration: SIGTERM comes at half the moving
    # streams' audio; moving takes seconds at most.
    resident_seconds = a.seconds + 4.0
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "keys"
        key_file.write_text("m" * 64 + "\n")
        common = [
            "--model",
            a.model,
            "--resume-key-file",
            str(key_file),
            "--drain-seconds",
            str(a.drain_seconds),
            "--latency-budget-ms",
            str(a.latency_budget_ms),
            "--chunk-blocks",
            str(a.chunk_blocks),
        ]
        source = ServerProcess([*common, "--max-streams", str(a.streams)])
        # Room for every moved stream next to the residents.
        restore = (
            []
            if a.restore_bytes_per_tick is None
            else ["--restore-bytes-per-tick", str(a.restore_bytes_per_tick)]
        )
        target = ServerProcess([*common, *restore, "--max-streams", str(a.streams + a.resident)])
        try:
            rng = np.random.default_rng(0)

            def audio(seconds: float) -> np.ndarray:
                shape = (int(seconds * rate), *model.input_shape)
                return (rng.normal(size=shape) * 0.1).astype(np.float32)

            moving_inputs = [audio(a.seconds) for _ in range(a.streams)]
            resident_inputs = [audio(resident_seconds) for _ in range(a.resident)]

            async def run() -> tuple[list[StreamTimes], list[StreamTimes], float, float]:
                movers = AsyncGrpcClient([source.grpc_target, target.grpc_target])
                url = target.grpc_target if a.resident_transport == "grpc" else target.ws_url
                resident_args = (
                    url,
                    a.resident_transport,
                    info,
                    resident_inputs,
                    chunk,
                    period,
                    server_chunk,
                )
                if a.residents_apart:
                    apart = _ResidentsApart(*resident_args)
                    started = await asyncio.to_thread(apart.started)
                else:
                    started = time.monotonic()
                    residents = asyncio.create_task(_residents(*resident_args))
                moving = [
                    asyncio.create_task(_stream(movers, info, x, chunk, period, server_chunk))
                    for x in moving_inputs
                ]
                await asyncio.sleep(a.seconds / 2)
                sigterm = time.monotonic()
                source.proc.send_signal(signal.SIGTERM)
                moved = await asyncio.gather(*moving)
                if a.residents_apart:
                    stayed = await asyncio.to_thread(apart.results)
                else:
                    stayed = await residents
                await movers.close()
                return moved, stayed, started, sigterm

            scraper = _LatencyScraper(target.http_url, a.model, _LABEL[a.resident_transport])
            try:
                moved_all, residents, started, sigterm = asyncio.run(run())
            finally:
                scraper.stop()
        finally:
            for server in (source, target):
                if server.proc.poll() is None:
                    server.terminate()
    moved = [r for r in moved_all if r.moved_at is not None]
    gaps, normal = [], []
    for r in moved:
        diffs = np.diff(r.outputs) * 1000
        if 0 < r.moved_index < len(r.outputs):
            gaps.append(float(diffs[r.moved_index - 1]))
        normal += [d for i, d in enumerate(diffs) if i != r.moved_index - 1]
    last_resumed = max((r.moved_at for r in moved if r.moved_at is not None), default=None)
    window_end = (last_resumed if last_resumed is not None else sigterm) + _AFTER_RESUME_S
    moved_end = min((r.outputs[-1] for r in moved if r.outputs), default=window_end)
    # After: until the first moved stream ends, so every stream is still on
    # the target: the same load without a migration going on, to tell the
    # migration's share from that of the load it brings.
    spans = {
        "before": (started + _WARM_UP_S, sigterm),
        "during": (sigterm, window_end),
        "after": (window_end, moved_end),
    }
    resident = _resident_figures(residents, spans)
    # gRPC residents share the histogram with the moved streams.
    if a.resident_transport == "ws":
        for name, (t0, t1) in spans.items():
            resident[name]["server"] = scraper.window(t0, t1, a.latency_budget_ms)
    report = {
        "timeline": _timeline(residents, moved, sigterm, window_end),
        "model": a.model,
        "chunk_ms": round(1000 * period, 1),
        "chunk_blocks": a.chunk_blocks,
        "streams": a.streams,
        "moved": len(moved),
        "drain_to_all_resumed_s": round(last_resumed - sigterm - a.drain_seconds, 3)
        if last_resumed is not None
        else None,
        "moved_gap_ms_p50": float(np.median(gaps)) if gaps else None,
        "moved_gap_ms_max": max(gaps) if gaps else None,
        "normal_gap_ms_p50": float(np.median(normal)) if normal else None,
        "resident": {
            "streams": a.resident,
            "latency_budget_ms": a.latency_budget_ms,
            "window_s": round(window_end - sigterm, 3),
            **resident,
        },
    }
    print(json.dumps(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    p99 = {k: resident[k]["latency_ms"]["p99"] for k in ("before", "during", "after")}
    print(
        f"resident p99 chunk latency during migration: {p99['during']} ms (before: "
        f"{p99['before']} ms, after, all streams on the target: {p99['after']} ms; "
        f"budget {a.latency_budget_ms:g} ms); {len(moved)}/{a.streams} moved, "
        f"{a.resident} resident"
    )
    if "server" in resident["during"]:
        server = {k: resident[k]["server"] for k in ("before", "during", "after")}
        print(
            "resident chunks over the budget, server-side: "
            + ", ".join(
                f"{k} {100 * v['share_over']:.2f}% of {v['count']} "
                f"(p99 <= {v['p99_at_most_ms']} ms)"
                if v.get("count")
                else f"{k} -"
                for k, v in server.items()
            )
        )


if __name__ == "__main__":
    main()
