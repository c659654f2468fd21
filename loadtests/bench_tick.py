"""Where a partial tick's time goes, against the bare step, in one process.

For each bucket (rows), out of `--slots` slots, on distinct random slots:
- tick: `Device.run_tick` as `sl-serve` runs it (gather, step, scatter);
- gather, and gather + scatter: the two copies of the ticked rows;
- rows step: the step program on gathered rows (what the tick steps);
- bare: `bench_runtime.bare_steps`, the model's jitted step, state donated;
- masked page: the step over a page of exactly the bucket's rows, state
  donated, each leaf kept where its row is not ready (`where(ready, new,
  old)`, a fifth of the rows). That is what a tick costs that steps its rows
  in place, where they live, instead of copying them out and back.

XLA's CPU pool is sized as `sl-serve` sizes it (`--xla-cpu-threads`,
default one less than the CPUs this process may use). Each program runs
`--reps` times in a row, as a loaded server runs its tick, and the programs
alternate for `--rounds` rounds, so the machine's drift spreads over all of
them; medians over every run.

    .venv/bin/python -m loadtests.bench_tick --model demo-asr --chunk-blocks 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from server.app.settings import configure_xla_cpu_threads


def masked_step(rows_step: Callable[..., Any], axes: list[int]) -> Callable[..., Any]:
    """(variable leaves, state leaves, x, lengths, ready) -> (state leaves, y,
    y mask): `rows_step`, with every state leaf left as it was on the rows
    where `ready` is False. Jitted with the state donated."""
    import jax
    import jax.numpy as jnp

    def fn(var_leaves, state_leaves, x, lengths, ready):  # type: ignore[no-untyped-def]
        new, y, y_mask = rows_step(var_leaves, state_leaves, x, lengths)
        kept = []
        for n, old, ax in zip(new, state_leaves, axes, strict=True):
            shape = [1] * n.ndim
            shape[ax] = n.shape[ax]
            kept.append(jnp.where(ready.reshape(shape), n, old))
        return kept, y, y_mask

    return jax.jit(fn, donate_argnums=(1,))


def measure(
    model_name: str,
    chunk_blocks: int,
    buckets: list[int],
    slots: int,
    rounds: int,
    reps: int,
) -> list[dict[str, Any]]:
    """Medians in ms per bucket (see the module's docstring)."""
    import numpy as np

    from server.defaults import BUILTIN_MODELS
    from server.runtime import SchedulerConfig
    from server.runtime.device import Device

    model = BUILTIN_MODELS[model_name]()
    chunk = model.block_size * chunk_blocks
    slots = max(slots, max(buckets))
    # A real slot table, as the server builds it: buckets, then every slot.
    dev = Device(model, SchedulerConfig(max_streams=slots, buckets=(*buckets, slots)), chunk)
    dev.build()
    dev.compile()
    dev.warm_up()
    rng = np.random.default_rng(0)
    results = []
    for b in buckets:
        row = _bucket(dev, b, slots, rounds, reps, rng)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def _bucket(dev: Any, b: int, slots: int, rounds: int, reps: int, rng: Any) -> dict[str, Any]:
    """One bucket's row of `measure`."""
    import jax
    import numpy as np

    from loadtests.bench_runtime import bare_steps
    from server.runtime import SchedulerConfig
    from server.runtime.device import Device

    model, chunk = dev.model, dev.chunk_frames
    # Benchmark-only access to the device's split programs and leaves.
    gather, rows_step = dev._split[b]
    scatter = dev._scatter[b]
    page = Device(model, SchedulerConfig(max_streams=b, buckets=(b,)), chunk)
    page.build()
    masked = masked_step(page._tick_fns()["rows"], page._axes)
    x = np.asarray(rng.normal(size=(b, chunk, *model.input_spec.shape)) * 0.1, np.float32)
    lengths = np.full(b, chunk, np.int32)
    ready = rng.random(b) >= 0.2
    held = {"rows": gather(dev.state, np.arange(b, dtype=np.int32)), "page": page.state}
    var = dev._var_leaves

    def ids() -> Any:
        return np.sort(rng.choice(slots, b, replace=False)).astype(np.int32)

    def tick() -> None:
        dev.run_tick(ids(), x, lengths)

    def copy_out() -> None:
        jax.block_until_ready(gather(dev.state, ids()))

    def copies() -> None:
        i = ids()
        dev.state = scatter(dev.state, i, gather(dev.state, i))
        jax.block_until_ready(dev.state)

    def step_rows() -> None:
        rows, y, _ = rows_step(var, held["rows"], x, lengths)
        np.asarray(y)
        held["rows"] = rows

    def step_page() -> None:
        state, y, _ = masked(var, held["page"], x, lengths, ready)
        np.asarray(y)
        held["page"] = state

    timed: dict[str, Callable[[], None]] = {
        "tick": tick,
        "gather": copy_out,
        "gather_scatter": copies,
        "rows_step": step_rows,
        "masked_page": step_page,
    }
    for fn in timed.values():  # compiles, and first touches of fresh buffers
        fn()
        fn()
    # Blocks of `reps` runs of one program, as a loaded server runs its
    # tick over and over (interleaving single runs made each pay for the
    # previous program's buffers), alternated round by round for drift.
    times: dict[str, list[float]] = {k: [] for k in (*timed, "bare")}
    for _ in range(rounds):
        for name, fn in timed.items():
            fn()
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        times["bare"].extend(bare_steps(model, b, chunk, reps))
    row: dict[str, Any] = {"rows": b}
    row |= {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
    row["tick_over_bare"] = round(row["tick"] / row["bare"], 3)
    row["masked_page_over_bare"] = round(row["masked_page"] / row["bare"], 3)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo-asr")
    p.add_argument("--chunk-blocks", type=int, default=4)
    p.add_argument("--buckets", default="32,64", help="comma-separated rows a tick")
    p.add_argument("--slots", type=int, default=800, help="slots in the table")
    p.add_argument("--rounds", type=int, default=5, help="alternations of the programs")
    p.add_argument("--reps", type=int, default=10, help="runs of a program in a row")
    p.add_argument("--xla-cpu-threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    # Before anything imports JAX's backend: the pool is sized once.
    configure_xla_cpu_threads(args.xla_cpu_threads)
    buckets = [int(b) for b in args.buckets.split(",")]
    rows = measure(args.model, args.chunk_blocks, buckets, args.slots, args.rounds, args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
