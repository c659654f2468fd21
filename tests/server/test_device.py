"""`Device` on its own: the buffers a tick shares with the host."""

from __future__ import annotations

import numpy as np

import sequence_layers as sl
from server.model import ServableModel, init_variables
from server.runtime import SchedulerConfig
from server.runtime.device import Device, aligned_zeros


def test_slot_ids_may_be_reused_as_soon_as_a_tick_is_dispatched() -> None:
    # XLA:CPU reads an aligned host array in place, and a partial tick's
    # scatter may run after the tick's outputs are fetched. The engine
    # restages a tick's slot ids once its outputs are delivered; when the
    # scatter read those ids in place, a late scatter wrote stepped rows
    # into the next tick's slots (1 full test run in 3 mixed two streams).
    # Here the ids are overwritten right after dispatch, before anything
    # could have run: the state must be that of the ids given.
    # The step is made slow enough (~1 ms) that XLA runs it, and the
    # scatter after it, on its own threads rather than inline.
    config = sl.Serial.Config(
        (
            sl.Dense.Config(256),
            sl.Dense.Config(256),
            sl.Conv1D.Config(filters=2, kernel_size=3, padding="causal"),
        )
    )
    model = ServableModel("conv", config, init_variables(config, (256,), seed=0), (256,))
    device = Device(model, SchedulerConfig(max_streams=8, buckets=(4, 8)), chunk_frames=32)
    device.build()
    assert device.compile()
    x = np.ones((4, 32, 256), np.float32)
    lengths = np.full((4,), 32, np.int32)
    for _ in range(20):
        device.reset_state()
        ids = aligned_zeros((4,), np.int32)
        ids[:] = [0, 1, 2, 3]
        outputs = device.dispatch(ids, x, lengths)
        ids[:] = [4, 5, 6, 7]
        device.fetch(outputs)
        stepped = [any(np.abs(leaf).sum() > 0 for leaf in device.read_row(s)) for s in range(8)]
        assert stepped == [True] * 4 + [False] * 4


def _recorded_warm_up() -> tuple[Device, dict[int, float], list[np.ndarray]]:
    """A small model's `warm_up()`, with the slot ids of every tick it ran."""
    config = sl.Serial.Config((sl.Conv1D.Config(filters=2, kernel_size=3, padding="causal"),))
    model = ServableModel("conv", config, init_variables(config, (4,), seed=0), (4,))
    device = Device(model, SchedulerConfig(max_streams=6, buckets=(2, 4, 8)), chunk_frames=4)
    device.build()
    assert device.compile()
    seen: list[np.ndarray] = []
    run_tick = device.run_tick

    def recording(ids: np.ndarray, x: np.ndarray, lengths: np.ndarray) -> object:
        seen.append(ids.copy())
        return run_tick(ids, x, lengths)

    device.run_tick = recording  # type: ignore[method-assign,assignment]
    return device, device.warm_up(), seen


def test_warm_up_times_each_bucket_on_distinct_rows() -> None:
    # The warm-up's times rank the buckets (`policy.tick_size`) and scale
    # the estimates of buckets not run lately. A tick under load steps
    # distinct rows; timed on one row, kept in cache, big buckets looked
    # as cheap per row as small ones (demo-asr: 128 rows 2.0x of 64 on one
    # row, 2.5x on distinct rows).
    device, seconds, seen = _recorded_warm_up()
    assert sorted(seconds) == [2, 4, 6, 8]
    for ids in seen:
        rows = ids[ids != device.padding_slot]
        assert len(set(rows.tolist())) == len(rows) == min(len(ids), 6)


def test_warm_up_runs_every_program_before_timing_any() -> None:
    # Timed right after its own first run, a bucket's tick could still be
    # taking fresh memory from the kernel (demo-asr's 64 rows: ~8,000 page
    # faults, 30-36 ms instead of 21), and a bucket seeded that slow was
    # never chosen. So every program runs once, then each is timed.
    _, seconds, seen = _recorded_warm_up()
    # Buckets 2, 4, 8 and the full tick of all 6 slots: once each, then
    # two timed runs each.
    assert [len(ids) for ids in seen] == [2, 4, 8, 6, 2, 2, 4, 4, 8, 8, 6, 6]
    assert all(s > 0 for s in seconds.values())
