"""`SchedulerConfig`: the runtime knobs of one model.

Each field is declared once with `knob(default, help)` (server/settings.py):
the `sl-serve` flags, the `[defaults]` and `[models.NAME]` keys of a config
file and their type checks are all generated from these fields.
"""

from __future__ import annotations

import dataclasses

from server.settings import knob


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Runtime knobs of one model: `sl-serve` flags, `[defaults]` and
    `[models.NAME]` keys of a config file (all generated from these fields)."""

    max_streams: int = knob(32, "concurrent streams per model (device state slots)", positive=True)
    chunk_blocks: int = knob(
        1, "blocks per stream per tick: chunk = chunk_blocks * block_size frames", positive=True
    )
    max_batch_delay_ms: float = knob(
        5.0,
        "longest a ready chunk waits for streams that are not expected to join its tick "
        "(streams expected sooner are waited for within --latency-budget-ms)",
    )
    # 50: half the 100 ms p99 that real-time clients are commonly promised.
    # The scheduler spends the budget waiting for company at moderate load,
    # so chunk latency there sits near it (80 put Silero VAD's p99 at 89 ms
    # with 64 streams); under load ticks grow without waiting.
    latency_budget_ms: float = knob(
        50.0,
        "most time from a chunk being ready to its outputs, tick included: a ready chunk "
        "waits for streams expected to join its tick as long as it still makes this, so ticks "
        "grow with load; new streams are refused while many chunks miss it",
        positive=True,
    )
    idle_timeout_s: float = knob(
        30.0, "a stream that sends nothing this long ends with DEADLINE_EXCEEDED", positive=True
    )
    max_chunk_frames: int = knob(
        16000 * 10, "largest single chunk a client may send, in frames", positive=True
    )
    max_buffered_frames: int = knob(
        16000 * 30, "frames a stream may have buffered ahead of processing", positive=True
    )
    max_output_backlog: int = knob(
        64,
        "output messages queued for a client that is not reading; past this the stream is "
        "not scheduled (backpressure)",
        positive=True,
    )
    slow_consumer_timeout_s: float = knob(
        30.0, "a stream stuck on backpressure this long ends with RESOURCE_EXHAUSTED"
    )
    # 4 MiB: 8 demo-asr rows (495 KB each). On a 2-core CPU 64 rows (32 MB)
    # written in one tick took ~30 ms and delayed that tick's other streams
    # by 1.7 ticks; 8 rows add ~4 ms a tick, and a burst of 64 is in within
    # 8 ticks. Small rows (logmel: 1.6 KB) are not held back at all.
    restore_bytes_per_tick: int = knob(
        4 * 1024 * 1024,
        "stream migration: most bytes of resumed streams' state rows written into slots in "
        "one tick; a burst of resumed streams is spread over ticks (a stream is stepped once "
        "its row is in, buffering its input meanwhile) so the streams already running keep "
        "their latency; at least one row a tick is written, whatever its size",
        positive=True,
    )
    shard: bool = knob(True, "shard slots over all local devices of the default backend")
    buckets: tuple[int, ...] | None = knob(
        None,
        "batch sizes to compile (default: powers of two up to max_streams); fewer compile "
        "faster at the cost of padding small ticks",
    )
    device: str | None = knob(None, "pin the model to one device, e.g. cpu:0 or gpu:1")

    def tick_buckets(self) -> list[int]:
        """The batch sizes compiled, ascending; the largest holds every slot."""
        buckets = sorted(set(self.buckets or buckets_for(self.max_streams)))
        if buckets[-1] < self.max_streams:
            raise ValueError(
                f"largest bucket {buckets[-1]} is below max_streams={self.max_streams}."
            )
        return buckets


def buckets_for(max_streams: int) -> list[int]:
    """Powers of two up to (and including one >=) max_streams."""
    out, b = [], 1
    while b < max_streams:
        out.append(b)
        b *= 2
    out.append(b)
    return out
