"""The scheduler's rules as pure functions: made-up times, no threads, no jax."""

from __future__ import annotations

import collections
import math

import numpy as np
import pytest

from server.errors import ResourceExhausted, Unavailable
from server.runtime import policy

BUDGET, DELAY = 0.050, 0.005


def plan(now: float, **kw: object) -> policy.TickPlan:
    args: dict[str, object] = dict(
        oldest_ready=0.0,
        ready=1,
        joinable=1,
        expected=(),
        device_busy=False,
        delay_s=DELAY,
        budget_s=BUDGET,
        tick_latency=lambda n: 0.010,
    )
    args.update(kw)
    return policy.plan_tick(now, **args)  # type: ignore[arg-type]


def test_nothing_ready_waits_for_an_event() -> None:
    assert plan(1.0, oldest_ready=None) == policy.TickPlan(False, math.inf)


def test_everyone_ready_goes_at_once_even_with_a_tick_in_flight() -> None:
    assert plan(0.0, joinable=0).go
    assert plan(0.0, joinable=0, device_busy=True).go  # a backlog: dispatch ahead


def test_partial_batch_waits_for_the_device() -> None:
    assert not plan(0.049, device_busy=True).go


def test_nobody_expected_waits_only_the_short_delay() -> None:
    p = plan(0.001)
    assert not p.go and p.wait_s == pytest.approx(DELAY - 0.001)
    assert plan(DELAY).go
    # A stream whose chunk is long overdue is not waited for either.
    assert plan(DELAY, expected=(-1.0,)).go


def test_expected_company_is_waited_for_within_the_budget() -> None:
    # Another stream's chunk is due at 20 ms: wait for it (plus the slack)...
    p = plan(0.001, expected=(0.020,))
    assert not p.go and p.wait_s == pytest.approx(0.020 + DELAY - 0.001)
    # ...while it is late by less than the slack...
    assert not plan(0.022, expected=(0.020,)).go
    # ...but never past the budget less the tick's expected time.
    assert plan(BUDGET - 0.010, expected=(0.030,)).go
    p = plan(0.030, expected=(0.038,))
    assert p.wait_s == pytest.approx(BUDGET - 0.010 - 0.030)
    # A chunk due after that is not waited for: the delay rule applies.
    assert plan(DELAY, expected=(0.045,)).go


def test_a_slow_tick_leaves_the_short_delay() -> None:
    # Ticks longer than the budget: waiting for company could only add the
    # short delay, not make the budget.
    p = plan(0.001, expected=(0.004,), tick_latency=lambda n: 0.2)
    assert not p.go and p.wait_s == pytest.approx(DELAY - 0.001)


def test_company_is_waited_for_only_if_the_tick_it_makes_meets_the_budget() -> None:
    # 32 chunks came in together at 0; 64 more are due at 25 ms. A tick of
    # 32 takes 13 ms, of 96 takes 29 ms: the 96 could start by 21 ms at the
    # latest to end within the 50 ms budget. Not waited for: the 32 go at
    # the delay.
    tick = lambda n: 0.005 + 0.00025 * n
    group = (0.025,) * 64
    p = plan(0.001, ready=32, joinable=64, expected=group, tick_latency=tick)
    assert not p.go and p.wait_s == pytest.approx(DELAY - 0.001)
    assert plan(DELAY, ready=32, joinable=64, expected=group, tick_latency=tick).go
    # Due at 15 ms, the tick of 96 starts at 20 and ends at 49: waited for.
    p = plan(0.001, ready=32, joinable=64, expected=(0.015,) * 64, tick_latency=tick)
    assert not p.go and p.wait_s == pytest.approx(0.015 + DELAY - 0.001)
    # One stream due at 25 ms keeps the tick at 32 rows: waited for.
    p = plan(0.001, ready=32, joinable=64, expected=(0.025, 0.150), tick_latency=tick)
    assert not p.go and p.wait_s == pytest.approx(0.025 + DELAY - 0.001)


def simulate(streams: int, period: float, seconds: float = 4.0) -> tuple[float, float]:
    """Streams with one chunk each `period` (random phases) against a device
    that takes 2 ms + 0.1 ms a row; (mean tick size, longest wait to start)."""
    rng = np.random.default_rng(0)
    due = rng.uniform(0, period, streams)
    ready_at: list[float | None] = [None] * streams
    periods: list[float | None] = [None] * streams
    history = [collections.deque[float](maxlen=policy.PERIOD_INTERVALS) for _ in range(streams)]
    last: list[float | None] = [None] * streams
    times = policy.TickTimes()
    free_at, now, step = 0.0, 0.0, 0.0002
    sizes, waits = [], []
    while now < seconds:
        for i in range(streams):
            if due[i] <= now:
                ready_at[i] = due[i]
                if last[i] is not None:
                    policy.add_interval(history[i], due[i] - last[i])
                    periods[i] = policy.chunk_period(history[i])
                last[i] = due[i]
                due[i] += period
        ready = [t for t in ready_at if t is not None]
        expected = [
            li + p
            for li, p, r in zip(last, periods, ready_at, strict=True)
            if r is None and li is not None and p is not None
        ]
        if ready:
            decision = policy.plan_tick(
                now,
                oldest_ready=min(ready),
                ready=len(ready),
                joinable=streams - len(ready),
                expected=expected,
                device_busy=now < free_at,
                delay_s=DELAY,
                budget_s=BUDGET,
                tick_latency=times.estimate,
            )
            if decision.go and now >= free_at:
                cost = 0.002 + 0.0001 * len(ready)
                times.observe(len(ready), cost)
                free_at = now + cost
                sizes.append(len(ready))
                waits.extend(now - t for t in ready)
                ready_at = [None] * streams
        now += step
    return float(np.mean(sizes)), max(waits)


def test_ticks_grow_with_load_and_waits_stay_within_the_budget() -> None:
    light, light_wait = simulate(streams=4, period=0.160)
    heavy, heavy_wait = simulate(streams=200, period=0.160)
    assert light < 3 and heavy > 30, (light, heavy)
    assert light_wait <= BUDGET and heavy_wait <= BUDGET


def test_bucket_for() -> None:
    buckets = [1, 2, 4, 8, 16]
    assert [policy.bucket_for(n, buckets, 12) for n in (1, 3, 5, 11, 12)] == [1, 4, 8, 16, 12]


def test_restores_within_a_byte_budget_keep_their_order_and_always_progress() -> None:
    assert policy.restores_within([10, 10, 10, 10], 25) == 2
    assert policy.restores_within([10, 10, 5], 25) == 3  # exactly at the budget: fits
    assert policy.restores_within([10, 10], 1000) == 2
    # A row over the budget goes alone: a burst of them takes a tick each.
    assert policy.restores_within([30, 10], 25) == 1
    # A prefix: a small row never overtakes one that waited longer.
    assert policy.restores_within([10, 30, 5], 25) == 1
    assert policy.restores_within([], 25) == 0


def test_average_period_follows_intervals_and_forgets_long_gaps() -> None:
    p = policy.next_period(None, 0.16)
    assert p == pytest.approx(0.16)
    p = policy.next_period(p, 0.20)
    assert p == pytest.approx(0.16 + 0.25 * 0.04)
    assert policy.next_period(p, 10.0) is None


def test_period_is_the_longest_recent_interval_and_forgets_long_gaps() -> None:
    intervals: collections.deque[float] = collections.deque(maxlen=policy.PERIOD_INTERVALS)
    assert policy.chunk_period(intervals) is None
    policy.add_interval(intervals, 0.16)
    assert policy.chunk_period(intervals) == pytest.approx(0.16)
    # A burst (a moved stream resending its audio) does not shorten it...
    for _ in range(policy.PERIOD_INTERVALS - 1):
        policy.add_interval(intervals, 0.01)
    assert policy.chunk_period(intervals) == pytest.approx(0.16)
    # ...a pace that lasts does.
    policy.add_interval(intervals, 0.04)
    assert policy.chunk_period(intervals) == pytest.approx(0.04)
    # After a burst the first real-time interval sets it again.
    policy.add_interval(intervals, 0.16)
    assert policy.chunk_period(intervals) == pytest.approx(0.16)
    policy.add_interval(intervals, 10.0)
    assert policy.chunk_period(intervals) is None


def test_tick_times_fall_back_to_a_smaller_bucket() -> None:
    times = policy.TickTimes()
    assert times.estimate(8) == 0.0
    times.observe(4, 0.010)
    assert times.estimate(8) == pytest.approx(0.010)
    times.observe(8, 0.020)
    times.observe(8, 0.030)
    assert times.estimate(8) == pytest.approx(0.020 + 0.2 * 0.010)
    assert times.estimate(2) == 0.0


def test_tick_times_scale_buckets_not_run_as_the_nearest_running_one() -> None:
    # Warm-up (idle machine): 64 rows in 18 ms, 128 in 40, 256 in 80 (64
    # is the best rate).
    times = policy.TickTimes()
    times.seed(64, 0.018)
    times.seed(128, 0.040)
    times.seed(256, 0.080)
    times.seed(512, 0.200)
    # Under load 64-row ticks take 30 ms: 256 is expected 1.67x slower too,
    # so 64 stays the better bucket.
    for _ in range(30):
        times.observe(64, 0.030)
    assert times.estimate(64) == pytest.approx(0.030, rel=1e-3)
    assert times.estimate(256) == pytest.approx(0.080 * 0.030 / 0.018, rel=1e-3)
    buckets = [8, 16, 32, 64, 128, 256, 512]
    assert policy.tick_size(300, buckets, 512, times.estimate) == 64
    # A bucket slower under load than its warm-up says learns that of its own;
    # 64, not run since, scales as 256 did (2.5x its warm-up).
    for _ in range(30):
        times.observe(256, 0.200)
    assert times.estimate(256) == pytest.approx(0.200, rel=1e-3)
    assert times.estimate(64) == pytest.approx(0.018 * 2.5, rel=1e-3)


def test_tick_latency_allows_for_device_time_over_its_average_and_the_host() -> None:
    times = policy.TickTimes()
    assert times.latency(32) == 0.0  # unknown: the plan does not budget it
    times.seed(32, 0.010)
    assert times.latency(32) == pytest.approx(times.SLACK * 0.010)
    times.observe_host(0.003)
    times.observe_host(0.003)
    assert times.host == pytest.approx(0.003)
    assert times.latency(32) == pytest.approx(times.SLACK * 0.010 + 0.003)
    # A device busy most of the time: ticks must stay large, no margins.
    assert times.latency(32, busy_share=times.ROOM_SHARE) == pytest.approx(0.010)
    times.observe_host(0.008)  # a burst of restores: the average follows
    assert 0.003 < times.host < 0.008


def test_tick_times_of_a_bucket_running_now_are_its_own() -> None:
    # Small ticks slow down more under load than big ones (their fixed
    # costs): 8 rows take 3x their warm-up, 64 rows what they did at
    # warm-up. The shared load factor (about 2) must not double 64's estimate.
    times = policy.TickTimes()
    times.seed(8, 0.003)
    times.seed(64, 0.020)
    times.seed(128, 0.050)
    for _ in range(40):
        times.observe(8, 0.009)
        times.observe(64, 0.020)
    assert times.estimate(64) == pytest.approx(0.020, rel=1e-3)
    assert times.estimate(8) == pytest.approx(0.009, rel=1e-3)
    # 128, never run since warm-up, scales as its nearest running bucket
    # (64) did: not at all.
    assert times.estimate(128) == pytest.approx(0.050, rel=1e-3)


def test_late_meter_counts_recent_chunks_reaching_back_for_enough() -> None:
    meter = policy.LateMeter(window_s=0.5, max_age_s=4.0)
    # Busy: 100 chunks a tick, 10 ticks a second; the last half second counts.
    for i in range(20):
        meter.observe(i * 0.1, 90 if i < 10 else 0, 100)
    assert meter.counts(1.95) == (0, 500)  # the late spell a second ago is over
    # Few streams: 4 chunks a tick; it reaches back until 50 are counted.
    meter.reset()
    for i in range(30):
        meter.observe(i * 0.1, 4, 4)
    assert meter.counts(2.95) == (52, 52)
    assert meter.counts(7.5) == (0, 0)  # past max_age: nothing left


def test_overloaded_needs_enough_chunks_and_a_late_share() -> None:
    assert not policy.overloaded(40, 40)  # too few to say
    assert policy.overloaded(13, 50)
    assert not policy.overloaded(12, 50)


def admit(**kw: object) -> policy.Refusal | None:
    args: dict[str, object] = dict(
        accepting=True,
        draining=False,
        open_streams=1,
        max_streams=4,
        late=0,
        total=0,
        budget_ms=50,
    )
    args.update(kw)
    return policy.admission_refusal("m", **args)  # type: ignore[arg-type]


def test_admission() -> None:
    assert admit() is None
    both = admit(draining=True, accepting=False)
    assert both is not None and both.reason == "draining"
    assert isinstance(both.error, Unavailable) and "draining" in str(both.error)
    compiling = admit(accepting=False)
    assert compiling is not None and compiling.reason == "compiling"
    assert "still compiling" in str(compiling.error)
    full = admit(open_streams=4)
    assert full is not None and full.reason == "full"
    assert isinstance(full.error, ResourceExhausted)
    assert "maximum of 4 streams" in str(full.error)
    busy = admit(late=30, total=100)
    assert busy is not None and busy.reason == "late"
    assert isinstance(busy.error, ResourceExhausted) and "at capacity" in str(busy.error)
    predicted = admit(predicted=True)
    assert predicted is not None and predicted.reason == "predicted"
    assert "send about as many chunks" in str(predicted.error)


def timeout(now: float, **kw: object) -> tuple[str | None, float]:
    args: dict[str, object] = dict(
        ending=False,
        in_flight=0,
        backlog=0,
        last_input=0.0,
        last_read=0.0,
        max_backlog=4,
        idle_timeout_s=30.0,
        slow_consumer_timeout_s=10.0,
    )
    args.update(kw)
    return policy.timeout_of(now, **args)  # type: ignore[arg-type]


def test_timeouts() -> None:
    assert timeout(10.0) == (None, pytest.approx(20.0))
    assert timeout(30.0) == ("idle", 0.0)
    assert timeout(31.0, in_flight=1) == (None, math.inf)  # the device holds its chunk
    assert timeout(31.0, ending=True) == (None, math.inf)  # flushing
    assert timeout(9.0, backlog=4) == (None, pytest.approx(1.0))
    assert timeout(10.0, backlog=4, last_input=9.0) == ("slow_consumer", 0.0)


def test_tick_size_fills_a_bucket_rather_than_pad_far_up() -> None:
    buckets = [8, 16, 32, 64, 128, 256, 400]
    linear = lambda b: 0.002 + 0.0005 * b  # device seconds of a tick
    size = lambda n: policy.tick_size(n, buckets, 400, linear)
    # 135 padded to 256 costs twice 128 filled: 128 go now, 7 wait.
    assert size(135) == 128
    # Nearly full buckets, exact buckets and every slot are taken whole.
    assert [size(n) for n in (120, 128, 240, 400)] == [120, 128, 240, 400]
    # Small ticks are never cut: there padding is cheap and rows are not.
    assert [size(n) for n in (9, 17, 31)] == [9, 17, 31]
    # Without tick-time estimates yet, everyone goes.
    assert policy.tick_size(135, buckets, 400, lambda b: 0.0) == 135


def test_tick_size_takes_the_bucket_with_the_best_rate() -> None:
    # Rows per ms as measured for demo-asr on a 2-core EPYC: 64 is the most
    # efficient; bigger ticks are slower per row (cache-bound).
    buckets = [8, 16, 32, 64, 128, 256, 800]
    ms = {8: 2.8, 16: 6.0, 32: 11.0, 64: 19.5, 128: 57.0, 256: 120.0, 800: 400.0}
    size = lambda n: policy.tick_size(n, buckets, 800, lambda b: ms[b] / 1000)
    # 394 ready: padded to 800 or 256 filled would step ~2 rows/ms; 64 steps 3.3.
    assert size(394) == 64
    assert size(250) == 64
    # Every slot goes whole (the full tick); a bucket exactly full does not
    # when a smaller one steps more rows a second: 128 ready run as 2 x 64.
    assert size(800) == 800
    assert size(256) == 64 and size(128) == 64
    # Within the gain of taking everyone, everyone goes: 60 padded to 64.
    assert size(60) == 60
    # Estimates from a loaded 2-core EPYC: 254 ready as one tick of 256 take
    # 141 ms, as four of 64 124 ms (64 rows: 2.06 rows/ms against 1.80, a
    # gain within a rate margin of 1.15, which kept ticks at 256 for good).
    loaded = {8: 6.2, 16: 10.2, 32: 18.9, 64: 31.0, 128: 91.6, 256: 140.8, 800: 354.6}
    assert policy.tick_size(254, buckets, 800, lambda b: loaded[b] / 1000) == 64
    assert policy.clear_seconds(254, 64, buckets, lambda b: loaded[b] / 1000) == (
        pytest.approx(0.124)
    )


def test_predicted_overload_compares_chunk_rates_with_the_device_rate() -> None:
    # 64 rows in 40 ms: 1,600 rows a second at best; streams send 6.25 chunks a second.
    ticks = {16: 0.015, 64: 0.040}
    periods = [0.16] * 200
    assert not policy.predicted_overload(periods, 200, ticks)  # 1,256 < 0.85 * 1,600
    assert policy.predicted_overload(periods, 220, ticks)  # 1,381 > 1,360
    # Streams sending ahead of real time (period under two short ticks) are
    # not real-time demand.
    assert not policy.predicted_overload([0.001] * 16, 16, ticks)
    # Nothing measured yet (no periods, no ticks): nothing predicted.
    assert not policy.predicted_overload([], 500, ticks)
    assert not policy.predicted_overload(periods, 500, {})


def test_tick_times_served_leaves_out_buckets_seldom_run() -> None:
    times = policy.TickTimes()
    for _ in range(4):
        times.observe(64, 0.04)
    times.observe(512, 0.2)  # the warm-up's one run
    assert times.served() == {64: pytest.approx(0.04)}


def test_step_rate_learns_capacity_when_saturated_and_lets_it_grow() -> None:
    rate = policy.StepRate(window_s=1.0)
    for i in range(10):
        rate.observe(i * 0.1, 100, 0.09)  # 1,000 rows a second, the device 90% busy
    rate.update(overloaded=False)
    assert rate.capacity is None  # never saturated: nothing learned
    rate.update(overloaded=True)
    assert rate.capacity == pytest.approx(1000.0)
    periods = [0.16] * 150  # 6.25 rows a second each
    assert policy.predicted_overload(periods, 144, {64: 0.01}, rate.capacity)  # 906 > 900
    assert not policy.predicted_overload(periods, 142, {64: 0.01}, rate.capacity)
    # On time at that load: the limit moves up past it, so load can grow.
    rate.update(overloaded=False)
    assert rate.capacity == pytest.approx(1200.0)


def test_step_rate_learns_no_capacity_while_the_device_idles() -> None:
    # Chunks late with the device half idle (a connection storm, the start
    # of a ramp): the rate stepped says nothing about what the device can do.
    rate = policy.StepRate(window_s=1.0)
    for i in range(10):
        rate.observe(i * 0.1, 40, 0.05)
    rate.update(overloaded=True)
    assert rate.capacity is None
    for i in range(10, 20):
        rate.observe(i * 0.1, 100, 0.1)  # now saturated
    rate.update(overloaded=True)
    assert rate.capacity == pytest.approx(1000.0)


def test_resent_audio_yields_to_chunks_on_time_due_before_its_tick_ends() -> None:
    # Due after the tick would end, or none due: it goes now.
    assert policy.resent_yields(1.0, [1.02, 1.5], tick_end=1.01, delay_s=0.005) is None
    assert policy.resent_yields(1.0, [], tick_end=1.01, delay_s=0.005) is None
    # Due within it: wait for the first, with the prediction's slack.
    assert policy.resent_yields(1.0, [1.5, 1.008, 1.009], 1.01, 0.005) == pytest.approx(0.013)
    # A little late is still awaited; later than the slack is not.
    assert policy.resent_yields(1.0, [0.997], 1.01, 0.005) == pytest.approx(0.002)
    assert policy.resent_yields(1.0, [0.994], 1.01, 0.005) is None


def test_tick_priority_puts_on_time_streams_first_and_resent_audio_last() -> None:
    now, budget = 1.0, 0.05
    just = now - policy.RESEND_S / 2  # resumed lately: resending
    keys = {
        "on time": policy.tick_priority(0.99, True, None, now, budget),
        "behind, waiting longer": policy.tick_priority(0.97, False, None, now, budget),
        "behind": policy.tick_priority(0.98, False, None, now, budget),
        "behind a whole budget": policy.tick_priority(0.94, False, None, now, budget),
        "resent, on time, waiting longest": policy.tick_priority(0.93, True, just, now, budget),
        "resent, waited the catch-up budgets": policy.tick_priority(
            now - budget * policy.CATCH_UP_BUDGETS - 0.001, False, just, now, budget
        ),
        "resumed long ago, on time": policy.tick_priority(
            0.985, True, now - policy.RESEND_S, now, budget
        ),
    }
    assert sorted(keys, key=keys.__getitem__) == [
        "resent, waited the catch-up budgets",
        "behind a whole budget",
        "resumed long ago, on time",
        "on time",
        "resent, on time, waiting longest",
        "behind, waiting longer",
        "behind",
    ]


def test_a_tick_holds_chunks_on_time_unless_all_are_resent_audio() -> None:
    now = 100.0
    recent, long_ago = now - policy.RESEND_S / 2, now - 2 * policy.RESEND_S
    assert policy.holds_chunks_on_time([None], now)
    assert policy.holds_chunks_on_time([long_ago], now)
    assert policy.holds_chunks_on_time([recent, None, recent], now)
    assert not policy.holds_chunks_on_time([recent, recent], now)
