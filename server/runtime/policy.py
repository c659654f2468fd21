"""The scheduler's rules, as pure functions of numbers: which tick to run and
when, who timed out, whom to admit. No jax, no threads, no clock: callers
pass `now` (time.monotonic() seconds), so every rule is tested with made-up
times (tests/server/test_policy.py).

Batching spends a latency budget instead of a fixed delay. A ready chunk
may wait for company until `budget - expected tick time` after it became
ready, but only while a stream is *expected* to join: each stream's chunks
come about periodically, so the next one is predicted from the last. With
nobody expected, it waits at most `max_batch_delay_ms` (a lone stream is
not held back for nothing). While a tick is on the device, partial batches
wait for it to finish, so under load ticks grow by themselves.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterable

from server.errors import ResourceExhausted, StreamError, Unavailable

# Exponential averages: weight of the newest measurement.
_PERIOD_WEIGHT = 0.25
_TICK_WEIGHT = 0.2
# A stream idle longer than this between chunks has no useful period.
_MAX_PERIOD_S = 2.0

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
    joinable: int,
    expected: Iterable[float],
    device_busy: bool,
    delay_s: float,
    budget_s: float,
    tick_estimate_s: float,
) -> TickPlan:
    """Whether the ready streams should tick now.

    - `oldest_ready`: when the longest-waiting ready chunk became ready
      (None: nothing is ready).
    - `joinable`: open streams that could still join this tick (waiting on
      their client; not those blocked by backpressure).
    - `expected`: when each joinable stream's next chunk is predicted.
    - `device_busy`: a tick is on the device.
    - `tick_estimate_s`: expected device time of a tick of the ready streams.
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
    start_by = oldest_ready + max(delay_s, budget_s - tick_estimate_s)
    if now >= start_by:
        return GO
    # A prediction is given `delay_s` of slack: arrivals jitter.
    coming = [eta for eta in expected if now < eta + delay_s and eta <= start_by]
    if coming:
        return TickPlan(False, min(min(coming) + delay_s, start_by) - now)
    go_at = min(oldest_ready + delay_s, start_by)
    if now >= go_at:
        return GO
    return TickPlan(False, go_at - now)


def bucket_for(n: int, buckets: list[int], max_streams: int) -> int:
    """The compiled batch size a tick of `n` streams runs at: `n` itself when
    every slot is in it (the full tick), else the smallest bucket >= n."""
    if n == max_streams:
        return n
    return next(b for b in buckets if b >= n)


# Ready streams are left for the next tick only to fill a bucket of at
# least this many rows: from there a tick's device time grows about linearly
# with its rows (demo-asr: 0.53, 0.47, 0.47 ms a row at 32, 64, 128), so the
# rows left over cost no more in the next tick, which whoever becomes ready
# meanwhile joins. Below it small ticks cost more per row and padding is cheap.
MIN_FILLED_BUCKET = 32
# ...and only when the filled bucket serves this much more per device second.
FILL_GAIN = 1.15


def tick_size(
    n: int, buckets: list[int], max_streams: int, estimate: Callable[[int], float]
) -> int:
    """How many of `n` ready streams the next tick takes: all of them, or a
    bucket below `n`, filled, when that steps more streams per device
    second than `n` padded up to the next bucket; of those buckets the one
    with the best rate (the rest go next tick). Under load, 135 ready
    streams padded to a bucket of 256 took twice the device time of 128;
    and past a cache-sized batch a bigger tick is slower per row (demo-asr
    on a 2-core EPYC: 3.3 rows/ms at 64, 2.2 at 128, 2.1 at 256), so with
    400 streams ready, ticks of 256 held the served rate at two thirds of
    what ticks of 64 gave. `estimate(bucket)`: expected device seconds of
    a tick (0: unknown, then all are taken)."""
    padded = bucket_for(n, buckets, max_streams)
    if padded == n:
        return n
    t_padded = estimate(padded)
    if t_padded <= 0:
        return n
    best, best_rate = n, FILL_GAIN * n / t_padded
    for b in buckets:
        if MIN_FILLED_BUCKET <= b < n:
            t = estimate(b)
            if t > 0 and b / t >= best_rate:
                best, best_rate = b, b / t
    return best


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
    """A stream's chunk period after one more interval between its chunks."""
    if interval > _MAX_PERIOD_S:
        return None
    if period is None:
        return interval
    return period + _PERIOD_WEIGHT * (interval - period)


class TickTimes:
    """Expected device seconds of a tick per bucket.

    Each bucket's ticks are averaged (exponentially) after dividing out a
    load factor shared by all buckets: measured over warm-up time, averaged
    over every tick. An estimate is that average times the current factor.
    So buckets compare like for like: a bucket last run while the host was
    busy (its ticks 30% slower) is not held against one measured only at
    warm-up on an idle machine. Compared raw, 256 rows (warm-up: idle)
    looked better than 64 (measured under load) and was run again and
    again at 2 rows/ms against 64's 3.3."""

    def __init__(self) -> None:
        self._norm: dict[int, float] = {}
        self._warm: dict[int, float] = {}
        self._count: dict[int, int] = {}
        self._factor: float | None = None

    def seed(self, bucket: int, seconds: float) -> None:
        """The warm-up's time for `bucket` (idle machine): the reference the
        load factor is measured against."""
        if seconds > 0:
            self._warm[bucket] = seconds
            self._norm.setdefault(bucket, seconds)
            self._count.setdefault(bucket, 0)

    def observe(self, bucket: int, seconds: float) -> None:
        warm = self._warm.get(bucket)
        if warm:
            ratio = seconds / warm
            old_factor = self._factor
            self._factor = (
                ratio if old_factor is None else old_factor + _TICK_WEIGHT * (ratio - old_factor)
            )
        norm = seconds / (self._factor or 1.0)
        self._count[bucket] = self._count.get(bucket, 0) + 1
        old = self._norm.get(bucket)
        self._norm[bucket] = norm if old is None else old + _TICK_WEIGHT * (norm - old)

    def estimate(self, bucket: int) -> float:
        """The bucket's expected time; unmeasured, the nearest smaller
        one's (0: none)."""
        if bucket not in self._norm:
            smaller = [b for b in self._norm if b < bucket]
            if not smaller:
                return 0.0
            bucket = max(smaller)
        return self._norm[bucket] * (self._factor or 1.0)

    def as_dict(self) -> dict[int, float]:
        return {b: self.estimate(b) for b in self._norm}

    def served(self, min_ticks: int = 4) -> dict[int, float]:
        """Buckets that ran at least `min_ticks` (the warm-up measures an
        idle machine: the biggest bucket, seldom run, would otherwise
        promise its uncontended rate for ever)."""
        return {b: self.estimate(b) for b, n in self._count.items() if n >= min_ticks}


class LateMeter:
    """Real-time chunks that missed the latency budget, counted over the last
    one to two windows of `window_s` (two counters, rotated)."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._start = -math.inf
        self._current = [0, 0]  # late, total
        self._previous = [0, 0]

    def _rotate(self, now: float) -> None:
        if now - self._start < self.window_s:
            return
        stale = now - self._start >= 2 * self.window_s
        self._previous = [0, 0] if stale else self._current
        self._current = [0, 0]
        self._start = now

    def observe(self, now: float, late: int, total: int) -> None:
        self._rotate(now)
        self._current[0] += late
        self._current[1] += total

    def counts(self, now: float) -> tuple[int, int]:
        """(late, total) over the recent windows."""
        self._rotate(now)
        return (self._current[0] + self._previous[0], self._current[1] + self._previous[1])

    def reset(self) -> None:
        self._start, self._current, self._previous = -math.inf, [0, 0], [0, 0]


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


def admission_error(
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
) -> StreamError | None:
    """Why a new stream is refused now, or None to admit it (`predicted`:
    `predicted_overload` said one more stream is too many)."""
    if draining:
        return Unavailable("the server is draining; reconnect to another replica.")
    if not accepting:
        return Unavailable(f"model {name!r} is still compiling; retry when /readyz is 200.")
    if open_streams >= max_streams:
        return ResourceExhausted(
            f"model {name!r} is serving its maximum of {max_streams} streams; retry later or "
            "use another replica."
        )
    if overloaded(late, total):
        return ResourceExhausted(
            f"model {name!r} is at capacity: {late} of its last {total} chunks missed its "
            f"{budget_ms:g} ms latency budget; retry later or use another replica."
        )
    if predicted:
        return ResourceExhausted(
            f"model {name!r} is at capacity: its {open_streams} streams send about as many "
            "chunks a second as its device steps; retry later or use another replica."
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
