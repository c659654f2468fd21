"""bench_e2e's account of the server's cores by thread, and of its counters."""

from __future__ import annotations

import os
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from loadtests.bench_e2e import parse_counters, refusals, thread_cpu_seconds
from server.metrics import Metrics
from server.runtime.engine import set_os_thread_name
from server.stats import StreamStats, TickStats

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_named_tick_thread_and_the_main_thread_are_counted_apart() -> None:
    spun, leave = threading.Event(), threading.Event()

    def tick() -> None:
        set_os_thread_name("sl-tick-demo")
        _spin(0.3)
        spun.set()
        leave.wait()  # alive until read: an ended thread leaves /proc/PID/task

    before = thread_cpu_seconds(os.getpid())
    worker = threading.Thread(target=tick)
    worker.start()
    _spin(0.15)  # this thread is the process's main thread under pytest
    assert spun.wait(10)
    after = thread_cpu_seconds(os.getpid())
    leave.set()
    worker.join()
    spent = {k: after[k] - before[k] for k in after}
    # Clock ticks are 10 ms: allow two of them either way.
    assert spent["tick"] >= 0.3 - 0.02
    assert spent["tick"] <= 0.3 + 0.1
    assert spent["event_loop"] >= 0.15 - 0.02
    assert spent["xla"] == pytest.approx(0.0, abs=0.02)


def test_counters_come_from_what_the_server_exposes() -> None:
    # The server's own Metrics renders them: the patterns must match its text.
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for model, batch in (("asr", 3), ("asr", 5), ("other", 64)):
        metrics.record(TickStats(model, batch, batch, 0.0, 0.01, 0.0, (), 0))
    for model, reason in (("asr", "predicted"), ("asr", "predicted"), ("asr", "late")):
        metrics.record(StreamStats(model, "rejected", reason=reason))
    metrics.record(StreamStats("other", "rejected", reason="full"))
    metrics.record(StreamStats("asr", "ok"))
    counters = parse_counters(generate_latest(registry).decode(), "asr")
    assert counters == {
        "batch_sum": 8.0,
        "batch_count": 2.0,
        "refused:predicted": 2.0,
        "refused:late": 1.0,
    }
    metrics.record(StreamStats("asr", "rejected", reason="full"))
    later = parse_counters(generate_latest(registry).decode(), "asr")
    assert refusals(counters, later) == {"full": 1}
