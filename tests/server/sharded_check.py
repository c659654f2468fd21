"""Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4:
slots sharded over 4 CPU devices give the same outputs as unsharded."""

from __future__ import annotations

import asyncio
import sys

import jax
import numpy as np

import sequence_layers as sl
from server.model import ServableModel, init_variables
from server.resume import ResumeKeys
from server.runtime import Ended, Engine, Moved, Output, SchedulerConfig, StreamHandle
from tests.server.streaming import drive


def main() -> None:
    assert jax.local_device_count() == 4, jax.devices()
    config = sl.Serial.Config(
        (
            sl.Conv1D.Config(filters=6, kernel_size=5, padding="reverse_causal"),
            sl.Conv1D.Config(filters=6, kernel_size=3, strides=2, padding="causal"),
            sl.LSTM.Config(units=5),
        )
    )
    model = ServableModel("m", config, init_variables(config, (3,), seed=1), (3,))
    rng = np.random.default_rng(0)
    # A few distinct lengths: the offline oracle compiles once per length.
    lengths = rng.choice([1, 17, 49], size=10)
    inputs = [rng.normal(size=(int(n), 3)).astype(np.float32) for n in lengths]
    outputs = {}
    for shard in (True, False):
        sched = Engine(
            model,
            SchedulerConfig(
                max_streams=10, chunk_blocks=2, max_batch_delay_ms=1, shard=shard, buckets=(4, 16)
            ),
        )
        if shard:
            sched.resume_keys = ResumeKeys((b"s" * 40,))
        sched.start()
        if shard:
            leaf = jax.tree.leaves(sched.device.state)[0]
            assert len(leaf.sharding.device_set) == 4, leaf.sharding

        async def run(sched: Engine = sched) -> list:
            loop = asyncio.get_running_loop()
            return await asyncio.gather(
                *(
                    drive(lambda: sched.open_stream(loop), x, np.random.default_rng(i), 5, (5,))
                    for i, x in enumerate(inputs)
                )
            )

        outputs[shard] = [y for y, _ in asyncio.run(run())]
        if shard:
            x = rng.normal(size=(49, 3)).astype(np.float32)
            y = asyncio.run(move_and_resume(sched, x))
            np.testing.assert_allclose(y, model.offline(x), rtol=1e-5, atol=1e-5)
        sched.stop()
    for x, a, b in zip(inputs, outputs[True], outputs[False], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, model.offline(x), rtol=1e-5, atol=1e-5)
    print("SHARDED_OK")


async def move_and_resume(engine: Engine, x: np.ndarray) -> np.ndarray:
    """Migration on sharded slots: a stream's row read from, and written
    into, state sharded over 4 devices (a reused slot in between)."""
    loop = asyncio.get_running_loop()
    outputs: dict[int, np.ndarray] = {}

    async def drain(handle: StreamHandle) -> object:
        async for item in handle.outputs():
            if isinstance(item, Output):
                outputs[item.offset] = item.frames
            else:
                handle.cancel()
                return item
        raise AssertionError("no last item")

    handle = engine.open_stream(loop)
    handle.send(x[:20])
    await asyncio.sleep(0.05)
    engine.move_streams()
    moved = await drain(handle)
    assert isinstance(moved, Moved) and moved.frames_received == 20, moved
    filler = engine.open_stream(loop)  # takes the freed slot and steps it
    filler.send(x[:8])
    filler.end()
    async for _ in filler.outputs():
        pass
    filler.cancel()
    resumed = engine.open_stream(loop, resume_token=moved.resume_token)
    resumed.send(x[20:])
    resumed.end()
    assert isinstance(await drain(resumed), Ended)
    return np.concatenate([outputs[k] for k in sorted(outputs)])


if __name__ == "__main__":
    main()
    sys.exit(0)
