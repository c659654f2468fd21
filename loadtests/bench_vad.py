"""Silero VAD: `sl-serve` against what its users run today, in one run.

    .venv/bin/python -m loadtests.bench_vad --json vad.json

Starts both servers on this machine and drives each, taking turns run by
run, with the same load generator (`sl-loadtest`'s code, over WebSocket, since
the peer has no gRPC): real-time streams sending 96 ms chunks of noise.
- ours: `sl-serve --model silero-vad=build/models/silero-vad`, ticks of 3
  windows per stream (one 96 ms chunk);
- the peer: `loadtests/peer_vad.py`, FastAPI + one ONNX Runtime session and
  state per stream, the official per-window loop.
Reports, for each: the most streams held at p99 chunk latency under
`--target-p99-ms` (doubling, then bisection), and at each of `--cpu-streams`
(100, and 20, a load both hold) the server process's CPU seconds per audio
second of completed streams. The load
generator shares the cores. Figures, never a pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loadtests import loadtest as lt

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL_DIR = ROOT / "build" / "models" / "silero-vad"
CHUNK_MS = 96.0


def _cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_http(url: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready in {timeout} s")
        time.sleep(0.5)


@contextlib.contextmanager
def _server(cmd: list[str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(ready_url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _load_args(url: str, args: argparse.Namespace, server_chunk_blocks: int) -> argparse.Namespace:
    return argparse.Namespace(
        url=url,
        model="silero-vad",
        streams=args.first_probe,
        duration=args.duration,
        ramp_up=args.ramp_up,
        chunk_ms=CHUNK_MS,
        utterance_s=args.utterance_s,
        server_chunk_blocks=server_chunk_blocks,
        fast=False,
        client="lean",
        capacity=True,
        target_p99_ms=args.target_p99_ms,
        max_streams=args.max_streams,
        api_key=None,
        ca_cert=None,
    )


def _cpu_run(pid: int, load: argparse.Namespace, streams: int) -> dict[str, Any]:
    """One load run of `streams` streams: its summary and the server's CPU
    seconds per audio second, counting only utterances that completed (a
    refused connection processed no audio)."""
    before = _cpu_seconds(pid)
    stats = asyncio.run(lt.run_load(load, streams))
    cpu = _cpu_seconds(pid) - before
    audio = sum(r.audio_seconds for r in stats.results if r.error is None)
    return {
        "summary": stats.summary(),
        "cpu_seconds": round(cpu, 2),
        "audio_seconds_ok": round(audio, 1),
        "cpu_s_per_audio_s": round(cpu / audio, 4) if audio else None,
    }


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "server": result["server"],
        "capacity_streams": result.get("capacity_streams"),
        **{
            f"cpu_s_per_audio_s@{n}": (
                r["cpu_s_per_audio_s"],
                r["summary"]["chunk_latency_ms"]["p99"],
            )
            for n, r in result["cpu"].items()
        },
    }


def _measure(servers: list[tuple[str, str, int, argparse.Namespace]], args: Any) -> list[dict]:
    """Every figure of each server; the servers take turns run by run (each
    CPU load, then each probe of the capacity searches), so a slow spell of
    a shared machine hits both rather than whichever went second."""
    results: list[dict[str, Any]] = [
        {"server": name, "url": url, "cpu": {}} for name, url, _, _ in servers
    ]
    for streams in args.cpu_streams:
        for (name, _, pid, load), result in zip(servers, results, strict=True):
            print(f"== {name}: {streams} streams for CPU per audio second", file=sys.stderr)
            result["cpu"][streams] = _cpu_run(pid, load, streams)
    if not args.skip_capacity:
        searches = [lt.capacity_search(load.streams, load.max_streams) for *_, load in servers]
        sweeps: list[list[dict[str, Any]]] = [[] for _ in servers]
        probes: list[int | None] = [next(search) for search in searches]
        while any(n is not None for n in probes):
            for i, ((name, _, _, load), n) in enumerate(zip(servers, probes, strict=True)):
                if n is None:
                    continue
                print(f"== {name}: capacity probe", file=sys.stderr)
                held = asyncio.run(lt.probe(load, n, sweeps[i]))
                try:
                    probes[i] = searches[i].send(held)
                except StopIteration as done:
                    probes[i] = None
                    results[i]["capacity_streams"] = int(done.value)
        for result, sweep in zip(results, sweeps, strict=True):
            result["sweep"] = [
                {
                    "streams": s["streams"],
                    "p99_ms": s["chunk_latency_ms"]["p99"],
                    "errors": s["errors"],
                    "audio_s_per_s": s["throughput_audio_s_per_s"],
                }
                for s in sweep
            ]
    for result in results:
        print(json.dumps(_brief(result)), file=sys.stderr)
    return results


def bare(batches: tuple[int, ...] = (1, 8, 32, 128), windows: int = 3) -> dict[str, Any]:
    """CPU time per window of the bare jitted `step` at each batch size
    (`windows` windows per stream per call, as the server's ticks), next to
    ONNX Runtime stepping one stream (the peer's inner loop)."""
    import jax
    import numpy as np

    import sequence_layers as sl
    from loadtests.peer_vad import OfficialStream
    from server.model import load_model_dir
    from server.silero_vad import ONNX_MEMBER, find_wheel

    model = load_model_dir(MODEL_DIR)
    layer = model.layer
    step = jax.jit(lambda v, x, s: layer.apply(v, x, s, training=False, method=layer.step))
    out: dict[str, Any] = {"windows_per_call": windows, "ours_ms_per_window": {}}
    rng = np.random.default_rng(0)
    for b in batches:
        x = sl.Sequence.from_values(rng.normal(0, 0.1, (b, 512 * windows, 1)).astype(np.float32))
        state = layer.apply(
            model.variables, b, model.input_spec, training=False, method=layer.get_initial_state
        )
        y, state = step(model.variables, x, state)
        jax.block_until_ready(y)
        n = max(5, 2000 // (b * windows))
        t0 = time.process_time()
        for _ in range(n):
            y, state = step(model.variables, x, state)
        jax.block_until_ready(y)
        out["ours_ms_per_window"][b] = round(
            (time.process_time() - t0) / (n * b * windows) * 1e3, 4
        )
    import zipfile

    with zipfile.ZipFile(find_wheel()) as z:
        peer = OfficialStream(z.read(ONNX_MEMBER.replace("_16k_op15", "")))
    audio = rng.normal(0, 0.1, 512 * 500).astype(np.float32)
    peer.push(audio[: 512 * 20])
    t0 = time.process_time()
    peer.push(audio)
    out["onnxruntime_ms_per_window_batch1"] = round((time.process_time() - t0) / 500 * 1e3, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_vad", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load run")
    p.add_argument("--ramp-up", type=float, default=5.0)
    # Long streams: the peer builds an ONNX Runtime session per stream (~70 ms).
    p.add_argument("--utterance-s", type=float, default=20.0)
    p.add_argument("--target-p99-ms", type=float, default=100.0)
    p.add_argument("--first-probe", type=int, default=64, help="capacity search starts here")
    p.add_argument("--max-streams", type=int, default=1024)
    p.add_argument(
        "--cpu-streams",
        type=lambda v: [int(n) for n in v.split(",")],
        default=[100, 20],
        help="stream counts for the CPU figure (comma-separated)",
    )
    p.add_argument("--skip-capacity", action="store_true")
    p.add_argument("--only", choices=["ours", "peer"], default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--bare", action="store_true", help="only the bare step vs ONNX Runtime")
    p.add_argument(
        "--serve-args", default="", help="extra sl-serve flags, e.g. '--max-batch-delay-ms 20'"
    )
    args = p.parse_args(argv)
    if args.bare:
        print(json.dumps(bare(), indent=2))
        return 0
    if not (MODEL_DIR / "model.json").is_file():
        print(f"{MODEL_DIR} missing: run `make silero-vad` first.", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        servers = []
        if args.only in (None, "ours"):
            http = 8301
            cmd = [str(BIN / "sl-serve"), "--model", f"silero-vad={MODEL_DIR}"]
            cmd += ["--max-streams", str(args.max_streams), "--chunk-blocks", "3"]
            cmd += ["--grpc-port", "50301", "--http-port", str(http), "--log-level", "warning"]
            cmd += args.serve_args.split()
            url = f"ws://127.0.0.1:{http}"
            proc = stack.enter_context(_server(cmd, f"http://127.0.0.1:{http}/readyz"))
            servers.append(("sl-serve", url, proc.pid, _load_args(url, args, 3)))
        if args.only in (None, "peer"):
            http = 8302
            cmd = [sys.executable, "-m", "loadtests.peer_vad", "--port", str(http)]
            url = f"ws://127.0.0.1:{http}"
            proc = stack.enter_context(_server(cmd, f"http://127.0.0.1:{http}/v1/models"))
            name = "peer (FastAPI + ONNX Runtime)"
            servers.append((name, url, proc.pid, _load_args(url, args, 1)))
        results = _measure(servers, args)
    out = {"cpu": os.uname().machine, "results": results}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
