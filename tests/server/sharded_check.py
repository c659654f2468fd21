"""Run as a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4:
slots sharded over 4 CPU devices give the same outputs as unsharded."""

from __future__ import annotations

import asyncio
import sys

import jax
import numpy as np

import sequence_layers as sl
from server.model import ServableModel, init_variables
from server.runtime import Engine, SchedulerConfig
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
        sched.stop()
    for x, a, b in zip(inputs, outputs[True], outputs[False], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, model.offline(x), rtol=1e-5, atol=1e-5)
    print("SHARDED_OK")


if __name__ == "__main__":
    main()
    sys.exit(0)
