"""A fake device and model for runtime tests without XLA.

The model is a delay line of `latency` frames: its step outputs each frame
`latency` frames late, so its declared input and output latencies are both
`latency` and `layer()` is the identity. A stream through the runtime must
therefore get exactly its own input back: every frame, in order, with the
latency flushed at the end and the first outputs dropped. The delay line's
state is the last `latency` frames of the slot, so a state mixed up
between slots, or not reset for a new stream, shows in the outputs.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from fractions import Fraction
from typing import Any

import numpy as np

from server.model import ModelInfo
from server.runtime.scheduler import Staging


@dataclasses.dataclass
class FakeModel:
    """What an `Engine` reads of a model, for a delay line over [t, 1] floats."""

    name: str = "fake"
    latency: int = 0
    block_size: int = 2
    output_ratio: Fraction = Fraction(1)
    parameter_count: int = 0

    def info(self, max_streams: int = 0) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            description="delay line",
            input_shape=(1,),
            input_dtype="float32",
            output_shape=(1,),
            output_dtype="float32",
            sample_rate=0,
            block_size=self.block_size,
            output_ratio=self.output_ratio,
            input_latency=self.latency,
            output_latency=self.latency,
            max_streams=max_streams,
        )


class FakeDevice:
    """A `DeviceRunner` stepping the delay line in numpy. Records each
    dispatch's slots and every reset; `hold` (an Event) holds dispatches
    until set, to keep ticks in flight. With `seconds` > 0 a tick takes that
    long, one after another as on a device: `fetch` waits for it, `done`
    says whether it has finished, and `overlapped` counts the ticks
    dispatched while the one before them was still running."""

    def __init__(self, rows: int, chunk: int, latency: int) -> None:
        self.rows, self.chunk, self.latency = rows, chunk, latency
        self.compile_seconds: dict[Any, float] = {"full": 0.0}
        self.frames = np.zeros((rows, latency), np.float32)
        self.valid = np.zeros((rows, latency), bool)
        self.dispatched: list[list[int]] = []
        self.resets: list[int] = []
        self.restored: list[int] = []
        self.hold: threading.Event | None = None
        self.fail_next = False
        self.seconds = 0.0
        self.overlapped = 0
        self._free_at = 0.0

    def build(self) -> None:
        pass

    def compile(self, stopping: Any = None) -> bool:
        return True

    def warm_up(self) -> dict[int, float]:
        return {1: self.seconds} if self.seconds else {}

    def staging(self, bucket: int) -> Staging:
        return Staging(
            x=np.zeros((bucket, self.chunk, 1), np.float32),
            slots=np.full((bucket,), self.rows, np.int32),
            taken=np.zeros((bucket,), np.int32),
            padding_slot=self.rows,
        )

    def recycle(self, staged: Staging) -> None:
        pass

    def reset_slots(self, slots: list[int]) -> None:
        for slot in slots:
            self.frames[slot] = 0
            self.valid[slot] = False
            self.resets.append(slot)

    @property
    def row_layout(self) -> list[tuple[tuple[int, ...], np.dtype[Any]]]:
        return [((self.latency,), np.dtype(np.float32)), ((self.latency,), np.dtype(bool))]

    def read_row(self, slot: int) -> tuple[np.ndarray, ...]:
        return self.frames[slot].copy(), self.valid[slot].copy()

    def put_row(self, row: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        return row

    def write_rows(self, rows: list[tuple[int, tuple[np.ndarray, ...]]]) -> None:
        for slot, (frames, valid) in rows:
            self.frames[slot], self.valid[slot] = frames, valid
            self.restored.append(slot)

    def initial_row(self) -> tuple[np.ndarray, ...]:
        return np.zeros((self.latency,), np.float32), np.zeros((self.latency,), bool)

    def dispatch(self, slot_ids: np.ndarray, x: np.ndarray, lengths: np.ndarray) -> Any:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device lost")
        if self.hold is not None:
            assert self.hold.wait(10)
        self.dispatched.append([int(s) for s in slot_ids if s < self.rows])
        bucket, chunk = x.shape[0], self.chunk
        y = np.zeros((bucket, chunk, 1), np.float32)
        y_mask = np.zeros((bucket, chunk), bool)
        for i, slot in enumerate(slot_ids):
            mask = np.arange(chunk) < lengths[i]
            if slot >= self.rows:  # padding row: stepped on zeros, state untouched
                continue
            seq = np.concatenate([self.frames[slot], x[i, :, 0]])
            seq_mask = np.concatenate([self.valid[slot], mask])
            y[i, :, 0], y_mask[i] = seq[:chunk], seq_mask[:chunk]
            self.frames[slot], self.valid[slot] = seq[chunk:], seq_mask[chunk:]
        now = time.monotonic()
        self.overlapped += now < self._free_at
        self._free_at = max(now, self._free_at) + self.seconds
        return y, y_mask, self._free_at

    def fetch(self, outputs: Any) -> tuple[np.ndarray, np.ndarray]:
        y, y_mask, ready_at = outputs
        time.sleep(max(0.0, ready_at - time.monotonic()))
        return y, y_mask

    def done(self, outputs: Any) -> bool:
        return bool(time.monotonic() >= outputs[2])

    def state_lost(self) -> bool:
        return False

    def reset_state(self) -> None:
        self.reset_slots(list(range(self.rows)))
