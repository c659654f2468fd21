"""A fake runtime for the front doors: streams that echo their input,
driven on the test's event loop, with no scheduler and no XLA."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import numpy as np

from server.errors import InvalidArgument, ModelNotFound, StreamError, Unavailable
from server.model import ModelInfo
from server.runtime import Ended, Moved, Output
from server.segments import SegmentOptions, SpeechEvent

# Ends `outputs()` quietly, as a cancelled stream's does.
_CANCELLED = object()


def model_info(name: str = "echo", speech_segments: bool = False) -> ModelInfo:
    return ModelInfo(
        name=name,
        description="doubles its input",
        input_shape=(2,),
        input_dtype="float32",
        output_shape=(2,),
        output_dtype="float32",
        sample_rate=0,
        block_size=1,
        output_ratio=Fraction(1),
        input_latency=0,
        output_latency=0,
        max_streams=4,
        speech_segments=speech_segments,
    )


class FakeHandle:
    """Each `send(x)` outputs `2 * x` at once; `end` outputs `Ended`."""

    def __init__(self, info: ModelInfo, stream_id: str) -> None:
        self.info = info
        self.stream_id = stream_id
        self.calls: list[str] = []
        self.sent: list[np.ndarray] = []
        self.segments: SegmentOptions | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._frames_out = 0
        self._done = False
        # A resumed stream's next output frame (the WebSocket `started` says it).
        self.output_offset = 0
        # Set: the stream moves (the server drains) after its first chunk.
        self.moves = False

    def request_segments(self, options: SegmentOptions) -> None:
        if not self.info.speech_segments:
            raise InvalidArgument("no speech output")
        self.segments = options

    def send(self, samples: np.ndarray) -> None:
        self.calls.append("send")
        if self._done:
            raise InvalidArgument("the stream has already ended")
        x = np.asarray(samples)
        if tuple(x.shape[1:]) != self.info.input_shape:
            raise InvalidArgument(f"chunk shape {list(x.shape)}")
        self.sent.append(x)
        self._queue.put_nowait(Output(2 * x, self._frames_out, time.monotonic()))
        self._frames_out += x.shape[0]
        if self.moves:
            self._done = True
            self._queue.put_nowait(Moved(b"\xfftoken", sum(len(x) for x in self.sent)))
        if self.segments is not None and self._frames_out == x.shape[0]:
            self._queue.put_nowait(SpeechEvent("speech_started", 0))

    def end(self) -> None:
        self.calls.append("end")
        if not self._done:
            self._done = True
            frames = sum(x.shape[0] for x in self.sent)
            self._queue.put_nowait(Ended(frames, self._frames_out, len(self.sent)))

    def cancel(self) -> None:
        self.calls.append("cancel")
        if not self._done:
            self._done = True
            self._queue.put_nowait(_CANCELLED)

    def fail(self, error: StreamError) -> None:
        self.calls.append(f"fail:{error.code}")
        if not self._done:
            self._done = True
            self._queue.put_nowait(error)

    async def outputs(self) -> AsyncIterator[Output | SpeechEvent | Ended | Moved]:
        while True:
            item = await asyncio.wait_for(self._queue.get(), timeout=10)
            if item is _CANCELLED:
                return
            if isinstance(item, StreamError):
                raise item
            yield item
            if isinstance(item, Ended | Moved):
                return


class FakeRuntime:
    """`StreamRuntime` over `FakeHandle`s; `recorded` holds every stats record."""

    def __init__(self, *infos: ModelInfo) -> None:
        self._infos = {i.name: i for i in infos or (model_info(),)}
        self.draining = False
        self.recorded: list[Any] = []
        self.handles: list[FakeHandle] = []
        self.tokens: list[bytes] = []  # resume tokens streams were opened with
        self.moves = False  # every stream moves after its first chunk

    @property
    def ready(self) -> bool:
        return not self.draining

    def open_stream(self, model: str, stream_id: str | None = None) -> FakeHandle:
        if self.draining:
            raise Unavailable("draining")
        handle = FakeHandle(self.get_model(model), stream_id or f"s{len(self.handles)}")
        handle.moves = self.moves
        self.handles.append(handle)
        return handle

    async def resume_stream(
        self, model: str, resume_token: bytes, stream_id: str | None = None
    ) -> FakeHandle:
        await asyncio.sleep(0)  # as the runtime's: the loop runs while the token is checked
        self.tokens.append(resume_token)
        handle = self.open_stream(model, stream_id)
        handle.output_offset = 7
        return handle

    def model_state(self, name: str) -> str:
        return "draining" if self.draining else "ready"

    def record(self, stats: Any) -> None:
        self.recorded.append(stats)

    def list_models(self) -> list[ModelInfo]:
        return list(self._infos.values())

    def get_model(self, name: str) -> ModelInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}") from None
