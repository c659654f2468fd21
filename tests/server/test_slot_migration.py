"""Migration in the slot table, with the fake device (no XLA): a moving
stream stops ticking, moves only once its ticks in flight are delivered
(its `Handoff` after every output), and its snapshot resumed in another
slot table continues exactly (the delay line's output is its input)."""

from __future__ import annotations

import numpy as np

from server.runtime.stream import Handoff, Phase
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
