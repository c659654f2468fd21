"""Runtime benchmark: one model's Engine against the bare jitted step, in one run.

Figures, measured in the same process:
- server/raw: frames/s through the Engine at full occupancy (N streams,
  every chunk ready, full ticks back to back) over frames/s of the bare
  jitted batch-N step. --repeats pairs of runs (server then raw, or raw then
  server, alternating so that the machine's drift cancels within a pair);
  the median of the per-pair ratios, with quartiles and range.
- batched/sequential: the same N streams stepped one at a time at batch 1
  (bare step, so the most favourable sequential baseline) over the Engine.
- tick overhead under backlog: steady-state tick wall time (interval between
  consecutive full-occupancy ticks) minus the bare step's time, compared
  quantile by quantile (p50 with p50, p99 with p99), and the time the device
  sat idle waiting for the host between ticks (0 when the next tick was
  dispatched while the previous one was still running).
- paced tick overhead: every stream sends one chunk per period of three bare
  steps, so each tick starts with the device idle and its host work (staging
  the batch, routing the outputs) lies on every chunk's latency path. The
  scheduler's host time per tick, p50 and p99; the launch of the device call
  (which the bare step pays too) is reported apart.

    .venv/bin/python -m loadtests.bench_runtime --model demo-asr --streams 32 \
        --seconds 8 --chunk-blocks 4
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import statistics
import time
from typing import Any

import jax
import numpy as np

import sequence_layers as sl
from server.defaults import BUILTIN_MODELS
from server.model import ServableModel
from server.runtime import Ended, Engine, SchedulerConfig
from server.stats import TickStats


@functools.cache
def _jitted_step(layer: Any) -> Any:
    # One jit per model: each batch size compiles once, not once per repeat.
    return jax.jit(
        lambda v, x, s: layer.apply(v, x, s, training=False, method=layer.step),
        donate_argnums=(2,),
    )


def bare_steps(
    model: ServableModel, batch: int, chunk: int, steps: int, period: float = 0.0
) -> list[float]:
    """Seconds of each of `steps` jitted steps at `batch`, state donated (no
    slots). With `period`, one step starts every `period` seconds, so the
    device is idle before each, as in the paced scheduler run."""
    layer, spec = model.layer, model.input_spec
    state = layer.apply(
        model.variables, batch, spec, training=False, method=layer.get_initial_state
    )
    step = _jitted_step(layer)
    rng = np.random.default_rng(0)
    x = sl.Sequence.from_values(
        jax.numpy.asarray(rng.normal(size=(batch, chunk, *spec.shape)), spec.dtype) * 0.1
    )
    y, state = step(model.variables, x, state)  # compiles on first use
    jax.block_until_ready(y)
    times = []
    due = time.perf_counter()
    for _ in range(steps):
        if period:
            due += period
            time.sleep(max(0.0, due - time.perf_counter()))
        start = time.perf_counter()
        y, state = step(model.variables, x, state)
        # The server fetches outputs every tick; so does the baseline.
        np.asarray(y.values)
        times.append(time.perf_counter() - start)
    return times


async def _drain(session: Any) -> None:
    """Reads a stream's outputs until it ends (the outputs are not checked)."""
    async for item in session.outputs():
        if isinstance(item, Ended):
            return


def scheduler_seconds(scheduler: Engine, inputs: list[np.ndarray], ticks: list[TickStats]) -> float:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        sessions = [scheduler.open_stream(loop) for _ in inputs]
        ticks.clear()
        start = time.perf_counter()

        for s, x in zip(sessions, inputs, strict=True):
            s.send(x)
            s.end()
        await asyncio.gather(*(_drain(s) for s in sessions))
        return time.perf_counter() - start

    return asyncio.run(main())


def paced_run(
    scheduler: Engine,
    inputs: list[np.ndarray],
    ticks: list[TickStats],
    period: float,
    count: int,
) -> None:
    """Every stream sends one chunk each `period` seconds, so every tick
    starts with the device idle: its staging and routing are on the path of
    each chunk's latency, not hidden behind another tick."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sessions = [scheduler.open_stream(loop) for _ in inputs]
        ticks.clear()
        chunk = scheduler.chunk_frames
        chunks = inputs[0].shape[0] // chunk

        consumers = [asyncio.create_task(_drain(s)) for s in sessions]
        start = loop.time()
        for k in range(count):
            at = k % chunks * chunk
            for s, x in zip(sessions, inputs, strict=True):
                s.send(x[at : at + chunk])
            await asyncio.sleep(max(0.0, start + (k + 1) * period - loop.time()))
        for s in sessions:
            s.end()
        await asyncio.gather(*consumers)

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-asr", choices=sorted(BUILTIN_MODELS))
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per stream")
    parser.add_argument("--chunk-blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10, help="paired server/raw runs")
    parser.add_argument(
        "--sequential-repeats", type=int, default=3, help="runs of the batch-1 baseline (slow)"
    )
    parser.add_argument("--paced-ticks", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = BUILTIN_MODELS[args.model]()
    n = args.streams
    ticks: list[TickStats] = []
    scheduler = Engine(
        model,
        SchedulerConfig(
            max_streams=n,
            chunk_blocks=args.chunk_blocks,
            max_batch_delay_ms=5,
            buckets=(n,),
            max_buffered_frames=10**8,
            max_chunk_frames=10**8,
            max_output_backlog=10**6,
        ),
        stats_sink=lambda s: ticks.append(s) if isinstance(s, TickStats) else None,
    )
    scheduler.start()
    chunk = scheduler.chunk_frames
    rate = model.sample_rate or 100
    frames = int(args.seconds * rate) // chunk * chunk
    steps = frames // chunk
    rng = np.random.default_rng(1)
    inputs = [
        (rng.normal(size=(frames, *model.input_shape)) * 0.1).astype(np.float32) for _ in range(n)
    ]

    server_s, steady_fps, raw_s, seq_s, host, ratios = [], [], [], [], [], []
    intervals: list[float] = []
    idle: list[float] = []
    raw_steps: list[float] = []
    # Warm-up (not measured): first executions of the compiled ticks
    # allocate the runtime's buffers.
    scheduler_seconds(scheduler, inputs, ticks)
    bare_steps(model, n, chunk, 2)
    look_ahead = scheduler.look_ahead_ticks
    for repeat in range(args.repeats):
        # Each repeat pairs a server run with a raw run, in alternating
        # order: the machine's speed drifts between repeats more than the
        # ratio differs, and alternating cancels a drift within a pair.
        for which in ("server", "raw") if repeat % 2 == 0 else ("raw", "server"):
            if which == "server":
                server_s.append(scheduler_seconds(scheduler, inputs, ticks))
                full = [t for t in ticks if t.batch_size == n]
            else:
                raw_steps.extend(raw := bare_steps(model, n, chunk, steps))
                raw_s.append(sum(raw))
        if repeat < args.sequential_repeats:
            seq_s.append(n * sum(bare_steps(model, 1, chunk, steps)))
        host.extend(t.host_seconds for t in full)
        # Steady state: full-occupancy ticks back to back (start-up ticks
        # and the latency flush at the end are left out).
        if len(full) >= 2:
            span = full[-1].started_at - full[0].started_at
            steady_fps.append((len(full) - 1) * n * chunk / span)
            ratios.append(steady_fps[-1] / (steps * n * chunk / raw_s[-1]))
            intervals.extend(b.started_at - a.started_at for a, b in itertools.pairwise(full))
            idle.extend(t.device_idle_seconds for t in full[1:])
    look_ahead = scheduler.look_ahead_ticks - look_ahead
    # Paced: a tick every three bare steps, so the device is idle when each starts.
    period = 3 * float(np.median(raw_steps))
    paced_run(scheduler, inputs, ticks, period, args.paced_ticks)
    paced = [t for t in ticks if t.batch_size == n]
    scheduler.stop()
    paced_raw_ms = np.array(bare_steps(model, n, chunk, args.paced_ticks, period)) * 1000
    paced_ms = lambda field, q: round(
        float(np.percentile([getattr(t, field) * 1000 for t in paced], q)), 3
    )
    # A paced tick's wall time: staging, launch, device, routing.
    paced_wall_ms = np.array(
        [(t.host_seconds + t.dispatch_seconds + t.tick_seconds) * 1000 for t in paced]
    )
    paced_over = lambda q: round(
        float(np.percentile(paced_wall_ms, q) - np.percentile(paced_raw_ms, q)), 3
    )

    total = n * frames
    server_fps = statistics.median(steady_fps)
    wall_fps = total / statistics.median(server_s)
    raw_fps = total / statistics.median(raw_s)
    host_ms = np.array(host or [0.0]) * 1000
    tick_ms, raw_ms = np.array(intervals or [0.0]) * 1000, np.array(raw_steps) * 1000
    overhead = lambda q: round(float(np.percentile(tick_ms, q) - np.percentile(raw_ms, q)), 3)
    idle_ms = np.array(idle or [0.0]) * 1000
    quartiles = np.percentile(ratios, [25, 75])
    result = {
        "model": args.model,
        "backend": jax.default_backend(),
        "streams": n,
        "chunk_frames": chunk,
        "frames_per_stream": frames,
        "server_frames_per_s": round(server_fps),
        # Whole runs: start-up, partial ticks and the latency flush included.
        "server_end_to_end_frames_per_s": round(wall_fps),
        "raw_frames_per_s": round(raw_fps),
        # Median over repeats of (server, raw) measured back to back.
        "server_over_raw": round(statistics.median(ratios), 3),
        "server_over_raw_quartiles": [round(float(q), 3) for q in quartiles],
        "server_over_raw_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
        "repeats": args.repeats,
        "batched_over_sequential": round(statistics.median(seq_s) / statistics.median(server_s), 2),
        "raw_step_ms_p50": round(float(np.percentile(raw_ms, 50)), 2),
        "raw_step_ms_p99": round(float(np.percentile(raw_ms, 99)), 2),
        "tick_ms_p50": round(float(np.percentile(tick_ms, 50)), 2),
        "tick_ms_p99": round(float(np.percentile(tick_ms, 99)), 2),
        "tick_overhead_ms_p50": overhead(50),
        "tick_overhead_ms_p99": overhead(99),
        # Host time the device waited for between full ticks (0 when the
        # next tick was dispatched before the one on the device finished).
        "device_idle_per_tick_ms_p50": round(float(np.percentile(idle_ms, 50)), 3),
        "device_idle_per_tick_ms_p99": round(float(np.percentile(idle_ms, 99)), 3),
        # Paced ticks: the scheduler's own host work per tick (staging and
        # routing), all of it on each chunk's latency path; the launch of
        # the device call, which the bare step pays too, is apart.
        "paced_ticks": len(paced),
        "paced_tick_overhead_ms_p50": paced_ms("host_seconds", 50),
        "paced_tick_overhead_ms_p99": paced_ms("host_seconds", 99),
        "paced_dispatch_ms_p50": paced_ms("dispatch_seconds", 50),
        "paced_dispatch_ms_p99": paced_ms("dispatch_seconds", 99),
        "paced_device_ms_p50": paced_ms("tick_seconds", 50),
        # Paced tick wall time minus the bare step paced the same way
        # (launch, device and fetch), quantile by quantile.
        "paced_tick_ms_p50_p90_p99": [
            round(float(q), 2) for q in np.percentile(paced_wall_ms, [50, 90, 99])
        ],
        "paced_raw_step_ms_p50_p90_p99": [
            round(float(q), 2) for q in np.percentile(paced_raw_ms, [50, 90, 99])
        ],
        "paced_tick_minus_raw_ms_p50": paced_over(50),
        "paced_tick_minus_raw_ms_p99": paced_over(99),
        "host_work_per_tick_ms_p50": round(float(np.percentile(host_ms, 50)), 3),
        "host_work_per_tick_ms_p99": round(float(np.percentile(host_ms, 99)), 3),
        "look_ahead_ticks": look_ahead,
        "ticks": len(ticks),
        "realtime_factor": round(server_fps / rate / n, 2) if model.sample_rate else None,
        "compile_seconds": {str(k): round(v, 2) for k, v in scheduler.compile_seconds.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
