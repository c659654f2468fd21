"""The runtime's central promise: every stream, batched with arbitrary others,
gets exactly `layer()` of its own input."""

from __future__ import annotations

import asyncio

import jax
import numpy as np
import pytest

import sequence_layers as sl
from server.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from server.model import ServableModel, init_variables
from server.runtime import (
    MAX_IN_FLIGHT,
    Ended,
    Engine,
    Output,
    SchedulerConfig,
    StreamHandle,
    buckets_for,
)
from tests.server.streaming import drive


def _model(name: str, config: sl.SequenceLayerConfig, channels: int) -> ServableModel:
    return ServableModel(name, config, init_variables(config, (channels,), seed=1), (channels,))


# Small models covering ratio < 1, > 1 and nonzero input/output latency.
MODELS = {
    # reverse_causal lookahead (in/out latency 4), stride 2 (ratio 1/2, block 2), LSTM state.
    "downsample_latency": lambda: _model(
        "downsample_latency",
        sl.Serial.Config(
            (
                sl.Conv1D.Config(filters=6, kernel_size=5, padding="reverse_causal"),
                sl.Conv1D.Config(filters=6, kernel_size=3, strides=2, padding="causal"),
                sl.LSTM.Config(units=5),
            )
        ),
        3,
    ),
    # ratio 2 through a causal transposed conv, then a causal conv.
    "upsample": lambda: _model(
        "upsample",
        sl.Serial.Config(
            (
                sl.Conv1DTranspose.Config(filters=4, kernel_size=4, strides=2, padding="causal"),
                sl.Conv1D.Config(filters=3, kernel_size=3, padding="causal"),
            )
        ),
        2,
    ),
}


def _run(scheduler: Engine, inputs: list[np.ndarray], max_chunk: int, seed: int) -> list:
    out_shape = tuple(scheduler.model.output_spec.shape)

    async def main() -> list:
        loop = asyncio.get_running_loop()
        tasks = [
            drive(
                lambda: scheduler.open_stream(loop),
                x,
                np.random.default_rng(seed * 1000 + i),
                max_chunk,
                out_shape,
            )
            for i, x in enumerate(inputs)
        ]
        return await asyncio.gather(*tasks)

    return asyncio.run(main())


@pytest.fixture(scope="module", params=sorted(MODELS))
def scheduler(request: pytest.FixtureRequest):
    model = MODELS[request.param]()
    sched = Engine(
        model,
        SchedulerConfig(max_streams=16, chunk_blocks=2, max_batch_delay_ms=1, buckets=(4, 16)),
    )
    sched.start()
    yield sched
    sched.stop()


def test_concurrent_streams_equal_offline(scheduler: Engine) -> None:
    rng = np.random.default_rng(0)
    channels = scheduler.model.input_shape
    # Lengths from a few values: the offline oracle compiles once per
    # distinct length, and that dominated this test.
    lengths = rng.choice([1, 7, 31, 59], size=16)
    inputs = [rng.normal(size=(int(n), *channels)).astype(np.float32) for n in lengths]
    results = _run(scheduler, inputs, max_chunk=3 * scheduler.chunk_frames, seed=1)
    for x, (y, ended) in zip(inputs, results, strict=True):
        expected = scheduler.model.offline(x)
        assert y.shape == expected.shape
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        assert ended.frames_in == len(x) and ended.frames_out == len(y)
    assert scheduler.active_streams == 0


def test_huge_values_do_not_leak_into_other_streams(scheduler: Engine) -> None:
    rng = np.random.default_rng(2)
    channels = scheduler.model.input_shape
    normal = [rng.normal(size=(40, *channels)).astype(np.float32) for _ in range(5)]
    huge = [(rng.normal(size=(40, *channels)) * 1e30).astype(np.float32) for _ in range(3)]
    results = _run(scheduler, normal + huge, max_chunk=5, seed=3)
    for x, (y, _) in zip(normal, results[: len(normal)], strict=True):
        np.testing.assert_allclose(y, scheduler.model.offline(x), rtol=1e-5, atol=1e-5)


def test_reused_slot_starts_from_initial_state(scheduler: Engine) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, *scheduler.model.input_shape)).astype(np.float32)
    first = _run(scheduler, [x * 50], max_chunk=7, seed=5)
    second = _run(scheduler, [x], max_chunk=7, seed=6)
    assert first and second
    np.testing.assert_allclose(second[0][0], scheduler.model.offline(x), rtol=1e-5, atol=1e-5)


def test_backlog_overlaps_ticks_and_equals_offline(scheduler: Engine) -> None:
    # Whole inputs sent at once: every stream has its next chunk ready while
    # a tick runs, so ticks are dispatched ahead and each stream has two
    # chunks in flight; `end` lands while they are (exact multiples of the
    # chunk), so the last one in flight must carry the end.
    rng = np.random.default_rng(7)
    chunk, channels = scheduler.chunk_frames, scheduler.model.input_shape
    # Whole chunks or not (alternating); a few distinct lengths, so the
    # offline oracle compiles a few times, not 16.
    lengths = [chunk * int(rng.choice([3, 7])) + (i % 2) * max(chunk // 2, 1) for i in range(16)]
    inputs = [rng.normal(size=(n, *channels)).astype(np.float32) for n in lengths]
    before = scheduler.look_ahead_ticks

    async def one(x: np.ndarray) -> np.ndarray:
        session = scheduler.open_stream(asyncio.get_running_loop())
        session.send(x)
        session.end()
        frames = [item.frames async for item in session.outputs() if isinstance(item, Output)]
        return np.concatenate(frames)

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(one(x) for x in inputs))

    for x, y in zip(inputs, asyncio.run(main()), strict=True):
        np.testing.assert_allclose(y, scheduler.model.offline(x), rtol=1e-5, atol=1e-5)
    assert scheduler.look_ahead_ticks > before
    assert scheduler.active_streams == 0


def test_buckets_are_powers_of_two() -> None:
    assert buckets_for(1) == [1]
    assert buckets_for(12) == [1, 2, 4, 8, 16]
    assert buckets_for(16) == [1, 2, 4, 8, 16]


@pytest.fixture(scope="module")
def small() -> Engine:
    model = MODELS["downsample_latency"]()
    sched = Engine(
        model,
        SchedulerConfig(max_streams=4, max_batch_delay_ms=1, idle_timeout_s=0.3, buckets=(4,)),
    )
    sched.start()
    yield sched
    sched.stop()


def test_open_cancel_cycles_free_every_slot(small: Engine) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(2000):
            session = small.open_stream(loop)
            if i % 3 == 0:
                session.send(np.zeros((i % 7, 3), np.float32))
            session.cancel()
        assert small.active_streams == 0
        assert small.scheduler.free_slots == 4

    asyncio.run(main())


def test_admission_refuses_when_full(small: Engine) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        sessions = [small.open_stream(loop) for _ in range(4)]
        with pytest.raises(ResourceExhausted, match="maximum of 4 streams"):
            small.open_stream(loop)
        for s in sessions:
            s.cancel()
        small.open_stream(loop).cancel()

    asyncio.run(main())


def test_idle_stream_times_out_and_frees_slot(small: Engine) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        session = small.open_stream(loop)
        session.send(np.ones((3, 3), np.float32))
        with pytest.raises(DeadlineExceeded, match="idle timeout"):
            async for _ in session.outputs():
                pass
        assert small.active_streams == 0

    asyncio.run(main())


def test_draining_refuses_new_streams(small: Engine) -> None:
    async def main() -> None:
        small.draining = True
        try:
            with pytest.raises(Unavailable):
                small.open_stream(asyncio.get_running_loop())
        finally:
            small.draining = False

    asyncio.run(main())


def test_empty_stream_ends_at_once(small: Engine) -> None:
    async def main() -> None:
        session = small.open_stream(asyncio.get_running_loop())
        session.end()
        items = [item async for item in session.outputs()]
        assert items == [Ended(0, 0, 0)]

    asyncio.run(main())


def test_bad_chunks_are_refused_and_stream_survives(small: Engine) -> None:
    from server.errors import InvalidArgument

    async def main() -> None:
        session = small.open_stream(asyncio.get_running_loop())
        with pytest.raises(InvalidArgument, match="shape"):
            session.send(np.zeros((4, 5), np.float32))
        with pytest.raises(InvalidArgument, match="non-finite"):
            session.send(np.full((4, 3), np.nan, np.float32))
        with pytest.raises(InvalidArgument, match="dtype"):
            session.send(np.zeros((4, 3), np.float64))
        x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
        session.send(x)
        session.end()
        frames = [i.frames async for i in session.outputs() if isinstance(i, Output)]
        np.testing.assert_allclose(
            np.concatenate(frames), small.model.offline(x), rtol=1e-5, atol=1e-5
        )

    asyncio.run(main())


def test_state_is_resident_and_slot_major(small: Engine) -> None:
    leaves = jax.tree.leaves(small.device.state)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert all(small.device.rows in leaf.shape for leaf in leaves)


@pytest.mark.parametrize("state_lost", [False, True])
def test_device_failure_ends_its_streams_and_serving_goes_on(
    small: Engine, monkeypatch: pytest.MonkeyPatch, state_lost: bool
) -> None:
    # A failing device call ends the streams in that tick with
    # RESOURCE_EXHAUSTED. If it took the donated state with it, every stream's
    # state is gone: all end, and the slots start over from a fresh state.
    real = small.device.dispatch

    def failing(*args: object) -> object:
        monkeypatch.setattr(small.device, "dispatch", real)  # fail once
        if state_lost:
            for leaf in jax.tree.leaves(small.device.state):
                leaf.delete()
        raise RuntimeError("device lost")

    x = np.random.default_rng(9).normal(size=(24, 3)).astype(np.float32)

    async def run(session: StreamHandle, data: np.ndarray) -> list[np.ndarray]:
        session.send(data)
        session.end()
        return [i.frames async for i in session.outputs() if isinstance(i, Output)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        idle = small.open_stream(loop)  # open, never sends: not in the failing tick
        monkeypatch.setattr(small.device, "dispatch", failing)
        with pytest.raises(ResourceExhausted, match="device step failed"):
            await run(small.open_stream(loop), x)
        if state_lost:
            with pytest.raises(ResourceExhausted, match="state lost"):
                async for _ in idle.outputs():
                    pass
        else:
            idle.cancel()
        frames = await run(small.open_stream(loop), x)
        np.testing.assert_allclose(
            np.concatenate(frames), small.model.offline(x), rtol=1e-5, atol=1e-5
        )

    asyncio.run(main())
    assert small.active_streams == 0


def test_slow_reader_pauses_its_stream_and_resumes_exactly() -> None:
    # Backpressure: with 2 outputs allowed to wait, a reader slower than
    # the device stops its stream's ticks (the backlog stays bounded), and
    # each read lets it go on, without losing or reordering a frame.
    model = MODELS["upsample"]()
    sched = Engine(
        model,
        SchedulerConfig(
            max_streams=2, chunk_blocks=1, max_batch_delay_ms=1, buckets=(2,), max_output_backlog=2
        ),
    )
    sched.start()
    x = np.random.default_rng(5).normal(size=(40, 2)).astype(np.float32)

    async def main() -> tuple[list[np.ndarray], int]:
        session = sched.open_stream(asyncio.get_running_loop())
        session.send(x)
        session.end()
        frames, most = [], 0
        async for item in session.outputs():
            if isinstance(item, Output):
                frames.append(item.frames)
            await asyncio.sleep(0.01)
            # Before the next read: the device has had time to fill the queue.
            most = max(most, session.backlog)
        return frames, most

    try:
        frames, most = asyncio.run(main())
    finally:
        sched.stop()
    np.testing.assert_allclose(np.concatenate(frames), model.offline(x), rtol=1e-5, atol=1e-5)
    # The queue filled (the reader was the bottleneck) but stayed bounded:
    # at most the chunks already on the device when it filled.
    assert 2 <= most <= 2 + MAX_IN_FLIGHT
