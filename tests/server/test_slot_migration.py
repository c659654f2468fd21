"""Migration in the slot table, with the fake device (no XLA): a moving
stream stops ticking, moves only once its ticks in flight are delivered
(its `Handoff` after every output), and its snapshot resumed in another
slot table continues exactly (the delay line's output is its input)."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from server.resume import ResumeKeys, StreamSnapshot
from server.runtime import Engine, SchedulerConfig
from server.runtime import engine as engine_module
from server.runtime.stream import Handoff, Phase, Stream
from tests.server.fake_device import FakeDevice, FakeModel
from tests.server.test_slot_scheduler import Harness


def test_moves_after_its_ticks_in_flight_and_resumes_exactly() -> None:
    source, target = Harness(latency=3), Harness(latency=3)
    x = np.arange(1, 31, dtype=np.float32)
    a = source.add("a")
    source.push(a, x[:10])
    first, _ = source.schedule()
    second, _ = source.schedule(busy=True)  # two chunks in flight
    assert first is not None and second is not None
    source.push(a, x[10:17])  # buffered: travels in the token
    assert source.scheduler.begin_moves() == 1
    out = source.scheduler.schedule(source.now, True, source.device.staging)
    assert out.tick is None and out.moves == []  # its ticks are not delivered yet
    source.run(first)
    source.run(second)
    out = source.scheduler.schedule(source.now, False, source.device.staging)
    assert out.tick is None and out.moves == [a]
    row = source.device.read_row(a.slot)
    snapshot = a.snapshot(row, np.zeros((0, 1), np.float32))
    source.collect(source.scheduler.hand_off(a, Handoff(snapshot)))
    assert isinstance(source.items["a"][-1], Handoff) and a.phase is Phase.DONE
    assert source.scheduler.free_slots == source.config.max_streams
    assert (snapshot.frames_received, snapshot.frames_consumed) == (17, 8)
    assert snapshot.buffered_input[:, 0].tolist() == x[8:17].tolist()
    assert snapshot.frames_emitted == 5  # 8 stepped, the first 3 dropped

    filler = target.add("filler")  # the resumed stream lands in another slot
    b, done = target.scheduler.resume("a", target.now, snapshot)
    target.collect(target.scheduler.cancel(filler, None, "cancelled"))
    assert done == [] and b.frames_in == 17
    target.push(b, x[17:])
    target.collect(target.scheduler.end(b, target.now))
    while target.step() is not None:
        pass
    assert target.device.restored == [b.slot] and target.device.resets == []
    moved_then_resumed = np.concatenate([source.output("a"), target.output("a")])
    np.testing.assert_array_equal(moved_then_resumed, x)
    offsets = [i.offset for i in target.items["a"] if hasattr(i, "offset")]
    assert offsets[0] == 5


def test_a_stream_that_never_ticked_moves_with_its_input() -> None:
    h = Harness(latency=2)
    a = h.add("a")
    h.push(a, [1.0, 2.0])  # under a chunk: never stepped
    h.scheduler.begin_moves()
    out = h.scheduler.schedule(h.now, False, h.device.staging)
    assert out.moves == [a] and a.needs_reset
    h.push(a, [3.0])  # arrives before the snapshot: in the token too
    snapshot = a.snapshot(h.device.initial_row(), np.zeros((0, 1), np.float32))
    h.collect(h.scheduler.hand_off(a, Handoff(snapshot)))
    assert snapshot.frames_received == 3 and snapshot.frames_consumed == 0
    assert h.push(a, [4.0]) is False  # after the move: ignored, the client resends it


def _moved_snapshots(xs: list[np.ndarray], sent: int) -> tuple[Harness, list[StreamSnapshot]]:
    """Streams `x[:sent]` of each of `xs` through a source slot table, two
    ticks each, then moves them all; returns the source and their snapshots."""
    source = Harness(latency=3, max_streams=len(xs))
    streams = [source.add(f"m{i}") for i in range(len(xs))]
    for stream, x in zip(streams, xs, strict=True):
        source.push(stream, x[:sent])
    for _ in range(2):
        assert source.step() is not None
    assert source.scheduler.begin_moves() == len(xs)
    out = source.scheduler.schedule(source.now, False, source.device.staging)
    assert out.moves == streams
    snapshots = []
    for stream in streams:
        row = source.device.read_row(stream.slot)
        snapshot = stream.snapshot(row, np.zeros((0, 1), np.float32))
        source.collect(source.scheduler.hand_off(stream, Handoff(snapshot)))
        snapshots.append(snapshot)
    return source, snapshots


def _resumed(target: Harness, snapshots: list[StreamSnapshot], frames: int) -> list[Stream]:
    """`snapshots` resumed on `target`, each resending `frames` frames."""
    streams = []
    for snapshot in snapshots:
        stream, done = target.scheduler.resume(snapshot.stream_id, target.now, snapshot)
        assert not done
        target.push(stream, np.ones(frames))
        streams.append(stream)
    return streams


def test_resent_audio_rides_with_on_time_chunks_only_on_rows_their_bucket_pads() -> None:
    # 8 resumed streams whose rows are written, 4 whose rows are not yet,
    # all resending; 30 streams running here come in on time. Their tick
    # is the bucket of 32 they need anyway: 2 resent chunks fill it, no
    # row is written in it, and the rest go in the next tick.
    _, snapshots = _moved_snapshots([np.ones(40, np.float32)] * 12, sent=8)
    target = Harness(latency=3, max_streams=64, buckets=(8, 16, 32, 64), latency_budget_ms=50)
    written = _resumed(target, snapshots[:8], 12)
    first = target.step()
    assert first is not None and len(first.restores) == 8
    pending = _resumed(target, snapshots[8:], 12)
    target.now = 0.01
    running = target.add_ready("r", 30)
    tick, _ = target.schedule()
    assert tick is not None and tick.bucket == 32 and tick.restores == []
    taken = {s.stream_id for s in tick.streams}
    assert {s.stream_id for s in running} <= taken and len(taken) == 32
    assert len(taken & {s.stream_id for s in written}) == 2
    target.run(tick)
    rest, _ = target.schedule()
    assert rest is not None
    assert {s.stream_id for s in rest.streams} == {s.stream_id for s in written + pending}
    assert len(rest.restores) == 4


def test_resent_audio_alone_goes_in_ticks_of_a_filled_bucket() -> None:
    # 40 resumed streams resend 2 chunks each, nothing else is ready: a
    # tick of 64 would hold chunks of streams running here that come in
    # meanwhile, so the resent chunks go 32 a tick.
    _, snapshots = _moved_snapshots([np.ones(40, np.float32)] * 40, sent=8)
    target = Harness(latency=3, max_streams=64, buckets=(8, 16, 32, 64), latency_budget_ms=50)
    streams = _resumed(target, snapshots, 8)
    sizes = []
    while (tick := target.step()) is not None:
        sizes.append(len(tick.streams))
        target.now += 0.01
    assert max(sizes) == 32 and sum(sizes) == 80
    # Past `CATCH_UP_BUDGETS` budgets a chunk is no longer held back: ticks
    # take every ready stream again.
    for stream in streams:
        target.push(stream, np.ones(4))
    target.now += 4 * 0.05
    tick = target.step()
    assert tick is not None and len(tick.streams) == 40


def test_resent_audio_waits_for_chunks_on_time_due_before_its_tick_would_end() -> None:
    # 4 streams running here send a chunk every 160 ms: the next is due at
    # 0.48. 8 resumed streams' resent chunks are ready since 0.40 (past the
    # budget: no tick waits for company for them). At 0.47 their tick of 8
    # (a few ms) ends before 0.48 and goes at once; at 0.4799 it would end
    # after, so it waits for the 4, until 0.48 and the prediction's slack
    # of 5 ms, and goes after their tick.
    _, snapshots = _moved_snapshots([np.ones(40, np.float32)] * 16, sent=8)
    for start, held in ((0.47, False), (0.4799, True)):
        target = Harness(
            latency=3,
            max_streams=16,
            buckets=(4, 8, 16),
            latency_budget_ms=50,
            max_batch_delay_ms=5,
        )
        for bucket, seconds in {4: 0.003, 8: 0.004, 16: 0.006}.items():
            target.scheduler.tick_times.seed(bucket, seconds)
        running = [target.add(f"r{i}") for i in range(4)]
        for t in (0.0, 0.16, 0.32):
            target.now = t
            for stream in running:
                target.push(stream, np.ones(4))
            tick = target.step()
            assert tick is not None and len(tick.streams) == 4
        target.now = 0.40
        resumed = _resumed(target, snapshots[:8] if held else snapshots[8:], 8)
        target.now = start
        tick, wait = target.schedule()
        if not held:
            assert tick is not None and set(tick.streams) == set(resumed)
            continue
        assert tick is None and wait == pytest.approx(0.48 + 0.005 - start)
        target.now = 0.48
        for stream in running:
            target.push(stream, np.ones(4))
        tick, _ = target.schedule()  # the 4 on time, in a bucket of 4: no room
        assert tick is not None and set(tick.streams) == set(running)
        target.run(tick)
        tick, _ = target.schedule()
        assert tick is not None and set(tick.streams) == set(resumed)


# One row of the fake delay line at latency 3: 3 float32 frames and 3 flags.
_ROW_BYTES = 3 * 4 + 3


@pytest.mark.parametrize(
    ("budget", "per_tick"),
    [(3 * _ROW_BYTES, 3), (3 * _ROW_BYTES + _ROW_BYTES // 2, 3), (1, 1), (10**6, 8)],
)
def test_a_burst_of_restores_is_written_over_ticks_within_the_byte_budget(
    budget: int, per_tick: int
) -> None:
    """8 streams resume at once next to 4 residents: each tick writes at most
    `budget` bytes of rows (at least one row), a resumed stream is stepped
    first in the tick that writes its row and buffers until then, every
    resident is stepped in every tick, no row is written twice, and every
    stream's output is exactly its input."""
    rng = np.random.default_rng(0)
    moved_x = [rng.normal(size=30).astype(np.float32) for _ in range(8)]
    resident_x = [rng.normal(size=30).astype(np.float32) for _ in range(4)]
    source, snapshots = _moved_snapshots(moved_x, sent=10)
    assert {sum(leaf.nbytes for leaf in s.state) for s in snapshots} == {_ROW_BYTES}

    target = Harness(latency=3, max_streams=12, restore_bytes_per_tick=budget)
    residents = [target.add(f"r{i}") for i in range(4)]
    for stream, x in zip(residents, resident_x, strict=True):
        target.push(stream, x)
        target.collect(target.scheduler.end(stream, target.now))
    resumed = []
    for snapshot, x in zip(snapshots, moved_x, strict=True):
        stream, done = target.scheduler.resume(snapshot.stream_id, target.now, snapshot)
        assert done == []
        target.push(stream, x[snapshot.frames_received :])
        target.collect(target.scheduler.end(stream, target.now))
        resumed.append(stream)
    resumed_slots = [s.slot for s in resumed]

    ticks: list[tuple[list[int], list[int]]] = []  # (slots stepped, slots restored)
    while (tick := target.step()) is not None:
        restored = [slot for slot, _ in tick.restores]
        written = sum(leaf.nbytes for _, row in tick.restores for leaf in row)
        assert len(restored) == 1 or written <= budget
        ticks.append(([s.slot for s in tick.streams], restored))

    restoring = [i for i, (_, restored) in enumerate(ticks) if restored]
    # From the second tick on: the residents' first chunks came in on time,
    # and their tick of 4 pads no row for resent audio.
    assert restoring == list(range(1, 1 + math.ceil(8 / per_tick)))
    assert [len(ticks[i][1]) for i in restoring[:-1]] == [per_tick] * (len(restoring) - 1)
    # Each row written once, in the tick that first steps its stream.
    assert sorted(target.device.restored) == sorted(resumed_slots)
    for slot in resumed_slots:
        first = next(i for i, (stepped, _) in enumerate(ticks) if slot in stepped)
        assert slot in ticks[first][1], f"slot {slot} stepped before its row was written"
    for stepped, _ in ticks[: max(restoring) + 1]:
        assert {s.slot for s in residents} <= set(stepped), "a resident missed a tick"
    assert target.device.resets == [s.slot for s in residents]
    for i, x in enumerate(moved_x):
        joined = np.concatenate([source.output(f"m{i}"), target.output(f"m{i}")])
        np.testing.assert_array_equal(joined, x)
    for i, x in enumerate(resident_x):
        np.testing.assert_array_equal(target.output(f"r{i}"), x)


def test_a_split_tick_takes_resent_audio_after_the_streams_running_there() -> None:
    # 8 moved streams resume and resend 3 chunks each; 32 streams already
    # on the target are on time: a tick of 32 (the cheaper bucket by the
    # tick times) takes the 32, although the resent chunks have waited 80
    # ms, more than the budget after which a stream fallen behind goes
    # first (`test_a_split_tick_takes_on_time_streams_before_those_catching_up`).
    _, snapshots = _moved_snapshots([np.ones(40, np.float32)] * 8, sent=8)
    target = Harness(latency=3, max_streams=96, buckets=(32, 64, 96), latency_budget_ms=50)
    for bucket, seconds in {32: 0.010, 64: 0.040, 96: 0.060}.items():
        target.scheduler.tick_times.seed(bucket, seconds)
    resumed = []
    for snapshot in snapshots:
        stream, done = target.scheduler.resume(snapshot.stream_id, target.now, snapshot)
        assert not done
        target.push(stream, np.ones(12))
        resumed.append(stream)
    first = target.step()
    assert first is not None and len(first.streams) == 8  # their rows written
    target.now = 0.08
    running = target.add_ready("r", 32)
    tick, _ = target.schedule()
    assert tick is not None
    assert {s.stream_id for s in tick.streams} == {s.stream_id for s in running}
    target.run(tick)
    # Not for ever: once they have waited `CATCH_UP_BUDGETS` budgets they go
    # with the on-time chunks, first as the longest waiting.
    target.now = 0.21
    for stream in running:
        target.push(stream, np.ones(4))
    tick, _ = target.schedule()
    assert tick is not None
    assert {s.stream_id for s in resumed} <= {s.stream_id for s in tick.streams}


@pytest.mark.parametrize(
    ("tick_s", "yield_s", "resent", "waits_for_the_tick"),
    [(0.2, 5.0, False, True), (1.0, 0.1, False, False), (1.0, 5.0, True, False)],
)
def test_tokens_are_checked_between_the_ticks_of_streams_on_time(
    tick_s: float,
    yield_s: float,
    resent: bool,
    waits_for_the_tick: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A resume token is checked once the tick of chunks on time in flight
    has ended, not during it (its check takes the cores that tick needs);
    never after more than `_VERIFY_YIELD_S`, and a tick of resent audio
    alone does not hold it."""
    monkeypatch.setattr(engine_module, "_VERIFY_YIELD_S", yield_s)
    device = FakeDevice(2, 4, 0)
    device.seconds = tick_s
    config = SchedulerConfig(max_streams=2, chunk_blocks=2, buckets=(2,), max_batch_delay_ms=1)
    eng = Engine(FakeModel(), config, device=device)  # type: ignore[arg-type]
    checked: list[tuple[float, float]] = []  # (when, when the tick in flight ends)
    monkeypatch.setattr(
        eng, "verify", lambda token: checked.append((time.monotonic(), device._free_at))
    )
    eng.start()
    # Set after start, which would fingerprint the model's parameters: the
    # fake has none, and `verify` is replaced anyway.
    eng.resume_keys = ResumeKeys((b"k" * 40,))

    async def main() -> float:
        stream = eng.open_stream(asyncio.get_running_loop())
        if resent:
            stream._stream.resumed_at = time.monotonic()
        stream.send(np.ones((4, 1), np.float32))
        while not device.dispatched:
            await asyncio.sleep(0.001)
        start = time.monotonic()
        await asyncio.to_thread(eng.verify_between_ticks, b"token")
        stream.cancel()
        return start

    try:
        asked = asyncio.run(main())
    finally:
        eng.stop()
    ((when, tick_end),) = checked
    if waits_for_the_tick:
        assert when >= tick_end
    else:
        assert when < tick_end
        assert when - asked < (0.5 if resent else yield_s + 0.5)
        assert resent or when - asked >= yield_s
