"""The built-in models stream exactly like `layer()`: 16 concurrent streams
each, random chunk sizes, random start times; and two of those streams move
(stream migration: one mid-input, one mid-flush) and resume exactly. Input
lengths come from a few values so the offline oracle compiles only a few
times."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.defaults import BUILTIN_MODELS
from server.resume import ResumeKeys
from server.runtime import Engine, SchedulerConfig
from tests.server.streaming import drive, move_and_resume

# name -> (input lengths in frames, largest client chunk)
CASES = {
    "logmel": ((1600, 4321, 8000), 900),
    "demo-asr": ((2600, 7100), 1500),
    "demo-vocoder": ((3, 11, 20), 4),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_model_streams_equal_offline(name: str) -> None:
    model = BUILTIN_MODELS[name]()
    lengths, max_chunk = CASES[name]
    scheduler = Engine(
        model,
        SchedulerConfig(max_streams=16, chunk_blocks=1, max_batch_delay_ms=2, buckets=(16,)),
    )
    scheduler.resume_keys = ResumeKeys((b"d" * 40,))
    scheduler.start()
    try:
        rng = np.random.default_rng(0)
        inputs = [
            (rng.normal(size=(lengths[i % len(lengths)], *model.input_shape)) * 0.1).astype(
                np.float32
            )
            for i in range(16)
        ]
        out_shape = tuple(model.output_spec.shape)

        async def main() -> list:
            loop = asyncio.get_running_loop()
            return await asyncio.gather(
                *(
                    drive(
                        lambda: scheduler.open_stream(loop),
                        x,
                        np.random.default_rng(100 + i),
                        max_chunk,
                        out_shape,
                    )
                    for i, x in enumerate(inputs)
                )
            )

        results = asyncio.run(main())
        for x, (y, ended) in zip(inputs, results, strict=True):
            ref = model.offline(x)  # jit caches per input length: 3 compiles
            assert y.shape == ref.shape, (name, len(x), y.shape, ref.shape)
            assert len(y) > 0
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
            assert ended.frames_in == len(x) and ended.frames_out == len(y)
        assert scheduler.active_streams == 0
        # Migration: every state leaf (KV caches, conv buffers, STFT frames)
        # and the latency flush survive a move; the engine is compiled already.
        moved = asyncio.run(move_and_resume(scheduler, inputs[:2]))
        for x, y in zip(inputs[:2], moved, strict=True):
            np.testing.assert_allclose(y, model.offline(x), rtol=1e-5, atol=1e-5)
        assert scheduler.active_streams == 0
    finally:
        scheduler.stop()
