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
    tick_seconds: float
    queue_wait_seconds: tuple[float, ...]
    input_frames: int


@dataclasses.dataclass(frozen=True)
class StreamStats:
    """A stream ended (or was refused). outcome: ok, cancelled, error, rejected, timeout."""

    model: str
    outcome: str
    frames_in: int = 0
    frames_out: int = 0
    first_output_seconds: float | None = None
