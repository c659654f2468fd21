"""`sl-loadtest`: N concurrent streams against a running server.

    sl-loadtest --url grpc://127.0.0.1:50051 --model demo-asr --streams 32 --duration 30
    sl-loadtest --url ws://127.0.0.1:8080 --model demo-asr --capacity --target-p99-ms 100

Each stream sends an utterance in `--chunk-ms` chunks, paced in real time
(or as fast as possible with --fast), then ends it and starts the next, until
`--duration` is over; streams start spread over `--ramp-up` seconds.

Chunk latency: chunk k, sent at t_k and bringing the stream to F_k input
frames, is answered when the outputs that F_k frames make possible have
arrived (floor(F_k * output_ratio) - output_latency valid frames, after the
server's chunking). Reported: throughput (audio s per s), real-time factor,
chunk latency p50/p90/p99/max, first-output latency, errors by code, as JSON;
`--plot` draws latency percentiles and throughput against concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import math
import random
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any

import numpy as np
import websockets

from clients.client import Ended, Output, Started, StreamingError, aconnect
from loadtests.wsload import LeanClient, Plan, frames_answering, lean_url

# gRPC's connection backoff (grpc/grpc doc/connection-backoff.md).
_INITIAL_BACKOFF_S = 1.0
_BACKOFF_MULTIPLIER = 1.6
_BACKOFF_JITTER = 0.2
_MAX_BACKOFF_S = 120.0


@dataclasses.dataclass
class StreamResult:
    chunk_latencies: list[float]
    first_output: float | None
    audio_seconds: float
    wall_seconds: float
    error: str | None = None
    # Audio seconds sent before the run's window closed (None: all of it).
    audio_in_window: float | None = None


@dataclasses.dataclass
class RunStats:
    streams: int
    results: list[StreamResult]
    # Seconds from the first stream's start until the last utterance ended:
    # the window, then the tail of the utterances that were running at its end.
    duration: float
    # Seconds in which streams started utterances (`--duration`); None: `duration`.
    window: float | None = None

    def summary(self) -> dict[str, Any]:
        lat = np.array([x for r in self.results for x in r.chunk_latencies]) * 1000
        first = (
            np.array([r.first_output for r in self.results if r.first_output is not None]) * 1000
        )
        ok = [r for r in self.results if r.error is None]
        # Served audio only: a refused or failed utterance was not served,
        # and counting it would show overload as throughput.
        # Audio sent within the run's window, over the window's length.
        # Utterances that start before it closes run on past it: over the
        # window, all of their audio overstated the rate by up to 1.2x (8 s
        # utterances, 20 s runs); the window's audio over the whole run,
        # window and tail, understated it by 1.3x.
        audio = sum(r.audio_seconds if r.audio_in_window is None else r.audio_in_window for r in ok)
        window = self.window if self.window is not None else self.duration
        refused = sum(1 for r in self.results if r.error == "RESOURCE_EXHAUSTED")
        pct = lambda a, q: round(float(np.percentile(a, q)), 2) if a.size else None
        return {
            "streams": self.streams,
            "utterances": len(self.results),
            "utterances_ok": len(ok),
            "errors": dict(Counter(r.error for r in self.results if r.error)),
            # Streams refused at admission (RESOURCE_EXHAUSTED): the server
            # protecting the streams it has, not a failure of theirs.
            "refused": refused,
            "throughput_audio_s_per_s": round(audio / window, 2),
            "real_time_factor": round(
                float(np.mean([r.wall_seconds / r.audio_seconds for r in ok if r.audio_seconds])), 3
            )
            if ok
            else None,
            "chunk_latency_ms": {
                "count": int(lat.size),
                "p50": pct(lat, 50),
                "p90": pct(lat, 90),
                "p99": pct(lat, 99),
                "max": round(float(lat.max()), 2) if lat.size else None,
            },
            "first_output_ms": {"p50": pct(first, 50), "p99": pct(first, 99)},
        }


async def one_utterance(
    client: Any,
    args: argparse.Namespace,
    info: dict[str, Any],
    audio: np.ndarray,
    window_end: float = math.inf,
) -> StreamResult:
    rate = info["sample_rate"] or 100
    chunk = max(1, int(rate * args.chunk_ms / 1000))
    pending: list[tuple[int, float]] = []  # (output frames needed, time sent)
    latencies: list[float] = []
    start = time.monotonic()
    in_window = 0  # samples sent before `window_end`

    async def chunks() -> AsyncIterator[np.ndarray]:
        nonlocal in_window
        sent = 0
        for i in range(0, len(audio), chunk):
            if not args.fast:
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            piece = audio[i : i + chunk]
            sent += len(piece)
            needed = frames_answering(sent, info, args.server_chunk_blocks)
            now = time.monotonic()
            if needed > 0:
                pending.append((needed, now))
            if now < window_end:
                in_window += len(piece)
            yield piece

    received = 0
    first = None
    try:
        async for event in client.stream(args.model, chunks()):
            now = time.monotonic()
            if isinstance(event, Output):
                if first is None:
                    first = now - start
                received += event.frames.shape[0]
                while pending and pending[0][0] <= received:
                    latencies.append(now - pending.pop(0)[1])
            elif isinstance(event, (Started, Ended)):
                continue
    except StreamingError as e:
        return StreamResult(latencies, first, len(audio) / rate, time.monotonic() - start, e.code)
    except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as e:
        # A server too loaded to accept the connection: an error of the run, not a crash.
        elapsed = time.monotonic() - start
        return StreamResult(latencies, first, len(audio) / rate, elapsed, type(e).__name__)
    elapsed = time.monotonic() - start
    return StreamResult(latencies, first, len(audio) / rate, elapsed, None, in_window / rate)


def lean_client(
    args: argparse.Namespace, info: dict[str, Any], audio: np.ndarray, rate: int
) -> LeanClient | None:
    """The run's lean WebSocket streams (loadtests/wsload.py), or None where
    the run goes through `clients.client`: `--client full`, or gRPC."""
    if args.client != "lean" or not lean_url(args.url):
        return None
    chunk = max(1, int(rate * args.chunk_ms / 1000))
    plan = Plan(audio, rate, chunk, info, args.server_chunk_blocks, args.fast)
    context = ssl.create_default_context(cafile=args.ca_cert) if args.ca_cert else None
    return LeanClient(args.url, args.model, plan, api_key=args.api_key, ssl_context=context)


async def run_load(
    args: argparse.Namespace,
    streams: int,
    progress: bool = True,
    at_window_end: Callable[[], None] | None = None,
) -> RunStats:
    """`streams` workers starting utterances for `args.duration` seconds;
    `at_window_end` is called when that window closes (bench_e2e reads the
    server's CPU there, over the same seconds as the served audio)."""
    # What exists now lives through the run: frozen, the collector's full
    # passes skip it. In a process that also holds JAX and compiled models
    # (loadtests/bench_e2e.py), a full pass stalled this event loop for
    # 90+ ms, and every stream's chunk latency with it.
    gc.collect()
    gc.freeze()
    client = aconnect(args.url, api_key=args.api_key, ca_cert=args.ca_cert)
    models = await client.list_models()
    info = next((m for m in models if m["name"] == args.model), None)
    if info is None:
        raise SystemExit(
            f"model {args.model!r} not served; available: {[m['name'] for m in models]}"
        )
    rate = info["sample_rate"] or 100
    rng = np.random.default_rng(0)
    shape = tuple(info["input_shape"])
    audio = (rng.normal(size=(int(args.utterance_s * rate), *shape)) * 0.1).astype(np.float32)
    lean = lean_client(args, info, audio, rate)
    results: list[StreamResult] = []
    running = 0  # utterances started and not yet ended, for the progress line
    start = time.monotonic()
    end = start + args.duration

    async def utterance() -> StreamResult:
        if lean is None:
            return await one_utterance(client, args, info, audio, end)
        latencies, first, error, in_window, audio_s, wall = await lean.utterance(end)
        return StreamResult(
            latencies, first, audio_s, wall, error, None if error else in_window / rate
        )

    async def worker(index: int) -> None:
        nonlocal running
        await asyncio.sleep(args.ramp_up * index / max(streams, 1))
        backoff = random.Random(index)
        failures = 0
        while time.monotonic() < end:
            running += 1
            try:
                result = await utterance()
            finally:
                running -= 1
            results.append(result)
            if not result.error:
                failures = 0
                continue
            # A refused client backs off as gRPC's connection backoff
            # specifies (doc/connection-backoff.md: 1 s, x1.6 a failure,
            # +-20% jitter, at most 120 s), the way clients built on gRPC
            # behave. Retrying after 0.25 s doubling to 4 s, 1,000 clients
            # over capacity reconnected ~475 times a second; each refusal
            # costs the server ~0.45 ms of CPU and this process as much, so
            # at 2x capacity the served rate fell to 0.8 of its peak.
            failures += 1
            delay = min(_MAX_BACKOFF_S, _INITIAL_BACKOFF_S * _BACKOFF_MULTIPLIER ** (failures - 1))
            delay *= backoff.uniform(1 - _BACKOFF_JITTER, 1 + _BACKOFF_JITTER)
            await asyncio.sleep(min(delay, max(0.0, end - time.monotonic())))  # not past the run

    async def report() -> None:
        while True:
            await asyncio.sleep(1.0)
            lat = [x for r in results for x in r.chunk_latencies]
            p99 = np.percentile(lat, 99) * 1000 if lat else float("nan")
            errors = sum(1 for r in results if r.error)
            # Utterances end only after their audio (8 s in bench_e2e):
            # `running` shows the streams at work before the first one ends.
            print(
                f"\r[{time.monotonic() - start:5.1f}s] streams {streams} running {running} "
                f"utterances {len(results)} errors {errors} chunk p99 {p99:7.1f} ms",
                end="",
                file=sys.stderr,
            )

    async def window_closed(call: Callable[[], None]) -> None:
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        call()

    reporter = asyncio.create_task(report()) if progress else None
    closer = asyncio.create_task(window_closed(at_window_end)) if at_window_end else None
    await asyncio.gather(*(worker(i) for i in range(streams)))
    if closer:
        await closer  # workers return only once the window is over
    if reporter:
        reporter.cancel()
        print("", file=sys.stderr)
    await client.close()
    return RunStats(streams, results, time.monotonic() - start, args.duration)


def capacity_search(first: int, most: int) -> Generator[int, bool, int]:
    """The stream counts to probe, as a generator: send each probe's outcome
    (True: held the target); returns the largest count that held. Doubling,
    then bisection to within 10%. A generator so that two servers' searches
    can take turns (bench_vad) and a slow spell hits both."""
    lo, hi = 0, min(first, most)
    while (yield hi):
        lo = hi
        if hi >= most:
            return lo
        hi = min(hi * 2, most)  # the last doubling probes `most` itself
    while hi - lo > max(1, lo // 10):
        mid = (lo + hi) // 2
        if (yield mid):
            lo = mid
        else:
            hi = mid
    return lo


async def probe(args: argparse.Namespace, n: int, sweep: list[dict[str, Any]]) -> bool:
    """One load run of `n` streams: whether p99 stayed under the target with
    no errors (its summary goes to `sweep`)."""
    summary = (await run_load(args, n)).summary()
    sweep.append(summary)
    p99 = summary["chunk_latency_ms"]["p99"]
    good = not summary["errors"] and p99 is not None and p99 < args.target_p99_ms
    print(
        f"streams {n}: p99 {p99} ms errors {summary['errors']} -> {'ok' if good else 'over'}",
        file=sys.stderr,
    )
    return good


async def find_capacity(args: argparse.Namespace) -> tuple[int, list[dict[str, Any]]]:
    """Largest stream count whose p99 chunk latency stays under the target
    with no errors: doubling, then bisection."""
    sweep: list[dict[str, Any]] = []
    search = capacity_search(args.streams, args.max_streams)
    n = next(search)
    try:
        while True:
            n = search.send(await probe(args, n, sweep))
    except StopIteration as done:
        return int(done.value), sweep


def plot(sweep: list[dict[str, Any]], path: str, target: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted(sweep, key=lambda s: s["streams"])
    n = [s["streams"] for s in sweep]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for q in ("p50", "p90", "p99"):
        ax1.plot(n, [s["chunk_latency_ms"][q] for s in sweep], marker="o", label=q)
    if target:
        ax1.axhline(target, color="red", linestyle="--", label=f"target {target:g} ms")
    ax1.set(xlabel="concurrent streams", ylabel="chunk latency (ms)", title="Chunk latency")
    ax1.legend()
    ax2.plot(n, [s["throughput_audio_s_per_s"] for s in sweep], marker="o")
    ax2.set(xlabel="concurrent streams", ylabel="audio seconds per second", title="Throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sl-loadtest", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="grpc://HOST:PORT or ws://HOST:PORT")
    p.add_argument("--model", default="demo-asr")
    p.add_argument("--streams", type=int, default=8, help="concurrency (capacity: first probe)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    p.add_argument("--ramp-up", type=float, default=2.0)
    p.add_argument("--chunk-ms", type=float, default=160.0)
    p.add_argument("--utterance-s", type=float, default=4.0)
    p.add_argument("--server-chunk-blocks", type=int, default=1, help="the server's --chunk-blocks")
    p.add_argument("--fast", action="store_true", help="send as fast as possible, not real time")
    p.add_argument(
        "--client",
        choices=("lean", "full"),
        default="lean",
        help="ws:// streams: 'lean' speaks the protocol on a bare asyncio protocol and takes "
        "~1/3 of the CPU (loadtests/wsload.py); 'full' goes through clients.client and follows "
        "moves. gRPC always uses clients.client",
    )
    p.add_argument("--capacity", action="store_true", help="find the largest stream count")
    p.add_argument("--target-p99-ms", type=float, default=100.0)
    p.add_argument("--max-streams", type=int, default=4096)
    p.add_argument("--api-key", default=None)
    p.add_argument("--ca-cert", default=None, help="PEM certificate to trust (grpcs://, wss://)")
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    args = p.parse_args(argv)

    try:
        return _run_and_report(args)
    except (StreamingError, OSError) as e:  # no traceback for a server we cannot use
        print(f"sl-loadtest: {args.url}: {e}", file=sys.stderr)
        return 1


def _run_and_report(args: argparse.Namespace) -> int:
    if args.capacity:
        capacity, sweep = asyncio.run(find_capacity(args))
        result: dict[str, Any] = {
            "model": args.model,
            "url": args.url,
            "target_p99_ms": args.target_p99_ms,
            "capacity_streams": capacity,
            "sweep": sweep,
        }
    else:
        stats = asyncio.run(run_load(args, args.streams))
        sweep = [stats.summary()]
        result = {"model": args.model, "url": args.url, **sweep[0]}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        plot(sweep, args.plot, args.target_p99_ms if args.capacity else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
