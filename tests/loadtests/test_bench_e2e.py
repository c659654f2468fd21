"""bench_e2e's account of the server's cores by thread."""

from __future__ import annotations

import os
import threading
import time

import pytest

from loadtests.bench_e2e import thread_cpu_seconds
from server.runtime.engine import set_os_thread_name

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
