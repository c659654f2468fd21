"""The slot table and the engine around it, with a fake device (no XLA).

Scheduler tests drive `Scheduler` by hand on made-up times; engine tests run
the real tick thread and event loops over `FakeDevice`. The fake model is a
delay line whose `layer()` is the identity (tests/server/fake_device.py),
so every stream must get back exactly what it sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from sequence_layers import testing
from server.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from server.runtime import MAX_IN_FLIGHT, Ended, Engine, Output, SchedulerConfig, policy
from server.runtime import scheduler as scheduler_module
from server.runtime.scheduler import Scheduler, Tick
from server.runtime.stream import CANCELLED, Phase, Stream
from server.stats import StreamStats
from tests.server.fake_device import FakeDevice, FakeModel
from tests.server.streaming import drive


class Harness:
    """A `Scheduler` over a `FakeDevice`, driven tick by tick at `now`."""

    def __init__(self, latency: int = 0, chunk: int = 4, **config: Any) -> None:
        config.setdefault("max_streams", 4)
        self.config = SchedulerConfig(chunk_blocks=chunk // 2, **config)
        self.device = FakeDevice(self.config.max_streams, chunk, latency)
        self.stats: list[Any] = []
        self.scheduler = Scheduler(
            "fake",
            self.config,
            chunk_frames=chunk,
            input_latency=latency,
            output_latency=latency,
            record=self.stats.append,
        )
        self.scheduler.accepting = True
        self.now = 0.0
        self.items: dict[str, list[Any]] = {}

    def add(self, name: str) -> Stream:
        return self.scheduler.add(name, self.now)

    def push(self, stream: Stream, x: Any) -> bool:
        return self.scheduler.push(stream, np.asarray(x, np.float32).reshape(-1, 1), self.now)

    def add_ready(self, prefix: str, n: int, frames: int = 4) -> list[Stream]:
        """`n` new streams, each sent `frames` frames now."""
        streams = [self.add(f"{prefix}{i}") for i in range(n)]
        for stream in streams:
            self.push(stream, np.ones(frames))
        return streams

    def collect(self, deliveries: list[tuple[Stream, Any]]) -> None:
        for stream, item in deliveries:
            self.items.setdefault(stream.stream_id, []).append(item)

    def schedule(self, busy: bool = False) -> tuple[Tick | None, float]:
        out = self.scheduler.schedule(self.now, busy, self.device.staging)
        self.collect(out.deliveries)
        return out.tick, out.wait_s

    def run(self, tick: Tick) -> int:
        self.device.reset_slots(tick.new_slots)
        self.device.write_rows(tick.restores)
        staged = tick.staged
        y, y_mask = self.device.fetch(self.device.dispatch(staged.slots, staged.x, staged.taken))
        deliveries, frames = self.scheduler.update_from_output(tick, y, y_mask, self.now, 0.001)
        self.collect(deliveries)
        return frames

    def step(self) -> Tick | None:
        tick, _ = self.schedule()
        if tick is not None:
            self.run(tick)
        return tick

    def output(self, name: str) -> np.ndarray:
        frames = [i.frames[:, 0] for i in self.items.get(name, []) if isinstance(i, Output)]
        return np.concatenate(frames) if frames else np.zeros((0,), np.float32)

    def outcomes(self) -> list[str]:
        return [s.outcome for s in self.stats if isinstance(s, StreamStats)]


def test_admission_refuses_when_full_and_cancel_frees_the_slot() -> None:
    h = Harness(max_streams=2)
    a, _ = h.add("a"), h.add("b")
    with pytest.raises(ResourceExhausted, match="maximum of 2 streams"):
        h.add("c")
    h.collect(h.scheduler.cancel(a, None, "cancelled"))
    assert h.items["a"] == [CANCELLED] and a.phase is Phase.DONE
    assert h.scheduler.free_slots == 1
    assert h.add("c").slot == a.slot
    assert h.outcomes() == ["rejected", "cancelled"]


def test_refuses_while_compiling_or_draining() -> None:
    h = Harness()
    h.scheduler.accepting = False
    with pytest.raises(Unavailable, match="still compiling"):
        h.add("a")
    h.scheduler.accepting, h.scheduler.draining = True, True
    with pytest.raises(Unavailable, match="draining"):
        h.add("a")


def test_model_at_capacity_refuses_new_streams_until_the_load_goes() -> None:
    # Two real-time streams whose every chunk waits 100 ms (twice the
    # budget) for its tick: the model cannot keep its budget, so a third
    # stream is refused although slots are free; admitted ones go on.
    h = Harness(max_streams=8, latency_budget_ms=50)
    a, b = h.add("a"), h.add("b")
    for _ in range(30):
        h.push(a, np.ones(4))
        h.push(b, np.ones(4))
        h.now += 2 * scheduler_module.SENDERS_TTL_S
        assert h.step() is not None
    with pytest.raises(ResourceExhausted, match="at capacity"):
        h.add("c")
    assert h.scheduler.snapshot(h.now).overloaded
    for s in (a, b):
        h.collect(h.scheduler.cancel(s, None, "cancelled"))
    h.add("c")  # no load left: admitted


def test_admission_predicts_from_streams_still_sending() -> None:
    # Six streams send a chunk every 0.4 s (2.5 a second each) to a device
    # measured at 18 rows a second (admission keeps 0.9 of it: 16.2).
    h = Harness(max_streams=16, latency=2)
    streams = [h.add(f"s{i}") for i in range(6)]
    for _ in range(4):
        for stream in streams:
            h.push(stream, np.ones(4))
        while h.step() is not None:
            pass
        h.now += 0.4
    assert all(s.period == pytest.approx(0.4) for s in streams)
    h.scheduler.steps.capacity = 18.0
    with pytest.raises(ResourceExhausted, match="send about as many chunks"):
        h.add("x")  # 7 x 2.5 = 17.5 > 16.2
    # Two streams end: flushing their latency, they send nothing more and
    # do not count (counted, the next stream would be refused as above).
    for stream in streams[:2]:
        h.collect(h.scheduler.end(stream, h.now))
        assert stream.phase is Phase.ENDING
    h.now += 2 * scheduler_module.SENDERS_TTL_S
    h.add("y")  # 5 x 2.5
    # Within one pass's lifetime, admitted streams are counted as they come.
    h.add("z")  # 6 x 2.5
    with pytest.raises(ResourceExhausted, match="send about as many chunks"):
        h.add("w")  # 7 x 2.5


def test_timely_chunks_do_not_count_as_overload() -> None:
    h = Harness(max_streams=8)
    a, b = h.add("a"), h.add("b")
    for _ in range(60):
        h.push(a, np.ones(4))
        h.push(b, np.ones(4))
        h.now += 0.002
        h.step()
        h.now += 2 * scheduler_module.SENDERS_TTL_S
    snap = h.scheduler.snapshot(h.now)
    assert snap.recent_chunks > 0 and snap.late_chunks == 0 and not snap.overloaded
    h.add("c")


@pytest.mark.parametrize("n", [0, 1, 5, 8, 13])
def test_end_flushes_the_latency_and_returns_exactly_the_input(n: int) -> None:
    h = Harness(latency=3, chunk=4)
    s = h.add("a")
    x = np.arange(1, n + 1, dtype=np.float32)
    h.push(s, x)
    h.collect(h.scheduler.end(s, h.now))
    while h.step() is not None:
        pass
    testing.assert_allclose(h.output("a"), x)
    ticks = -(-(n + 3) // 4) if n else 0  # the input and 3 latency frames, in chunks of 4
    assert h.items["a"][-1] == Ended(n, n, ticks)
    assert h.scheduler.active_streams == 0 and h.outcomes() == ["ok"]


def test_end_while_the_last_chunk_is_in_flight_ends_on_its_delivery() -> None:
    h = Harness(chunk=4)
    s = h.add("a")
    h.push(s, np.arange(8))
    first, _ = h.schedule()
    second, _ = h.schedule(busy=True)  # dispatched ahead: a backlog
    assert first is not None and second is not None
    assert h.scheduler.look_ahead_ticks == 1
    assert h.schedule(busy=True)[0] is None  # nothing left to take
    h.collect(h.scheduler.end(s, h.now))  # nothing to flush: the tick in flight is the last
    assert h.items.get("a") is None
    h.run(first)
    h.run(second)
    offsets = [i.offset for i in h.items["a"] if isinstance(i, Output)]
    assert offsets == [0, 4]  # delivered in dispatch order
    assert h.items["a"][-1] == Ended(8, 8, 2)
    testing.assert_allclose(h.output("a"), np.arange(8, dtype=np.float32))


def test_a_stream_has_at_most_two_chunks_in_flight() -> None:
    h = Harness(chunk=4)
    s = h.add("a")
    h.push(s, np.arange(40))
    ticks = [h.schedule(busy=i > 0)[0] for i in range(3)]
    assert ticks[0] is not None and ticks[1] is not None and ticks[2] is None
    assert len(s.in_flight) == MAX_IN_FLIGHT


def test_new_stream_resets_its_slot_before_its_first_step_only() -> None:
    h = Harness(chunk=4)
    s = h.add("a")
    h.push(s, np.arange(8))
    first = h.step()
    second = h.step()
    assert first is not None and first.new_slots == [s.slot]
    assert second is not None and second.new_slots == []


def test_partial_tick_pads_its_bucket_and_full_tick_is_in_slot_order() -> None:
    h = Harness(chunk=4, max_streams=6, buckets=(4, 8))
    streams = [h.add(str(i)) for i in range(6)]
    for s in streams[:3]:
        h.push(s, np.ones(4))
    h.now += 0.01  # past the short delay; nobody else is expected
    tick, _ = h.schedule()
    assert tick is not None and tick.bucket == 4
    assert list(tick.staged.slots) == [0, 1, 2, h.device.rows]
    assert list(tick.staged.taken) == [4, 4, 4, 0]
    h.run(tick)
    for s in reversed(streams):
        h.push(s, np.ones(4))
    tick, _ = h.schedule()  # every stream ready: no wait
    assert tick is not None and tick.bucket == 6
    assert [s.slot for s in tick.streams] == list(range(6))


def test_batching_waits_for_a_stream_that_is_expected() -> None:
    h = Harness(chunk=4, max_streams=4)
    a, b, _idle = h.add("a"), h.add("b"), h.add("idle")
    for k in range(4):
        h.now = k * 0.1
        h.push(a, np.ones(4))
        tick, wait = h.schedule()
        if k < 2:  # no period known for b yet: a goes alone after the short delay
            h.now += 0.005
            tick, wait = h.schedule()
            assert tick is not None and len(tick.streams) == 1
            h.run(tick)
            h.now = k * 0.1 + 0.01
            h.push(b, np.ones(4))
            h.now += 0.005
            tick, _ = h.schedule()
            assert tick is not None
            h.run(tick)
        else:  # b is due 10 ms after a: a waits for it, and they tick together
            assert tick is None and wait == pytest.approx(0.015, abs=1e-6)
            h.now += 0.01
            assert h.push(b, np.ones(4))
            tick, _ = h.schedule()
            assert tick is not None and {s.stream_id for s in tick.streams} == {"a", "b"}
            h.run(tick)


def test_a_burst_of_chunks_does_not_make_a_stream_expected_sooner() -> None:
    # A moved stream resends its unacknowledged audio at once, then goes on
    # in real time: predicted from the burst's intervals, it was waited for
    # before its next chunk could come.
    h = Harness(chunk=4, max_streams=2)
    s = h.add("s")
    for k in range(4):
        h.now = k * 0.16
        h.push(s, np.ones(4))
        assert h.step() is not None
    assert s.expected_at == pytest.approx(0.48 + 0.16)
    for k in range(1, 3):  # each stepped before the next arrives
        h.now = 0.48 + k * 0.005
        h.push(s, np.ones(4))
        assert h.step() is not None
    assert s.expected_at == pytest.approx(0.49 + 0.16)


def test_idle_stream_times_out_and_frees_its_slot() -> None:
    h = Harness(idle_timeout_s=1.0)
    s = h.add("a")
    h.push(s, np.ones(1))
    h.now = 0.9
    h.schedule()
    assert s.phase is Phase.OPEN
    h.now = 1.01
    h.schedule()
    assert isinstance(h.items["a"][-1], DeadlineExceeded)
    assert h.scheduler.free_slots == 4 and h.outcomes() == ["timeout"]


def test_backpressure_pauses_a_stream_and_a_slow_consumer_is_ended() -> None:
    h = Harness(chunk=4, max_output_backlog=1, slow_consumer_timeout_s=2.0)
    s = h.add("a")
    h.push(s, np.arange(12))
    assert h.step() is not None
    assert s.backlog == 1 and s.ready_since is None  # not scheduled while unread
    h.now += 1.0
    assert h.schedule()[0] is None
    assert s.mark_read(h.now)  # read: below the limit again
    assert h.step() is not None
    h.now += 2.5  # not read for longer than the timeout
    h.schedule()
    assert isinstance(h.items["a"][-1], ResourceExhausted)
    assert "did not read" in str(h.items["a"][-1]) and h.outcomes() == ["error"]
    testing.assert_allclose(h.output("a"), np.arange(8, dtype=np.float32))


def test_cancelled_stream_loses_its_outputs_in_flight_others_keep_theirs() -> None:
    h = Harness(chunk=4)
    a, b = h.add("a"), h.add("b")
    h.push(a, np.ones(4))
    h.push(b, np.full(4, 2.0))
    tick, _ = h.schedule()
    assert tick is not None and len(tick.streams) == 2
    h.collect(h.scheduler.cancel(a, None, "cancelled"))
    h.run(tick)
    assert h.items["a"] == [CANCELLED]
    testing.assert_allclose(h.output("b"), np.full(4, 2.0, np.float32))


def test_failed_tick_ends_only_its_streams() -> None:
    h = Harness(chunk=4)
    a, b = h.add("a"), h.add("b")
    h.push(a, np.ones(4))
    h.now += 0.01
    tick, _ = h.schedule()
    assert tick is not None and tick.streams == [a]
    h.collect(h.scheduler.fail_tick(tick, RuntimeError("boom")))
    assert isinstance(h.items["a"][-1], ResourceExhausted)
    assert "device step failed" in str(h.items["a"][-1])
    assert b.phase is Phase.OPEN and not a.in_flight


def test_push_errors_keep_the_stream() -> None:
    h = Harness(chunk=4, max_buffered_frames=6)
    s = h.add("a")
    h.push(s, np.ones(4))
    with pytest.raises(ResourceExhausted, match="buffer full"):
        h.push(s, np.ones(3))
    h.collect(h.scheduler.end(s, h.now))
    with pytest.raises(InvalidArgument, match="after end"):
        h.push(s, np.ones(1))


# The engine: tick thread, event loops and the fake device ---------------------------


@pytest.fixture
def engine() -> Any:
    model = FakeModel(latency=3)
    config = SchedulerConfig(
        max_streams=8, chunk_blocks=2, max_batch_delay_ms=1, buckets=(2, 8), max_output_backlog=2
    )
    eng = Engine(model, config, device=FakeDevice(8, 4, 3))  # type: ignore[arg-type]
    eng.start()
    yield eng
    eng.stop()


def test_engine_streams_get_exactly_their_input(engine: Engine) -> None:
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(int(n), 1)).astype(np.float32) for n in rng.integers(0, 60, 16)]

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(
            *(
                drive(lambda: engine.open_stream(loop), x, np.random.default_rng(i), 9, (1,))
                for i, x in enumerate(inputs[:8])
            )
        )

    for _ in range(2):  # the second round reuses every slot
        for x, (y, ended) in zip(inputs[:8], asyncio.run(main()), strict=True):
            testing.assert_allclose(y, x)
            assert ended.frames_in == ended.frames_out == len(x)
        inputs = inputs[8:] + inputs[:8]
    assert engine.active_streams == 0


def test_engine_plans_the_next_tick_before_the_device_is_free() -> None:
    # Ticks take 40 ms. Stream A's chunks come every 10 ms; B is open but
    # sends nothing, so A's ticks are never a backlog (B may still join).
    # The next tick must still be dispatched while the one before runs
    # (within `_LEAD_S` of its end), not after its outputs are delivered:
    # waiting left the device idle for the host's staging and launch.
    device = FakeDevice(4, 4, 3)
    device.seconds = 0.04
    config = SchedulerConfig(max_streams=4, chunk_blocks=2, max_batch_delay_ms=1, buckets=(4,))
    eng = Engine(FakeModel(latency=3), config, device=device)  # type: ignore[arg-type]
    eng.start()
    x = np.arange(4 * 30, dtype=np.float32)[:, None]

    async def main() -> tuple[np.ndarray, Any]:
        loop = asyncio.get_running_loop()
        idle = eng.open_stream(loop)
        a = eng.open_stream(loop)
        frames: list[np.ndarray] = []

        async def read() -> Any:
            async for item in a.outputs():
                if isinstance(item, Output):
                    frames.append(item.frames)
                else:
                    return item

        reader = asyncio.create_task(read())
        for i in range(0, len(x), 4):
            a.send(x[i : i + 4])
            await asyncio.sleep(0.01)
        a.end()
        ended = await reader
        idle.cancel()
        return np.concatenate(frames), ended

    try:
        y, ended = asyncio.run(main())
    finally:
        eng.stop()
    testing.assert_allclose(y, x)
    assert ended.frames_out == len(x)
    assert device.overlapped >= 5, device.overlapped


def test_engine_cancel_frees_the_slot_at_once(engine: Engine) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for i in range(500):
            stream = engine.open_stream(loop)
            if i % 3 == 0:
                stream.send(np.zeros((i % 7, 1), np.float32))
            stream.cancel()
        assert engine.active_streams == 0 and engine.scheduler.free_slots == 8

    asyncio.run(main())


def test_engine_slow_reader_is_paused_and_loses_nothing(engine: Engine) -> None:
    x = np.arange(200, dtype=np.float32)[:, None]

    async def main() -> tuple[np.ndarray, int]:
        stream = engine.open_stream(asyncio.get_running_loop())
        stream.send(x)
        stream.end()
        frames, most = [], 0
        async for item in stream.outputs():
            if isinstance(item, Output):
                frames.append(item.frames)
            await asyncio.sleep(0.002)
            most = max(most, stream.backlog)
        return np.concatenate(frames), most

    y, most = asyncio.run(main())
    testing.assert_allclose(y, x)
    assert 2 <= most <= 2 + MAX_IN_FLIGHT


def test_engine_device_failure_ends_the_tick_and_serving_goes_on(engine: Engine) -> None:
    x = np.arange(20, dtype=np.float32)[:, None]

    async def run() -> np.ndarray:
        stream = engine.open_stream(asyncio.get_running_loop())
        stream.send(x)
        stream.end()
        return np.concatenate([i.frames async for i in stream.outputs() if isinstance(i, Output)])

    engine.device.fail_next = True  # type: ignore[attr-defined]
    with pytest.raises(ResourceExhausted, match="device step failed"):
        asyncio.run(run())
    testing.assert_allclose(asyncio.run(run()), x)


def test_engine_stop_ends_open_streams_with_unavailable() -> None:
    eng = Engine(FakeModel(), SchedulerConfig(max_streams=2), device=FakeDevice(2, 2, 0))  # type: ignore[arg-type]
    eng.start()

    async def main() -> None:
        stream = eng.open_stream(asyncio.get_running_loop())
        eng.stop()
        with pytest.raises(Unavailable, match="shutting down"):
            async for _ in stream.outputs():
                pass
        with pytest.raises(Unavailable, match="draining"):
            eng.open_stream()

    asyncio.run(main())


def test_a_split_tick_takes_on_time_streams_before_those_catching_up() -> None:
    # 8 streams catching up (each sent 3 chunks at once, as a moved stream
    # resends its unacknowledged audio) and 32 on time: a tick of 32 (the
    # cheaper bucket by the tick times) takes the 32 on time; the others go
    # next tick, although they have been ready longer.
    h = Harness(max_streams=96, buckets=(32, 64, 96), latency_budget_ms=50)
    for bucket, seconds in {32: 0.010, 64: 0.040, 96: 0.060}.items():
        h.scheduler.tick_times.seed(bucket, seconds)
    behind = [h.add(f"b{i}") for i in range(8)]
    for s in behind:
        h.push(s, np.ones(12))
    first = h.step()
    assert first is not None and len(first.streams) == 8
    h.now += 0.01
    on_time = h.add_ready("r", 32)
    tick, _ = h.schedule()
    assert tick is not None
    assert {s.stream_id for s in tick.streams} == {s.stream_id for s in on_time}
    h.run(tick)
    # Catching up, they still go within a budget: next tick here, and first
    # once they have waited the whole budget.
    h.now += 0.06
    for s in on_time:
        h.push(s, np.ones(4))
    tick, _ = h.schedule()
    assert tick is not None and {s.stream_id for s in behind} <= {s.stream_id for s in tick.streams}


def test_company_is_waited_for_only_within_the_budget_less_delivery() -> None:
    # Two groups of 4 streams send every 100 ms, the second 46 ms after the
    # first; ticks take about a millisecond. Waiting for the second group
    # and ticking would end at 47 ms, inside a 50 ms budget but not inside
    # what the tick may use of it (`policy.planning_budget`: the door's
    # write of the outputs comes after): the first group goes alone, at
    # the delay.
    h = Harness(max_streams=8, latency_budget_ms=50, max_batch_delay_ms=5)
    first = [h.add(f"a{i}") for i in range(4)]
    second = [h.add(f"b{i}") for i in range(4)]
    events = sorted(
        [(t, first) for t in (0.0, 0.1, 0.2)] + [(t, second) for t in (0.046, 0.146, 0.246)]
    )
    for t, group in events:
        h.now = t
        for stream in group:
            h.push(stream, np.ones(4))
        h.step()
    h.now = 0.29
    while h.step() is not None:
        pass
    assert policy.planning_budget(0.050) == pytest.approx(0.045)
    h.now = 0.30
    for stream in first:
        h.push(stream, np.ones(4))
    tick, wait = h.schedule()
    assert tick is None and wait == pytest.approx(0.005)
    h.now = 0.305
    tick, _ = h.schedule()
    assert tick is not None and set(tick.streams) == set(first)
