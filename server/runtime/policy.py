"""The scheduler's rules, as pure functions of numbers: which tick to run and
when, who timed out, whom to admit. No jax, no threads, no clock: callers
pass `now` (time.monotonic() seconds), so every rule is tested with made-up
times (tests/server/test_policy.py).

Batching spends a latency budget instead of a fixed delay. A ready chunk
may wait for company until `budget - expected tick time` after it became
ready (the time of the tick with that company in it), but only while a
stream is *expected* to join: each stream's chunks come about
periodically, so the next one is predicted from the last. With
nobody expected, it waits at most `max_batch_delay_ms` (a lone stream is
not held back for nothing). While a tick is on the device, partial batches
wait for it to finish, so under load ticks grow by themselves.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

from server.errors import ResourceExhausted, StreamError, Unavailable

# Exponential averages: weight of the newest measurement.
_PERIOD_WEIGHT = 0.25
_TICK_WEIGHT = 0.2
# A stream idle longer than this between chunks has no useful period.
_MAX_PERIOD_S = 2.0
# A stream's next chunk is due the longest of its last this many intervals
# after its last (`chunk_period`).
PERIOD_INTERVALS = 4

# Admission: refuse new streams while at least this share of real-time
# chunks missed the budget (waited longer than it allows, less the tick's
# expected time), over at least this many chunks (fewer say nothing: a burst
# at start-up is not an overload).
LATE_SHARE = 0.25
MIN_CHUNKS = 50


@dataclasses.dataclass(frozen=True)
class TickPlan:
    """Start a tick now (`go`), or reconsider in `wait_s` seconds at the latest
    (a stream becoming ready wakes the engine sooner)."""

    go: bool
    wait_s: float = math.inf


GO = TickPlan(True, 0.0)


def plan_tick(
    now: float,
    *,
    oldest_ready: float | None,
    ready: int,
    joinable: int,
    expected: Iterable[float],
    device_busy: bool,
    delay_s: float,
    budget_s: float,
    tick_latency: Callable[[int], float],
) -> TickPlan:
    """Whether the ready streams should tick now.

    - `oldest_ready`: when the longest-waiting ready chunk became ready
      (None: nothing is ready); `ready`: how many the tick would take.
    - `joinable`: open streams that could still join this tick (waiting on
      their client; not those blocked by backpressure).
    - `expected`: when each joinable stream's next chunk is predicted.
    - `device_busy`: a tick is on the device.
    - `tick_latency(n)`: what a tick of `n` streams adds to their chunks'
      latency, device and host (`TickTimes.latency`; 0: unknown).

    Company is waited for only if the tick it makes still ends within the
    budget: the streams that join make the tick longer. Budgeting the tick
    of the streams ready now, 32 demo-asr streams whose chunks came in
    together waited for 64 others due 25 ms later, and all 96 went in a
    tick that ended 55-75 ms after the 32 chunks came in (budget 50 ms).
    """
    if oldest_ready is None:
        return TickPlan(False)
    if joinable == 0:
        # Nobody else can join: waiting gains nothing. With a tick on the
        # device this is a backlog, and dispatching now keeps it busy.
        return GO
    if device_busy:
        # The tick in flight ends soon and wakes the engine; meanwhile more
        # streams become ready, so ticks grow with load.
        return TickPlan(False)
    start_by = oldest_ready + max(delay_s, budget_s - tick_latency(ready))
    if now >= start_by:
        return GO
    # A prediction is given `delay_s` of slack: arrivals jitter.
    coming = [eta for eta in expected if now < eta + delay_s and eta <= start_by]
    if coming:
        # Wait for the next arrival (the engine plans again when it comes)
        # if a tick of everyone due by then still makes the budget.
        first = min(coming)
        joined = sum(eta <= first + delay_s for eta in coming)
        start_with = oldest_ready + max(delay_s, budget_s - tick_latency(ready + joined))
        if first <= start_with:
            return TickPlan(False, min(first + delay_s, start_with) - now)
    go_at = min(oldest_ready + delay_s, start_by)
    if now >= go_at:
        return GO
    return TickPlan(False, go_at - now)


# Share of the latency budget a tick is planned to leave for delivery: the
# budget runs until a chunk's outputs are written to its client, and after
# the tick thread routes them, the door's event loop still has to write
# them, which no tick time counts. Planned to the whole budget, logmel
# streams (ticks of 1-3 ms) that waited for company were written 49-52 ms
# after they came in, 8-56% of them over a 50 ms budget in half the runs.
DELIVERY_SHARE = 0.1


def planning_budget(budget_s: float) -> float:
    """The part of a chunk's latency budget its tick may use, waiting
    included (`plan_tick`'s `budget_s`)."""
    return budget_s * (1.0 - DELIVERY_SHARE)


def bucket_for(n: int, buckets: list[int], max_streams: int) -> int:
    """The compiled batch size a tick of `n` streams runs at: `n` itself when
    every slot is in it (the full tick), else the smallest bucket >= n."""
    if n == max_streams:
        return n
    return next(b for b in buckets if b >= n)


# Ready streams are left for the next tick only to fill a bucket of at
# least this many rows. Below it small ticks cost more per row and padding
# is cheap.
MIN_FILLED_BUCKET = 32
# Splitting must clear the ready streams this much sooner than one tick of
# all of them: each extra tick costs the host 1-3 ms of staging and launch
# that the device-time estimates leave out, and close calls are noise.
SPLIT_GAIN = 1.05


def clear_seconds(n: int, b: int, buckets: list[int], estimate: Callable[[int], float]) -> float:
    """Device seconds to step `n` ready streams as ticks of `b` rows (the
    remainder padded to its bucket). 0: a tick time is unknown."""
    full, rest = divmod(n, b)
    t = estimate(b)
    t_rest = estimate(next(x for x in buckets if x >= rest)) if rest else 0.0
    if t <= 0 or (rest and t_rest <= 0):
        return 0.0
    return full * t + t_rest


def tick_size(
    n: int, buckets: list[int], max_streams: int, estimate: Callable[[int], float]
) -> int:
    """How many of `n` ready streams the next tick takes: all of them, or a
    filled bucket below `n` when ticks of that bucket step all `n` sooner
    than one tick of `n` padded up to its bucket (of those, the soonest; the
    rest go next tick, with whoever becomes ready meanwhile). Under load,
    135 ready streams padded to a bucket of 256 took twice the device time
    of 128; and past a cache-sized batch a bigger tick is slower per row
    (demo-asr on a 2-core EPYC, distinct rows: 3.2 rows/ms at 64, 2.5 at
    128 and 256), so with 250 streams ready, ticks of 256 held the served
    rate at 80% of what ticks of 64 gave, and once chunks queued, ticks
    stayed big. A bucket exactly full is no exception: 128 ready streams
    run as two ticks of 64 there. With time linear in rows plus a fixed
    cost, everyone goes unless padding wastes more than the extra ticks
    cost. `estimate(bucket)`: expected device seconds of a tick (0:
    unknown, then all are taken)."""
    if n == max_streams:
        return n  # the full tick: no gather or scatter, the cheapest per row
    t_all = estimate(bucket_for(n, buckets, max_streams))
    if t_all <= 0:
        return n
    best, best_t = n, t_all / SPLIT_GAIN
    for b in buckets:
        if MIN_FILLED_BUCKET <= b < n:
            t = clear_seconds(n, b, buckets, estimate)
            if 0 < t < best_t:
                best, best_t = b, t
    return best


# A resumed stream's chunks are its resent audio for this long after it
# resumed: the client resends what the old server had not acknowledged,
# about the move's gap (~0.5 s of demo-asr audio), in a burst.
RESEND_S = 1.0
# Such a chunk joins the on-time ones after this many budgets (a stream
# behind otherwise: one).
CATCH_UP_BUDGETS = 4


def tick_priority(
    ready_since: float, on_time: bool, resumed_at: float | None, now: float, budget_s: float
) -> tuple[bool, float]:
    """Sort key of a ready stream when the next tick takes only some of them
    (`tick_size`): first the streams whose chunk came in on time (it became
    ready when its input arrived), then those behind (it was already
    buffered when their last chunk was taken: past capacity, or a client
    sending ahead); longest waiting first within each. A stream behind
    that has waited a whole budget goes with the on-time ones, so none
    waits for ever. (Earliest deadline first for every stream measured
    worse past capacity: 600 offered demo-asr streams, p99 0.15-0.9 s over
    7 runs against 0.12-0.4 s, though with other changes in the runs.)

    A resumed stream's chunks within `RESEND_S` of resuming are its resent
    audio: late anyway, they rank behind, and join the on-time ones only
    after `CATCH_UP_BUDGETS` budgets. Taken first as the longest waiting,
    64 moved streams filled the ticks while the 32 streams on the target
    waited a tick more (their p99 went from 40 to 60-80 ms); after one
    budget, resumed streams held back by the restore byte budget (80 ms)
    still went before 8 of the 32, whose chunks missed the budget."""
    resending = _resending(resumed_at, now)
    patience = budget_s * (CATCH_UP_BUDGETS if resending else 1)
    first = (on_time and not resending) or now - ready_since >= patience
    return (not first, ready_since)


def _resending(resumed_at: float | None, now: float) -> bool:
    """Whether a stream's chunks are still its resent audio (`RESEND_S`)."""
    return resumed_at is not None and now - resumed_at < RESEND_S


def holds_chunks_on_time(resumed_at: Iterable[float | None], now: float) -> bool:
    """Whether a tick of streams that resumed at these times (None: never)
    holds chunks on time, i.e. is not only resumed streams' resent audio:
    resume tokens are checked between such ticks
    (`Engine.verify_between_ticks`)."""
    return any(not _resending(t, now) for t in resumed_at)


def resent_waits(ready_since: float, resumed_at: float | None, now: float, budget_s: float) -> bool:
    """Whether a ready stream's chunk is resent audio that still ranks behind
    (`tick_priority`): it rides in a tick of the streams running here only
    on rows their bucket pads anyway (`Scheduler.schedule`)."""
    return _resending(resumed_at, now) and now - ready_since < budget_s * CATCH_UP_BUDGETS


def resent_yields(
    now: float, expected: Iterable[float], tick_end: float, delay_s: float
) -> float | None:
    """How long a tick of resent audio alone waits (None: it goes now). While
    a chunk on time is due (`expected`, `Stream.expected_at`) before that
    tick would end (`tick_end`), the tick waits for it: the resent chunks
    then ride on the padding of its tick, or go right after it. A chunk
    `delay_s` past its prediction is no longer waited for, and resent audio
    is held at most `CATCH_UP_BUDGETS` budgets in all (`resent_waits`)."""
    due = [eta for eta in expected if now < eta + delay_s and eta < tick_end]
    if not due:
        return None
    return min(due) + delay_s - now


def restores_within(row_bytes: Iterable[int], budget_bytes: int) -> int:
    """How many resumed streams, in the order given (longest waiting first),
    have their state rows written in the next tick: the longest prefix whose
    rows fit `budget_bytes`, and at least one (a row over the budget goes
    alone), so a burst always progresses. The rows of a tick are copied
    before its step: on a 2-core CPU 64 demo-asr rows (32 MB) in one tick
    took ~30 ms and delayed every other stream in it by 1.7 ticks."""
    total = 0
    taken = 0
    for size in row_bytes:
        if taken and total + size > budget_bytes:
            break
        total += size
        taken += 1
    return taken


def next_period(period: float | None, interval: float) -> float | None:
    """A stream's average chunk period after one more interval between its
    chunks: what admission counts it as sending (`predicted_overload`)."""
    if interval > _MAX_PERIOD_S:
        return None
    if period is None:
        return interval
    return period + _PERIOD_WEIGHT * (interval - period)


def add_interval(intervals: collections.deque[float], interval: float) -> None:
    """Records one more interval between a stream's chunks (a deque of at
    most `PERIOD_INTERVALS`); a gap longer than `_MAX_PERIOD_S` forgets
    them all (the client paused: its old pace says nothing)."""
    if interval > _MAX_PERIOD_S:
        intervals.clear()
    else:
        intervals.append(interval)


def chunk_period(intervals: Iterable[float]) -> float | None:
    """When a stream's next chunk is due, after its last: the longest of its
    recent intervals (None: none yet). Not the average (`next_period`): a
    client catching up sends chunks in a burst, and the short intervals of
    a moved stream resending half a second of audio pulled an average to
    half the real period for over a second; streams predicted that early
    were waited for and did not come, and the 32 streams waiting went at
    the end of their budget, past it once the outputs were written. A
    period too long only means a stream is not waited for; too short, it
    is waited for in vain. (Admission keeps the average: past capacity a
    stream behind is ready by input only now and then, and the longest
    interval would count it as sending a fraction of its chunks.)"""
    return max(intervals, default=None)


class TickTimes:
    """Expected device seconds of a tick per bucket.

    A bucket run lately (within `STALE_TICKS` ticks) is expected to take
    what its recent ticks took (an exponential average). Any other bucket
    is expected to take its warm-up time scaled as the nearest bucket run
    lately has slowed down since its own warm-up: buckets slow down
    unequally under load (a tick's fixed costs weigh most on small ones),
    so the scale comes from the closest size, and a bucket's own old
    figure is not used at all, since it may come from a spell long over.

    Both failures this avoids were measured (demo-asr, 2-core EPYC): raw
    figures compared 256 rows timed idle at warm-up with 64 timed under
    load, and ran 256 at 2 rows/ms against 64's 3.3; one load factor shared
    by all buckets put 64-row ticks that took 20 ms at 36 ms, so 32-row
    ticks ran instead and admission refused streams at two thirds of
    capacity."""

    # About half a second of ticks under load.
    STALE_TICKS = 20
    # `latency` allows for the slack and the host only while the device is
    # busy less than this share of the time (`StepRate.busy_share`).
    # Nearer saturation ticks must stay large for the device to keep up:
    # with the margins there, ticks shrank and fell behind (600 offered
    # demo-asr streams: p99 0.7-1.1 s in most runs, 0.26-0.39 s without).
    ROOM_SHARE = 0.7
    # What a latency budget allows for a tick's device time, over its
    # average: the 90th percentile of device time over the estimate was 1.1
    # (32 rows) to 1.2 (64 rows), demo-asr on a 2-core EPYC.
    SLACK = 1.2

    def __init__(self) -> None:
        # Host seconds of a tick off the device (staging, launch, fetch,
        # routing the outputs): an exponential average over all buckets.
        self.host = 0.0
        self._time: dict[int, float] = {}
        self._warm: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._seen: dict[int, int] = {}  # tick number of the bucket's last run
        self._ticks = 0
        self._table: dict[int, float] = {}

    def seed(self, bucket: int, seconds: float) -> None:
        """The warm-up's time for `bucket` (idle machine, distinct rows)."""
        if seconds > 0:
            self._warm[bucket] = seconds
            self._count.setdefault(bucket, 0)
            self._update_table()

    def observe(self, bucket: int, seconds: float) -> None:
        old = self._time.get(bucket)
        if old is None or not self._fresh(bucket):
            old = seconds  # back after a while: start over from the new figure
        self._time[bucket] = old + _TICK_WEIGHT * (seconds - old)
        self._count[bucket] = self._count.get(bucket, 0) + 1
        self._seen[bucket] = self._ticks
        self._ticks += 1
        self._update_table()

    def observe_host(self, seconds: float) -> None:
        old = self.host or seconds
        self.host = old + _TICK_WEIGHT * (seconds - old)

    def latency(self, bucket: int, busy_share: float = 0.0) -> float:
        """What a tick of `bucket` adds to a chunk's latency, for the budget:
        its device time with `SLACK`, plus the host's part (0: unknown);
        with the device busy `ROOM_SHARE` of the time or more, its device
        time alone.
        Budgeting the average device time alone, ticks that waited for
        company to the end of the budget put the chunks that waited
        longest 2-5 ms past it (device time over its average, then the
        outputs routed and written)."""
        seconds = self.estimate(bucket)
        if seconds <= 0 or busy_share >= self.ROOM_SHARE:
            return seconds
        return self.SLACK * seconds + self.host

    def _fresh(self, bucket: int) -> bool:
        seen = self._seen.get(bucket)
        return seen is not None and self._ticks - seen <= self.STALE_TICKS

    def _update_table(self) -> None:
        # Estimates change only here (a tick or a seed); the scheduler asks
        # for them a dozen times a plan and plans ~10 times a tick (300
        # demo-asr streams: ~300 plans a second at ~200 us each).
        running = [b for b in self._warm if self._fresh(b)]
        table = {}
        for bucket in {*self._time, *self._warm}:
            warm = self._warm.get(bucket)
            if self._fresh(bucket) or warm is None:
                table[bucket] = self._time[bucket]
            elif not running:
                table[bucket] = warm
            else:
                near = min(running, key=lambda b: abs(math.log(b / bucket)))
                table[bucket] = warm * self._time[near] / self._warm[near]
        self._table = table

    def estimate(self, bucket: int) -> float:
        """The bucket's expected time; neither run nor warmed up, the
        nearest smaller one's (0: none)."""
        seconds = self._table.get(bucket)
        if seconds is not None:
            return seconds
        smaller = [b for b in self._table if b < bucket]
        return self._table[max(smaller)] if smaller else 0.0

    def as_dict(self) -> dict[int, float]:
        return dict(sorted(self._table.items()))

    def served(self, min_ticks: int = 4) -> dict[int, float]:
        """Buckets that ran at least `min_ticks` (the warm-up measures an
        idle machine: the biggest bucket, seldom run, would otherwise
        promise its uncontended rate for ever)."""
        return {b: self.estimate(b) for b, n in self._count.items() if n >= min_ticks}


class LateMeter:
    """Real-time chunks that missed the latency budget, over the most recent
    ticks: the last `window_s`, reaching further back until at least
    `MIN_CHUNKS` chunks are counted, never past `max_age_s`.

    Short so the rule refuses new streams while chunks are late *now*:
    with a fixed 2-4 s memory it kept refusing for seconds after the
    backlog had cleared, and every stream that reconnected meanwhile was
    refused (383 demo-asr streams fell to 14 before one was let in). Reaching
    back keeps a server with few streams (20 chunks a second) able to tell."""

    def __init__(self, window_s: float = 0.5, max_age_s: float = 4.0) -> None:
        self.window_s = window_s
        self.max_age_s = max_age_s
        self._ticks: collections.deque[tuple[float, int, int]] = collections.deque()

    def observe(self, now: float, late: int, total: int) -> None:
        self._ticks.append((now, late, total))
        while self._ticks and self._ticks[0][0] < now - self.max_age_s:
            self._ticks.popleft()

    def counts(self, now: float) -> tuple[int, int]:
        """(late, total) over the recent ticks."""
        late = total = 0
        for at, tick_late, tick_total in reversed(self._ticks):
            age = now - at
            if age > self.max_age_s or (age > self.window_s and total >= MIN_CHUNKS):
                break
            late += tick_late
            total += tick_total
        return late, total

    def reset(self) -> None:
        self._ticks.clear()


class StepRate:
    """Rows stepped per second over the last `window_s`, and the model's
    measured capacity: the rate it stepped while saturated (most chunks
    late with the device busy), which counts everything that shares the
    machine, where tick times see the device alone. On time, the capacity
    may grow past what is being stepped (x `GROWTH`), so a lower figure
    from a busy spell does not hold for ever.

    Late chunks with the device idle much of the window are not a capacity
    (a connection storm starving the tick thread, the first seconds of a
    ramp when the window still holds the quiet before it): learning the
    rate then held a server whose device had half its time free to 420
    rows a second, a fifth of what it stepped later."""

    GROWTH = 1.2
    # Saturated means late *and* the device busy at least this share of the window.
    BUSY_SHARE = 0.8

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._ticks: collections.deque[tuple[float, int, float]] = collections.deque()
        self._rows = 0
        self._busy = 0.0
        self.capacity: float | None = None

    def observe(self, now: float, rows: int, busy_s: float) -> None:
        """A tick of `rows` delivered at `now` that kept the device `busy_s`."""
        self._ticks.append((now, rows, busy_s))
        self._rows += rows
        self._busy += busy_s
        while self._ticks and self._ticks[0][0] < now - self.window_s:
            _, old_rows, old_busy = self._ticks.popleft()
            self._rows -= old_rows
            self._busy -= old_busy

    def rate(self) -> float:
        return self._rows / self.window_s

    def busy_share(self) -> float:
        return self._busy / self.window_s

    def update(self, overloaded: bool) -> None:
        if overloaded:
            if self.busy_share() >= self.BUSY_SHARE:
                self.capacity = self.rate()
        elif self.capacity is not None:
            self.capacity = max(self.capacity, self.GROWTH * self.rate())


def overloaded(late: int, total: int) -> bool:
    """Too many real-time chunks miss the budget: the model is at capacity."""
    return total >= MIN_CHUNKS and late >= LATE_SHARE * total


# Admission by prediction: new streams are admitted while the open streams'
# predicted chunk rate stays under this share of what the device steps per
# second (its best bucket, by the measured tick times). Refusing only once
# chunks were late let every stream that connected during a ramp in, and
# past capacity all of them waited seconds together.
PREDICTED_SHARE = 0.85
# ...and under this share of the rate it stepped while saturated, once known.
MEASURED_SHARE = 0.9


def predicted_overload(
    periods: Iterable[float],
    open_streams: int,
    tick_seconds: dict[int, float],
    capacity: float | None = None,
) -> bool:
    """Whether one more stream would ask for more rows per second than
    `PREDICTED_SHARE` of the device's best rate. `periods`: chunk periods
    of the open streams that have one; a stream without one yet counts as
    the real-time senders' mean. `capacity`: rows per second measured while
    saturated (`StepRate`), the lower bound when known. False without
    measurements."""
    # Real-time senders only: a stream sending faster than twice the
    # shortest tick is sending ahead (a file as fast as possible), takes
    # one row a tick like any other and has no deadline to miss; counted
    # at its sending rate, 16 such streams were refused at the fifth.
    shortest = min((t for t in tick_seconds.values() if t > 0), default=0.0)
    rates = [1.0 / p for p in periods if p > 0 and p >= 2 * shortest]
    limits = [PREDICTED_SHARE * b / t for b, t in tick_seconds.items() if t > 0]
    device = max(limits, default=math.inf)
    # The measured capacity already counts every overhead: only a small margin.
    measured = MEASURED_SHARE * capacity if capacity is not None and capacity > 0 else math.inf
    limit = min(device, measured)
    if not rates or math.isinf(limit):
        return False
    return sum(rates) / len(rates) * (open_streams + 1) > limit


class Refusal(NamedTuple):
    """Why a new stream is refused: `reason` for the metrics (`draining`,
    `compiling`, `full`, `late`: chunks miss the budget, `predicted`: one
    more stream would ask for more than the device steps) and the error the
    client gets."""

    reason: str
    error: StreamError


def admission_refusal(
    name: str,
    *,
    accepting: bool,
    draining: bool,
    open_streams: int,
    max_streams: int,
    late: int,
    total: int,
    budget_ms: float,
    predicted: bool = False,
) -> Refusal | None:
    """Why a new stream is refused now, or None to admit it (`predicted`:
    `predicted_overload` said one more stream is too many)."""
    if draining:
        return Refusal(
            "draining", Unavailable("the server is draining; reconnect to another replica.")
        )
    if not accepting:
        return Refusal(
            "compiling",
            Unavailable(f"model {name!r} is still compiling; retry when /readyz is 200."),
        )
    if open_streams >= max_streams:
        return Refusal(
            "full",
            ResourceExhausted(
                f"model {name!r} is serving its maximum of {max_streams} streams; retry later "
                "or use another replica."
            ),
        )
    if overloaded(late, total):
        return Refusal(
            "late",
            ResourceExhausted(
                f"model {name!r} is at capacity: {late} of its last {total} chunks missed its "
                f"{budget_ms:g} ms latency budget; retry later or use another replica."
            ),
        )
    if predicted:
        return Refusal(
            "predicted",
            ResourceExhausted(
                f"model {name!r} is at capacity: its {open_streams} streams send about as many "
                "chunks a second as its device steps; retry later or use another replica."
            ),
        )
    return None


def timeout_of(
    now: float,
    *,
    ending: bool,
    in_flight: int,
    backlog: int,
    last_input: float,
    last_read: float,
    max_backlog: int,
    idle_timeout_s: float,
    slow_consumer_timeout_s: float,
) -> tuple[str | None, float]:
    """`("idle" | "slow_consumer", 0.0)` for a stream that timed out, else
    `(None, seconds until it may)` (inf: it cannot now)."""
    if in_flight:
        return None, math.inf  # the device holds its chunk: not idle
    if backlog >= max_backlog:
        left = last_read + slow_consumer_timeout_s - now
        return ("slow_consumer", 0.0) if left <= 0 else (None, left)
    if ending:
        return None, math.inf  # flushing: ticks will come
    left = last_input + idle_timeout_s - now
    return ("idle", 0.0) if left <= 0 else (None, left)
