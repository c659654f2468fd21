"""Plain stats records the runtime emits; the metrics layer turns them into
Prometheus series. The core knows nothing of Prometheus."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TickStats:
    """One device tick."""

    model: str
    batch_size: int
    bucket: int
    # time.monotonic() when the tick started (its chunks were taken).
    started_at: float
    # The device call, input transfer and output fetch included.
    tick_seconds: float
    # Host work of the tick outside the device call: batching chunks and
    # routing outputs (the scheduler's own overhead).
    host_seconds: float
    queue_wait_seconds: tuple[float, ...]
    input_frames: int
    # Valid output frames routed to clients (latency frames dropped).
    output_frames: int = 0
    # How long the device sat idle before this tick: from the previous
    # tick's outputs to this tick's dispatch (0 when it was dispatched ahead).
    # Under a backlog that is host time the device waited for; otherwise it
    # includes waiting for clients.
    device_idle_seconds: float = 0.0
    # Launching the device call (and resetting new streams' slots); the
    # bare step pays the launch too, so it is not in `host_seconds`.
    dispatch_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class StreamStats:
    """A stream ended (or was refused). outcome: ok, cancelled, error, rejected, timeout,
    moved (handed off to another replica while draining)."""

    model: str
    outcome: str
    frames_in: int = 0
    frames_out: int = 0
    first_output_seconds: float | None = None
    # Why a `rejected` stream was refused (`policy.Refusal.reason`).
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class StreamReleased:
    """A door is done with a stream (wrote its last message): a draining
    server waits for every one before it closes its ports."""

    model: str


@dataclasses.dataclass(frozen=True)
class ChunkStats:
    """Outputs written to a client: latency from the input they needed."""

    model: str
    transport: str
    latency_seconds: float
    frames: int


@dataclasses.dataclass(frozen=True)
class ErrorStats:
    """An error returned to a client."""

    model: str
    code: str
    transport: str


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of one model's scheduler, read at scrape time."""

    model: str
    active_streams: int
    slots: int
    # Streams with a chunk waiting for a tick now.
    ready_streams: int
    ticks: int
    # Ticks dispatched while the one before was still on the device.
    look_ahead_ticks: int
    # Real-time chunks over the recent windows, and those that waited past
    # the latency budget; `overloaded`: new streams are refused for it.
    recent_chunks: int
    late_chunks: int
    overloaded: bool
    # Expected device seconds of a tick, per bucket (measured).
    tick_estimates: dict[int, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """What the metrics layer reads of one served model."""

    scheduler: SchedulerStats
    # Seconds to compile each program (bucket size, or "full").
    compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    ready: bool = False
