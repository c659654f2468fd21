"""Layer throughput: frames/s of `layer()` and of jitted `step()`.

Prints a table (and JSON with --json). Figures, not pass/fail: these machines
are noisy, so compare rows measured in the same run.

    .venv/bin/python -m loadtests.bench_layers [--only lstm] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import sequence_layers as sl


def _stacks() -> dict[str, tuple[sl.SequenceLayerConfig, int]]:
    """name -> (config, input channels). Small-model sizes."""
    conv = sl.Serial.Config(
        tuple(
            sl.Conv1D.Config(filters=128, kernel_size=5, padding="causal", activation=jax.nn.relu)
            for _ in range(4)
        )
    )
    lstm = sl.Serial.Config(tuple(sl.LSTM.Config(units=128) for _ in range(2)))
    gru = sl.Serial.Config(tuple(sl.GRU.Config(units=128) for _ in range(2)))
    stacks: dict[str, tuple[sl.SequenceLayerConfig, int]] = {
        "conv1d_x4": (conv, 80),
        "lstm_x2": (lstm, 80),
        "gru_x2": (gru, 80),
    }
    try:  # the example models arrive with the attention/dsp catalog
        from sequence_layers import examples

        stacks.update(examples.benchmark_stacks())
    except (ImportError, AttributeError):
        pass
    return stacks


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(
    config: sl.SequenceLayerConfig, channels: int, batch: int, block_blocks: int, frames: int
) -> dict[str, float]:
    model = config.make()
    # At least 4 step blocks per run (the ASR encoder's block is 640 samples).
    frames = max(frames, 4 * model.block_size * block_blocks)
    rng = np.random.default_rng(0)
    x = sl.Sequence.from_values(
        jnp.asarray(rng.normal(size=(batch, frames, channels)), jnp.float32)
    )
    variables = model.init(jax.random.PRNGKey(0), x)

    layer_fn = jax.jit(lambda v, x: model.apply(v, x, training=False, method=model.layer))
    layer_s = _median_seconds(lambda: layer_fn(variables, x).values, repeats=5)

    block = model.block_size * block_blocks
    state = model.apply(
        variables, batch, x.channel_spec, training=False, method=model.get_initial_state
    )
    step_fn = jax.jit(
        lambda v, x, s: model.apply(v, x, s, training=False, method=model.step),
        donate_argnums=(2,),
    )
    chunk = x[:, :block]
    steps = max(1, frames // block)

    def run_steps() -> Any:
        nonlocal state
        y = None
        for _ in range(steps):
            y, state = step_fn(variables, chunk, state)
        return y.values

    step_s = _median_seconds(run_steps, repeats=3)
    return {
        "layer_frames_per_s": batch * frames / layer_s,
        "step_frames_per_s": batch * steps * block / step_s,
        "step_ms": 1000 * step_s / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="substring of stack names to run")
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write results here")
    args = parser.parse_args()

    results = []
    print(f"backend={jax.default_backend()} devices={jax.devices()}")
    print(f"{'stack':<22}{'batch':>6}{'block':>6}{'layer f/s':>14}{'step f/s':>14}{'step ms':>10}")
    for name, (config, channels) in _stacks().items():
        if args.only and args.only not in name:
            continue
        for batch in (1, 32):
            for blocks in (1, 8):
                r = bench_one(config, channels, batch, blocks, args.frames)
                sys.stdout.flush()
                block = sl.utils.get_block_size(config) * blocks
                results.append({"stack": name, "batch": batch, "block": block, **r})
                print(
                    f"{name:<22}{batch:>6}{block:>6}{r['layer_frames_per_s']:>14.0f}"
                    f"{r['step_frames_per_s']:>14.0f}{r['step_ms']:>10.2f}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
