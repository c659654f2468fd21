"""Front-door cost per message: server CPU microseconds per chunk message over
WebSocket and gRPC, for this tree and (optionally) a baseline checkout, in one
run, plus the runtime alone driven in-process (the floor a door adds to).

    python -m loadtests.bench_doors                           # this tree
    python -m loadtests.bench_doors --baseline /path/to/old   # before/after

Each server is a real `sl-serve` process (its code from its own tree, the
interpreter from this one); N streams send `--chunks` chunks of 1536 int16
samples (96 ms at 16 kHz, as a Silero VAD client does) as fast as the server
answers, at most `--window` chunks ahead of their outputs, with lean clients
(raw `websockets` and `grpc.aio`). The figure is the server process's CPU
time (all threads, from /proc) over the load, less its idle rate, per chunk
message. Measurements alternate between the trees and doors round by round
so drift on a shared machine hits both alike. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import websockets

from protos import streaming_pb2 as pb
from protos import streaming_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
CHUNK_SAMPLES = 1536
# Starts `sl-serve` from a tree: `server.app.serve` there, or `server.serve`
# in trees from before the split (decided by the tree's files: an import
# fallback would pick up this tree's modules through the editable install).
LAUNCH = "import sys\nfrom {module} import main\nsys.exit(main())\n"
_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of `pid`."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def entry_module(tree: Path) -> str:
    return (
        "server.app.serve" if (tree / "server" / "app" / "serve.py").is_file() else "server.serve"
    )


class Server:
    """One `sl-serve` process running the code of `tree`."""

    def __init__(self, tree: Path, model_args: list[str], timeout: float = 900) -> None:
        self.tree = tree
        self.grpc_port, self.http_port = free_port(), free_port()
        cmd = [
            sys.executable,
            "-c",
            LAUNCH.format(module=entry_module(tree)),
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--log-level",
            "warning",
            *model_args,
        ]
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if lines.get(timeout=1).startswith("sl-serve ready"):
                    return
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
        self.proc.kill()
        raise RuntimeError(f"sl-serve from {tree} did not start:\n{''.join(self.log[-40:])}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Window:
    """Lets a stream send chunk i once outputs of chunk i - window have come."""

    def __init__(self, window: int, out_per_chunk: int, slack: int) -> None:
        self.window, self.out_per_chunk, self.slack = window, out_per_chunk, slack
        self.received = 0
        self.changed = asyncio.Event()

    async def wait_for(self, i: int) -> None:
        need = (i - self.window) * self.out_per_chunk - self.slack
        while self.received < need:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), timeout=60)

    def got(self, frames: int) -> None:
        self.received += frames
        self.changed.set()


def out_per_chunk(info: dict[str, Any]) -> tuple[int, int]:
    ratio = info["output_ratio"]
    per = CHUNK_SAMPLES * ratio["numerator"] // ratio["denominator"]
    slack = info["input_latency"] * ratio["numerator"] // ratio["denominator"] + per
    return per, slack


async def ws_stream(port: int, model: str, chunks: list[bytes], window: int) -> int:
    url = f"ws://127.0.0.1:{port}/v1/models/{model}/stream?dtype=int16"
    async with websockets.connect(url, max_size=None) as ws:
        info = json.loads(await ws.recv())
        w = Window(window, *out_per_chunk(info))

        async def send() -> None:
            for i, chunk in enumerate(chunks):
                await w.wait_for(i)
                await ws.send(chunk)
            await ws.send('{"type": "end"}')

        sender = asyncio.create_task(send())
        messages = 0
        async for message in ws:
            if isinstance(message, bytes):
                w.got(len(message) // 4 // int(np.prod(info["output_shape"])))
                messages += 1
            elif json.loads(message)["type"] in ("ended", "error"):
                break
        await sender
        return messages


async def grpc_stream(
    stub: pb_grpc.StreamingInferenceStub, model: str, chunks: list[bytes], window: int
) -> int:
    started = asyncio.Event()
    holder: dict[str, Window] = {}

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=pb.StreamConfig(model=model))
        await started.wait()
        w = holder["w"]
        for i, chunk in enumerate(chunks):
            await w.wait_for(i)
            yield pb.StreamRequest(
                chunk=pb.Tensor(shape=[CHUNK_SAMPLES, 1], dtype=pb.INT16, data=chunk)
            )
        yield pb.StreamRequest(end=pb.EndOfStream())

    messages = 0
    async for response in stub.Stream(requests()):
        kind = response.WhichOneof("response")
        if kind == "started":
            model_info = response.started.model
            info = {
                "output_ratio": {
                    "numerator": model_info.output_ratio.numerator,
                    "denominator": model_info.output_ratio.denominator,
                },
                "input_latency": model_info.input_latency,
            }
            holder["w"] = Window(window, *out_per_chunk(info))
            started.set()
        elif kind == "output":
            holder["w"].got(response.output.tensor.shape[0])
            messages += 1
    return messages


async def load(door: str, server: Server, args: argparse.Namespace, chunks: list[bytes]) -> int:
    if door == "websocket":
        results = await asyncio.gather(
            *(
                ws_stream(server.http_port, args.model, chunks, args.window)
                for _ in range(args.streams)
            )
        )
        return sum(results)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.StreamingInferenceStub(channel)
        results = await asyncio.gather(
            *(grpc_stream(stub, args.model, chunks, args.window) for _ in range(args.streams))
        )
        return sum(results)


def measure(door: str, server: Server, args: argparse.Namespace, chunks: list[bytes]) -> dict:
    pid = server.proc.pid
    idle0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(args.idle_seconds)
    idle_rate = (cpu_seconds(pid) - idle0) / (time.monotonic() - t0)
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    outputs = asyncio.run(load(door, server, args, chunks))
    wall = time.monotonic() - t0
    cpu = cpu_seconds(pid) - cpu0 - idle_rate * wall
    messages = args.streams * len(chunks)
    return {
        "us_per_chunk": cpu / messages * 1e6,
        "idle_cpu": idle_rate,
        "outputs": outputs,
        "wall_s": wall,
    }


def floor(args: argparse.Namespace, chunks: list[bytes]) -> float:
    """The runtime alone, in this process: CPU µs per chunk with no door.
    The driver does what a door must at least do (decode, send, iterate)."""
    sys.path.insert(0, str(ROOT))
    from server.app.settings import build_parser, resolve_settings
    from server.runtime import Runtime

    settings = resolve_settings(build_parser().parse_args(args.model_args))
    runtime = Runtime(settings.models, settings.schedulers)
    runtime.start()
    arrays = [np.frombuffer(c, "<i2").reshape(-1, 1) for c in chunks]
    info = runtime.get_model(args.model).to_json()
    per, slack = out_per_chunk(info)

    async def one() -> None:
        session = runtime.open_stream(args.model)
        w = Window(args.window, per, slack)

        async def send() -> None:
            for i, x in enumerate(arrays):
                await w.wait_for(i)
                session.send(x)
            session.end()

        sender = asyncio.create_task(send())
        async for item in session.outputs():
            frames = getattr(item, "frames", None)
            if frames is not None:
                w.got(frames.shape[0])
        await sender

    async def main() -> None:
        await asyncio.gather(*(one() for _ in range(args.streams)))

    try:
        results = []
        for _ in range(args.rounds):
            cpu0 = time.process_time()
            asyncio.run(main())
            results.append((time.process_time() - cpu0) / (args.streams * len(chunks)) * 1e6)
        return statistics.median(results)
    finally:
        runtime.stop()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline", type=Path, help="a checkout of the code to compare against")
    p.add_argument("--model", default="silero-vad")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--chunks", type=int, default=150, help="chunks per stream")
    p.add_argument("--window", type=int, default=3, help="chunks a stream may send ahead")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--idle-seconds", type=float, default=1.0)
    p.add_argument("--doors", default="websocket,grpc", help="comma-separated: websocket, grpc")
    p.add_argument("--no-floor", action="store_true", help="skip the in-process runtime floor")
    args = p.parse_args(argv)
    doors = args.doors.split(",")
    args.model_args = [
        "--model",
        args.model,
        "--max-streams",
        str(args.streams),
        "--buckets",
        str(args.streams),
        # One tick per chunk message: a chunk is 3 blocks of 512 samples.
        "--chunk-blocks",
        "3",
    ]
    rng = np.random.default_rng(0)
    chunks = [
        (rng.normal(size=CHUNK_SAMPLES) * 3000).astype("<i2").tobytes() for _ in range(args.chunks)
    ]
    trees = {"this": ROOT}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), **trees}
    servers = {name: Server(tree, args.model_args) for name, tree in trees.items()}
    samples: dict[tuple[str, str], list[float]] = {}
    try:
        # Warm-up, not counted: first connections, first ticks, lazy imports.
        for door in doors:
            for server in servers.values():
                measure(door, server, args, chunks[: args.window * 4])
        for round_ in range(args.rounds):
            for door in doors:
                # Who goes first alternates: a position effect (the client's
                # state, a neighbour's load) must not favour one tree.
                order = list(servers.items())
                for name, server in order if round_ % 2 == 0 else order[::-1]:
                    r = measure(door, server, args, chunks)
                    samples.setdefault((name, door), []).append(r["us_per_chunk"])
                    print(
                        f"  {name:8s} {door:9s} {r['us_per_chunk']:7.0f} us/chunk "
                        f"({r['outputs']} outputs, {r['wall_s']:.1f} s, "
                        f"idle {r['idle_cpu'] * 100:.1f}% of a core)",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    result: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "model": args.model,
        "streams": args.streams,
        "chunks_per_stream": args.chunks,
        "chunk_samples": CHUNK_SAMPLES,
        "server_cpu_us_per_chunk": {
            f"{name}/{door}": round(statistics.median(v), 1) for (name, door), v in samples.items()
        },
    }
    if args.baseline is not None:
        result["this_over_baseline"] = {
            door: round(
                statistics.median(samples[("this", door)])
                / statistics.median(samples[("baseline", door)]),
                3,
            )
            for door in doors
        }
    if not args.no_floor:
        result["runtime_floor_us_per_chunk"] = round(floor(args, chunks), 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
