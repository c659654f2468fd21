"""This library against Google's SequenceLayers, side by side in one run.

Builds the same configs in both libraries, copies our parameters into the
reference's (same paths and shapes; the table says how many leaves matched),
checks that outputs agree on valid frames, and prints frames/s of jitted
`layer()` and of jitted `step()` (one call per block, state donated) with the
ratio ours / reference. Medians of repeats that alternate between the two
libraries, so machine noise hits both. Each row also says what the two
libraries compile that call to (`PROGRAM_LABELS`): the same XLA program (the
optimized HLO, with names and source locations taken out), whose ratio is
1.0 up to the noise whatever either library does; the same kernels (dots,
convolutions, FFTs) with different elementwise work around them; or
different kernels.

The two libraries share the import name `sequence_layers`, so each side runs
`vs_reference_worker.py` in its own interpreter: ours in this one, the
reference (`sequence-layers==0.2` from PyPI) in `build/ref-venv`, which this
script creates on first use with the same jax, jaxlib and flax versions as
ours. The reference is never a project dependency.

    make bench-ref                      # or:
    .venv/bin/python -m loadtests.bench_vs_reference [--quick] [--only lstm] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import platform
import statistics
import subprocess
import sys
import venv
from pathlib import Path
from typing import IO, Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "vs_reference_worker.py"
REF_VENV = ROOT / "build" / "ref-venv"
SCRATCH = ROOT / "build" / "vs-reference"
REFERENCE_REQUIREMENT = "sequence-layers==0.2"


def ensure_reference_venv(path: Path = REF_VENV) -> Path:
    """Creates `path` with the reference installed (once); returns its python.
    jax, jaxlib and flax are pinned to this interpreter's versions so the two
    sides compile with the same XLA."""
    python = path / "bin" / "python"
    stamp = path / ".installed"
    if stamp.exists():
        return python
    if not python.exists():
        venv.create(path, with_pip=True)
    pins = [f"{p}=={importlib.metadata.version(p)}" for p in ("jax", "jaxlib", "flax")]
    cmd = [str(python), "-m", "pip", "install", "-q", REFERENCE_REQUIREMENT, *pins]
    # typing_extensions supplies typing.override / typing.Self on Python 3.11.
    cmd.append("typing_extensions")
    print("installing the reference:", " ".join(cmd[4:]), flush=True)
    subprocess.run(cmd, check=True)
    stamp.touch()
    return python


class Worker:
    """One `vs_reference_worker.py` process, driven over JSON lines."""

    def __init__(self, python: str, log: Path) -> None:
        self._log: IO[str] = log.open("w")
        self._proc = subprocess.Popen(
            [python, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=str(SCRATCH),  # nothing from this repository on the reference's path
        )
        self.info = self.call({"op": "info"})

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited (rc={self._proc.poll()}); see {self._log.name}")
        return json.loads(line)

    def close(self) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        self._proc.wait(timeout=30)
        self._log.close()


# The "program" column: what the two libraries compile a call to.
PROGRAM_LABELS = {
    "same": "the same optimized XLA program, names and source locations aside: "
    "1.0x up to the noise, whatever either library does",
    "same kernels": "the same dots, convolutions and FFTs, with different elementwise "
    "work around them",
    "different": "different kernels",
}


@dataclasses.dataclass
class Row:
    case: str
    batch: int
    what: str  # "layer" or "step N" (N frames per call)
    ours_fps: float
    ref_fps: float
    max_diff: float  # on valid frames, ours vs reference
    params: str  # leaves copied / reference leaves
    # What the two libraries compile this call to (`PROGRAM_LABELS`).
    program: str = "different"

    @property
    def ratio(self) -> float:
        return self.ours_fps / self.ref_fps


def _max_diff(ours: Path, ref: Path, key: str) -> float:
    a, b = np.load(ours), np.load(ref)
    if not np.array_equal(a[f"{key}_mask"], b[f"{key}_mask"]):
        return math.inf
    valid = a[f"{key}_mask"].reshape(a[f"{key}_mask"].shape + (1,) * (a[f"{key}_values"].ndim - 2))
    diff = np.where(valid, a[f"{key}_values"].astype(np.float64) - b[f"{key}_values"], 0.0)
    return float(np.abs(diff).max()) if diff.size else 0.0


def _interleaved_median(
    ours: Worker, ref: Worker, what: str, repeats: int, min_seconds: float
) -> tuple[float, float]:
    """Median seconds per call of `what` on each side; the sides take turns
    (and swap who goes first every repeat), so slow spells hit both."""
    workers = {"ours": ours, "ref": ref}
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    request = {"op": "time", "what": what, "min_seconds": min_seconds}
    for w in workers.values():  # warm-up, untimed
        w.call({**request, "min_seconds": 0.0})
    for r in range(repeats):
        for side in ("ours", "ref") if r % 2 == 0 else ("ref", "ours"):
            reply = workers[side].call(request)
            if not reply["ok"]:
                raise RuntimeError(reply["error"])
            times[side].append(reply["seconds"])
    return statistics.median(times["ours"]), statistics.median(times["ref"])


def bench_case(
    ours: Worker,
    ref: Worker,
    case: str,
    batch: int,
    units: int,
    blocks: list[int],
    repeats: int,
    min_seconds: float,
) -> list[Row]:
    request = {"op": "build", "case": case, "batch": batch, "units": units, "blocks": blocks}
    built_ours = ours.call({**request, "params_in": None, "dump": str(SCRATCH)})
    if not built_ours["ok"]:
        raise RuntimeError(f"ours: {built_ours['error']}\n{built_ours.get('trace', '')}")
    built_ref = ref.call({**request, "params_in": built_ours["params_out"], "dump": str(SCRATCH)})
    if not built_ref["ok"]:
        raise RuntimeError(f"reference: {built_ref['error']}\n{built_ref.get('trace', '')}")
    params = f"{built_ref['copied']}/{built_ref['total']}"
    frames = built_ours["frames"]
    rows = []
    for what in ["layer", *(f"step{b}" for b in blocks)]:
        diff = _max_diff(Path(built_ours["outputs_out"]), Path(built_ref["outputs_out"]), what)
        t_ours, t_ref = _interleaved_median(ours, ref, what, repeats, min_seconds)
        label = what if what == "layer" else f"step {int(what[4:]) * built_ours['block_size']}"
        programs = [w.call({"op": "program", "what": what}) for w in (ours, ref)]
        program = "different"
        if all(p["ok"] for p in programs):
            if programs[0]["program"] == programs[1]["program"]:
                program = "same"
            elif programs[0]["kernels"] == programs[1]["kernels"]:
                program = "same kernels"
        rows.append(
            Row(
                case,
                batch,
                label,
                batch * frames / t_ours,
                batch * frames / t_ref,
                diff,
                params,
                program,
            )
        )
    return rows


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def _print_row(row: Row) -> None:
    diff = "MISMATCH" if row.max_diff == math.inf else f"{row.max_diff:.1e}"
    print(
        f"| {row.case} | {row.batch} | {row.what} | {row.ours_fps:,.0f} | {row.ref_fps:,.0f} "
        f"| {row.ratio:.2f} | {diff} | {row.params} | {row.program} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and repeats")
    parser.add_argument("--only", default=None, help="substring of case names to run")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per side")
    parser.add_argument(
        "--units", type=int, default=None, help="input length in blocks (layer block_size)"
    )
    parser.add_argument("--ref-python", default=None, help="reference interpreter")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    units = args.units or (128 if args.quick else 256)
    min_seconds = 0.03 if args.quick else 0.1
    blocks = [1, 8]

    SCRATCH.mkdir(parents=True, exist_ok=True)
    ref_python = args.ref_python or str(ensure_reference_venv())
    ours = Worker(sys.executable, SCRATCH / "ours.log")
    ref = Worker(ref_python, SCRATCH / "reference.log")
    print(
        f"CPU: {_cpu_model()}; jax {ours.info['jax']} (ours) / {ref.info['jax']} (reference); "
        f"{units} blocks per input, median of {repeats} interleaved repeats "
        f"of >= {min_seconds} s each"
    )
    print("frames/s (input frames) of jitted layer() and of jitted step() per call of N frames")
    print()
    print(
        "| case | batch | call | ours f/s | reference f/s | ours / ref | max diff | params "
        "| program |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows: list[Row] = []
    try:
        for case in ours.info["cases"]:
            if args.only and args.only not in case:
                continue
            for batch in (int(b) for b in args.batches.split(",")):
                try:
                    for row in bench_case(
                        ours, ref, case, batch, units, blocks, repeats, min_seconds
                    ):
                        rows.append(row)
                        _print_row(row)
                except RuntimeError as e:
                    print(f"| {case} | {batch} | failed: {str(e).splitlines()[0]} |", flush=True)
    finally:
        ours.close()
        ref.close()
    slow = [r for r in rows if r.ratio < 1.2]
    print()
    print(f"{len(rows) - len(slow)}/{len(rows)} rows at >= 1.2x the reference")
    for label, meaning in PROGRAM_LABELS.items():
        below = [
            f"{r.case} b{r.batch} {r.what} ({r.ratio:.2f})" for r in slow if r.program == label
        ]
        print(
            f"below 1.2x, {label} ({meaning}): {len(below)}"
            + (": " + ", ".join(below) if below and label == "different" else "")
        )
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
