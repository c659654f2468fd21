"""Start-up benchmark: `sl-serve` time to ready, cold and warm.

Starts `sl-serve` (the built-in models unless `--model` is given) with a
fresh compilation cache directory, then again `--warm` more times on the same
cache, and prints per run: seconds from process launch to the ready line,
the process's CPU seconds by then (steadier than wall time on a shared
machine), each model's time to ready (from its log line), and the compile
seconds of each model summed over its programs (the `sl_compile_seconds`
gauges: with a warm cache these are cache reads plus tracing).

    .venv/bin/python -m loadtests.bench_startup --warm 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads): on a
    shared machine, steadier than wall time."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_once(cache_dir: str, extra: list[str]) -> dict[str, object]:
    http_port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "sl-serve"),
        "--grpc-port",
        str(free_port()),
        "--http-port",
        str(http_port),
        "--compile-cache-dir",
        cache_dir,
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    models: dict[str, float] = {}
    try:
        for line in proc.stdout:
            if m := re.search(r"model (\S+) ready in ([\d.]+) s", line):
                models[m.group(1)] = float(m.group(2))
            if line.startswith("sl-serve ready"):
                break
        else:
            raise RuntimeError(f"sl-serve exited {proc.wait()} before ready")
        ready = time.perf_counter() - start
        cpu = process_cpu_seconds(proc.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics") as r:
            text = r.read().decode()
        compile_s: dict[str, float] = {}
        for name, seconds in re.findall(
            r'sl_compile_seconds\{bucket="[^"]+",model="([^"]+)"\} ([\d.e+-]+)', text
        ):
            compile_s[name] = round(compile_s.get(name, 0.0) + float(seconds), 2)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.stdout.close()
    return {
        "ready_s": round(ready, 2),
        "cpu_s": round(cpu, 2),
        "model_ready_s": models,
        "compile_s": compile_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warm", type=int, default=2, help="warm starts after the cold one")
    p.add_argument("--model", action="append", default=[], help="as sl-serve --model")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="use (and keep) this cache directory instead of a fresh one: with a filled one "
        "every start is warm, e.g. to compare two versions of the server in turns",
    )
    args = p.parse_args()
    extra = [a for m in args.model for a in ("--model", m)]
    with tempfile.TemporaryDirectory(prefix="sl-bench-cache-") as fresh:
        cache = args.cache_dir or fresh
        runs = [{"run": "first" if args.cache_dir else "cold", **start_once(cache, extra)}]
        for i in range(args.warm):
            runs.append({"run": f"warm{i + 1}", **start_once(cache, extra)})
    for run in runs:
        print(json.dumps(run), flush=True)


if __name__ == "__main__":
    main()
