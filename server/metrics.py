"""Prometheus metrics (names pinned in DESIGN.md section 5), built from the
stats records the runtime and transports emit and from the runtime's stats
snapshot, on a registry passed in. Nothing here reads runtime internals."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from server.stats import ChunkStats, ErrorStats, ModelStats, StreamStats, TickStats

# 1 ms .. 10 s: real-time audio lives between a few ms and a few hundred.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class StatsSource(Protocol):
    """What metrics read of a runtime (`server.runtime.Runtime`)."""

    def snapshot(self) -> Iterable[ModelStats]: ...


class _RuntimeCollector(Collector):
    """Gauges read from the runtime's stats snapshot at scrape time."""

    def __init__(self, snapshot: Callable[[], Iterable[ModelStats]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        active = GaugeMetricFamily("sl_streams_active", "Streams open now.", labels=["model"])
        slots = GaugeMetricFamily("sl_stream_slots", "Stream slots (capacity).", labels=["model"])
        compile_s = GaugeMetricFamily(
            "sl_compile_seconds", "Compile time of each tick bucket.", labels=["model", "bucket"]
        )
        for model in self.snapshot():
            name = model.scheduler.model
            active.add_metric([name], model.scheduler.active_streams)
            slots.add_metric([name], model.scheduler.slots)
            for bucket, seconds in model.compile_seconds.items():
                compile_s.add_metric([name, bucket], seconds)
        yield active
        yield slots
        yield compile_s


class Metrics:
    """Turns stats records into Prometheus series. Pass `record` as the
    runtime's stats sink."""

    def __init__(self, registry: CollectorRegistry, runtime: StatsSource | None = None) -> None:
        self.registry = registry
        self.streams_total = Counter(
            "sl_streams_total",
            "Streams ended, by outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        # Beside sl_streams_total{outcome="rejected"}: which admission rule
        # refused them (draining, compiling, full, late, predicted), so an
        # operator can tell a full replica from one whose chunks run late.
        self.streams_rejected = Counter(
            "sl_streams_rejected_total",
            "Streams refused at admission, by reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.tick_seconds = Histogram(
            "sl_tick_seconds",
            "One device tick.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tick_batch = Histogram(
            "sl_tick_batch_size",
            "Streams per tick.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sl_queue_wait_seconds",
            "Chunk ready until its tick starts.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.chunk_latency = Histogram(
            "sl_chunk_latency_seconds",
            "Chunk received until its outputs are written.",
            ["model", "transport"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.first_output = Histogram(
            "sl_first_output_seconds",
            "Stream opened until its first output.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.input_frames = Counter(
            "sl_input_frames_total", "Input frames stepped.", ["model"], registry=registry
        )
        self.output_frames = Counter(
            "sl_output_frames_total", "Valid output frames sent.", ["model"], registry=registry
        )
        self.errors = Counter(
            "sl_errors_total",
            "Errors returned to clients, by status code.",
            ["model", "code"],
            registry=registry,
        )
        if runtime is not None:
            self.attach(runtime)

    def attach(self, runtime: StatsSource) -> None:
        self.registry.register(_RuntimeCollector(runtime.snapshot))

    def record(self, stats: Any) -> None:
        if isinstance(stats, TickStats):
            self.tick_seconds.labels(stats.model).observe(stats.tick_seconds)
            self.tick_batch.labels(stats.model).observe(stats.batch_size)
            # One label lookup per tick, not per stream: this runs on the
            # tick thread, once for each of up to max_streams waits.
            queue_wait = self.queue_wait.labels(stats.model)
            for wait in stats.queue_wait_seconds:
                queue_wait.observe(wait)
            self.input_frames.labels(stats.model).inc(stats.input_frames)
            self.output_frames.labels(stats.model).inc(stats.output_frames)
        elif isinstance(stats, StreamStats):
            self.streams_total.labels(stats.model, stats.outcome).inc()
            if stats.reason:
                self.streams_rejected.labels(stats.model, stats.reason).inc()
            if stats.first_output_seconds is not None:
                self.first_output.labels(stats.model).observe(stats.first_output_seconds)
        elif isinstance(stats, ChunkStats):
            self.chunk_latency.labels(stats.model, stats.transport).observe(stats.latency_seconds)
        elif isinstance(stats, ErrorStats):
            self.errors.labels(stats.model, stats.code).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
