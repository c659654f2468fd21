"""End to end against the bare step, in one run on one machine: how much of
its own compute ceiling the served system delivers, with the load generator
on the same cores.

1. The bare jitted step (no server, state donated, outputs fetched each
   step, as the server does) at batch 8, 16, 32...: audio seconds per
   second and CPU seconds per audio second. The ceiling is the best of them;
   `C` = the ceiling in real-time streams.
2. A real `sl-serve` (its own process), driven by `sl-loadtest`'s generator
   (real-time streams, `--chunk-ms` chunks, this process):
   (a) saturation: 1.5 C streams offered. Served audio s/s over the bare
       step's at the mean batch the server actually ran (from its
       `sl_tick_batch_size`), and the server process's CPU s per audio s.
   (b) overload: 2 C offered; served audio s/s over (a)'s at C offered.
   (c) real-time capacity: the most streams with chunk p99 < `--target-p99-ms`
       (no errors; refusals count as errors), over C.
3. The bare step again at the batch the server ran (the server stopped).

    .venv/bin/python -m loadtests.bench_e2e --model demo-asr --chunk-blocks 4 --door ws

Figures depend on the machine: compare ratios, and say which CPU (`lscpu`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from loadtests import loadtest
from loadtests.bench_runtime import bare_steps
from server.defaults import BUILTIN_MODELS
from server.model import ServableModel
from tests.server.serving import ServerProcess


def _stat_cpu_seconds(stat: str) -> float:
    """utime + stime, in seconds, from the text of a /proc `stat` file."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads, ended ones included)."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat").read_text())


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of a `sl-serve` process by thread group: `xla` (XLA's
    compute pool, threads named tf_*), `event_loop` (the main thread: both
    doors), `tick` (the engines' tick threads, sl-tick-*) and `other`."""
    out = dict.fromkeys(("xla", "event_loop", "tick", "other"), 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # a thread that ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        seconds = _stat_cpu_seconds(stat)
        if task.name == str(pid):
            group = "event_loop"
        elif name.startswith("tf_"):
            group = "xla"
        elif name.startswith("sl-tick"):
            group = "tick"
        else:
            group = "other"
        out[group] += seconds
    return out


def bare(model: ServableModel, batch: int, chunk: int, steps: int) -> dict[str, float]:
    """Audio s/s and CPU s per audio s of the bare step at `batch`."""
    bare_steps(model, batch, chunk, 3)  # compile and warm
    cpu = time.process_time()
    times = bare_steps(model, batch, chunk, steps)
    cpu = time.process_time() - cpu
    audio = batch * chunk / model.sample_rate
    return {
        "batch": batch,
        "step_ms_p50": round(statistics.median(times) * 1000, 3),
        "audio_s_per_s": round(audio / statistics.median(times), 1),
        "cpu_s_per_audio_s": round(cpu / (audio * steps), 4),
    }


class Server(ServerProcess):
    """A real `sl-serve` process serving one model (its output is read
    continuously: an unread pipe would block the server's logging)."""

    def __init__(self, args: argparse.Namespace, max_streams: int, buckets: list[int]) -> None:
        super().__init__(
            [
                "--model",
                args.model,
                "--chunk-blocks",
                str(args.chunk_blocks),
                "--max-streams",
                str(max_streams),
                "--buckets",
                ",".join(map(str, buckets)),
                *args.server_arg,
            ]
        )

    def url(self, path: str) -> str:
        return f"{self.http_url}{path}"

    def stream_url(self, door: str) -> str:
        return f"grpc://{self.grpc_target}" if door == "grpc" else self.ws_url

    def metrics_text(self) -> str:
        """`/metrics` now. An overloaded server can be slow to answer (its
        event loop is busy with streams): retry."""
        for _ in range(4):
            try:
                return self._scrape()
            except OSError:
                time.sleep(5)
        return self._scrape()

    def _scrape(self) -> str:
        return urllib.request.urlopen(self.url("/metrics"), timeout=60).read().decode()

    def counters(self, model: str) -> dict[str, float]:
        """Counters a load run reads the change of: `batch_sum` and
        `batch_count` of `sl_tick_batch_size`, and `refused:REASON` for each
        admission rule that refused streams (`sl_streams_rejected_total`)."""
        return parse_counters(self.metrics_text(), model)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.terminate(timeout=30)


def parse_counters(text: str, model: str) -> dict[str, float]:
    """See `Server.counters`."""
    found = {}
    for kind in ("sum", "count"):
        m = re.search(rf'^sl_tick_batch_size_{kind}{{model="{model}"}} (\S+)$', text, re.M)
        found[f"batch_{kind}"] = float(m.group(1)) if m else 0.0
    pattern = rf'^sl_streams_rejected_total{{model="{model}",reason="(\w+)"}} (\S+)$'
    for reason, value in re.findall(pattern, text, re.M):
        found[f"refused:{reason}"] = float(value)
    return found


def refusals(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """Streams refused between two `Server.counters` readings, by reason."""
    return {
        k.partition(":")[2]: int(v - before.get(k, 0.0))
        for k, v in after.items()
        if k.startswith("refused:") and v > before.get(k, 0.0)
    }


def run(server: Server, args: argparse.Namespace, streams: int) -> dict[str, Any]:
    """One load run of `streams` real-time streams: the generator's summary,
    plus the server's CPU per served audio second and its mean batch."""
    pid = server.proc.pid
    counts0 = server.counters(args.model)
    cpu0, threads0, own0, wall0 = (
        _cpu_seconds(pid),
        thread_cpu_seconds(pid),
        time.process_time(),
        time.time(),
    )
    window: dict[str, Any] = {}

    def snapshot() -> None:
        window.update(
            cpu=_cpu_seconds(pid),
            threads=thread_cpu_seconds(pid),
            own=time.process_time(),
            wall=time.time(),
            counts=server.counters(args.model),
        )

    # The server's CPU and counters over the run's window, the seconds the
    # served audio is counted over; the tail of the utterances still running
    # when it closes (fewer streams, smaller ticks) is left out. Read on a
    # thread: the scrape would hold up the generator's event loop.
    reader = threading.Thread(target=snapshot)
    stats = asyncio.run(
        loadtest.run_load(args, streams, progress=False, at_window_end=reader.start)
    )
    reader.join()
    summary = stats.summary()
    counts1 = window["counts"]
    served = summary["throughput_audio_s_per_s"] * args.duration
    cpu = window["cpu"] - cpu0
    summary["server_cpu_s_per_audio_s"] = round(cpu / served, 4) if served else None
    # Where the cores went: the server's threads and this process (the
    # load generator), in cores over the window.
    wall = window["wall"] - wall0
    threads1 = window["threads"]
    summary["server_cores"] = {k: round((threads1[k] - threads0[k]) / wall, 3) for k in threads1}
    summary["generator_cores"] = round((window["own"] - own0) / wall, 3)
    ticks = counts1["batch_count"] - counts0["batch_count"]
    batch_sum = counts1["batch_sum"] - counts0["batch_sum"]
    summary["mean_batch"] = round(batch_sum / ticks, 2) if ticks else None
    # Which admission rule refused the streams the generator counts as refused.
    summary["refused_by_reason"] = refusals(counts0, counts1)
    lat = summary["chunk_latency_ms"]
    print(
        f"  {streams:4d} streams: {summary['throughput_audio_s_per_s']:7.1f} audio s/s, "
        f"p50 {lat['p50']} p99 {lat['p99']} ms, batch {summary['mean_batch']}, "
        f"refused {summary['refused']} {summary['refused_by_reason']}, errors "
        f"{summary['errors']}; cores: server "
        f"{summary['server_cores']}, generator {summary['generator_cores']}",
        file=sys.stderr,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo-asr", choices=sorted(BUILTIN_MODELS))
    p.add_argument("--chunk-blocks", type=int, default=4)
    p.add_argument("--chunk-ms", type=float, default=160.0)
    p.add_argument("--door", choices=("ws", "grpc"), default="ws")
    p.add_argument(
        "--client", choices=("lean", "full"), default="lean", help="sl-loadtest's --client"
    )
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load run")
    p.add_argument("--utterance-s", type=float, default=8.0)
    p.add_argument("--batches", default="8,16,32,64", help="bare-step batch sizes")
    p.add_argument("--steps", type=int, default=60, help="bare steps per batch size")
    p.add_argument("--target-p99-ms", type=float, default=100.0)
    p.add_argument("--server-arg", action="append", default=[], help="extra sl-serve argument")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    model = BUILTIN_MODELS[args.model]()
    chunk = args.chunk_blocks * model.block_size
    print(f"bare step, {args.model}, chunk {chunk} frames:", file=sys.stderr)
    ceiling = [bare(model, int(b), chunk, args.steps) for b in args.batches.split(",")]
    for row in ceiling:
        print(f"  {row}", file=sys.stderr)
    best = max(ceiling, key=lambda r: r["audio_s_per_s"])
    c = max(1, int(best["audio_s_per_s"]))

    # Load-generator settings `loadtest.run_load` reads.
    gen = argparse.Namespace(
        url="",
        model=args.model,
        duration=args.duration,
        ramp_up=2.0,
        chunk_ms=args.chunk_ms,
        utterance_s=args.utterance_s,
        server_chunk_blocks=args.chunk_blocks,
        fast=False,
        client=args.client,
        api_key=None,
        ca_cert=None,
        streams=max(1, c // 4),
        max_streams=2 * c,
        target_p99_ms=args.target_p99_ms,
    )
    # Slots for every stream offered (2 C), so what refuses the excess is the
    # runtime's admission by measured capacity, not the slot count. Buckets
    # stop doubling at 256: bigger ticks than that gain nothing on a CPU.
    slots = 2 * c + 8
    buckets = [b for b in (8, 16, 32, 64, 128, 256) if b < slots] + [slots]
    server = Server(args, slots, buckets)
    gen.url = server.stream_url(args.door)
    result: dict[str, Any] = {"model": args.model, "door": args.door, "bare": ceiling, "C": c}
    try:
        print(f"served (C = {c} real-time streams):", file=sys.stderr)
        run(server, gen, max(1, c // 4))  # warm-up: connections, first ticks
        at_c = run(server, gen, c)
        sat = run(server, gen, int(1.5 * c))
        over = run(server, gen, 2 * c)
        print("real-time capacity:", file=sys.stderr)
        before = server.counters(args.model)
        capacity, sweep = asyncio.run(loadtest.find_capacity(gen))
        probes_refused = refusals(before, server.counters(args.model))
        print(f"refused during the capacity search, by reason: {probes_refused}", file=sys.stderr)
    finally:
        server.stop()
    batch = max(1, round(sat["mean_batch"] or 1))
    at_batch = bare(model, batch, chunk, args.steps)
    print(f"bare step at the served batch: {at_batch}", file=sys.stderr)
    result.update(
        at_capacity=at_c,
        saturation=sat,
        overload=over,
        bare_at_served_batch=at_batch,
        realtime_capacity=capacity,
        capacity_search_refused_by_reason=probes_refused,
        sweep=sweep,
        a_served_over_bare=round(sat["throughput_audio_s_per_s"] / at_batch["audio_s_per_s"], 3),
        a_cpu_server_over_bare=(
            round(sat["server_cpu_s_per_audio_s"] / at_batch["cpu_s_per_audio_s"], 2)
            if sat["server_cpu_s_per_audio_s"]
            else None
        ),
        b_overload_over_capacity=round(
            over["throughput_audio_s_per_s"] / max(at_c["throughput_audio_s_per_s"], 1e-9), 3
        ),
        c_realtime_capacity_over_ceiling=round(capacity / c, 3),
    )
    keys = [k for k in result if k[:2] in ("a_", "b_", "c_")]
    print(json.dumps({k: result[k] for k in keys}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
