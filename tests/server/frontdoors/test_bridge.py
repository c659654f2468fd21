"""The stream bridge without sockets: a fake runtime, decoded messages in,
outputs out; how each way a stream can stop reaches the runtime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

import numpy as np
import pytest

from sequence_layers.testing import assert_allclose
from server.errors import InvalidArgument, ModelNotFound, StreamError, Unavailable
from server.frontdoors.bridge import END, Inbound, StreamBridge
from server.runtime import Ended, Output
from server.segments import SegmentOptions, SpeechEvent
from server.stats import ChunkStats, ErrorStats
from tests.server.frontdoors.fakes import FakeRuntime, model_info


async def messages(
    items: Iterable[Inbound | Exception], hold: bool = False
) -> AsyncIterator[Inbound]:
    for item in items:
        await asyncio.sleep(0)
        if isinstance(item, Exception):
            raise item
        yield item
    if hold:  # a client that keeps its connection open without sending
        await asyncio.sleep(3600)


def chunks(*sizes: int) -> list[np.ndarray]:
    rng = np.random.default_rng(sum(sizes))
    return [rng.normal(size=(n, 2)).astype(np.float32) for n in sizes]


def test_pump_feeds_chunks_and_yields_outputs_until_ended() -> None:
    runtime = FakeRuntime()
    bridge = StreamBridge(runtime, "websocket")
    xs = chunks(3, 1, 4)

    async def main() -> list[object]:
        handle = await bridge.open("echo", "id-1", None)
        assert handle.stream_id == "id-1"
        return [item async for item in bridge.pump(handle, messages([*xs, END], hold=True))]

    items = asyncio.run(main())
    outputs = [i for i in items if isinstance(i, Output)]
    assert [o.offset for o in outputs] == [0, 3, 4]
    for output, x in zip(outputs, xs, strict=True):
        assert_allclose(output.frames, 2 * x)
    assert items[-1] == Ended(8, 8, 3)
    # `end` once; the bridge's closing `cancel` after Ended does nothing.
    assert runtime.handles[0].calls == ["send", "send", "send", "end", "cancel"]
    latencies = [s for s in runtime.recorded if isinstance(s, ChunkStats)]
    assert [(s.model, s.transport, s.frames) for s in latencies] == [
        ("echo", "websocket", 3),
        ("echo", "websocket", 1),
        ("echo", "websocket", 4),
    ]
    assert all(0 <= s.latency_seconds < 10 for s in latencies)


def test_chunk_latency_is_recorded_after_the_door_wrote_the_output() -> None:
    runtime = FakeRuntime()
    bridge = StreamBridge(runtime, "grpc")

    async def main() -> list[int]:
        handle = await bridge.open("echo", None, None)
        seen = []
        async for _ in bridge.pump(handle, messages([*chunks(2, 2), END])):
            # While the door holds an item (writing it), its latency is not in yet.
            seen.append(len(runtime.recorded))
        return seen

    assert asyncio.run(main()) == [0, 1, 2]


def test_input_that_stops_without_end_cancels_the_stream() -> None:
    """A WebSocket client that disconnects: outputs end without `Ended`."""
    runtime = FakeRuntime()
    bridge = StreamBridge(runtime, "websocket")

    async def main() -> list[object]:
        handle = await bridge.open("echo", None, None)
        return [item async for item in bridge.pump(handle, messages(chunks(2)))]

    items = asyncio.run(main())
    assert [type(i) for i in items] == [Output]
    assert runtime.handles[0].calls[:2] == ["send", "cancel"]


def test_a_bad_message_fails_the_stream_with_its_error() -> None:
    runtime = FakeRuntime()
    bridge = StreamBridge(runtime, "grpc")
    bad = InvalidArgument("chunk data has 10 bytes")

    async def main() -> None:
        handle = await bridge.open("echo", None, None)
        async for _ in bridge.pump(handle, messages([*chunks(2), bad], hold=True)):
            pass

    with pytest.raises(InvalidArgument, match="10 bytes"):
        asyncio.run(main())
    assert runtime.handles[0].calls[:2] == ["send", "fail:INVALID_ARGUMENT"]


def test_a_chunk_the_runtime_refuses_fails_the_stream() -> None:
    runtime = FakeRuntime()
    bridge = StreamBridge(runtime, "grpc")
    wrong_shape = np.zeros((2, 3), np.float32)

    async def main() -> None:
        handle = await bridge.open("echo", None, None)
        async for _ in bridge.pump(handle, messages([wrong_shape, END], hold=True)):
            pass

    with pytest.raises(InvalidArgument, match="chunk shape"):
        asyncio.run(main())


def test_a_broken_connection_cancels_the_stream() -> None:
    runtime = FakeRuntime()
    bridge = StreamBridge(runtime, "grpc")

    async def main() -> list[object]:
        handle = await bridge.open("echo", None, None)
        return [i async for i in bridge.pump(handle, messages([ConnectionResetError()]))]

    assert asyncio.run(main()) == []
    assert runtime.handles[0].calls[0] == "cancel"


def test_a_door_that_stops_reading_frees_the_stream_and_its_reader() -> None:
    """The door's send failed (client gone) or the door was cancelled."""
    runtime = FakeRuntime()
    bridge = StreamBridge(runtime, "websocket")

    async def main() -> bool:
        handle = await bridge.open("echo", None, None)
        pump = bridge.pump(handle, messages(chunks(1, 1), hold=True))
        await anext(pump)
        await pump.aclose()
        # The reader task was cancelled, not left waiting on the client.
        others = asyncio.all_tasks() - {asyncio.current_task()}
        done, pending = await asyncio.wait(others, timeout=5)
        return not pending and all(t.cancelled() for t in done) and len(done) == 1

    assert asyncio.run(main())
    assert runtime.handles[0].calls[-1] == "cancel"


def test_open_refusals_raise_and_hold_no_stream() -> None:
    runtime = FakeRuntime()
    bridge = StreamBridge(runtime, "websocket")
    with pytest.raises(ModelNotFound):
        asyncio.run(bridge.open("nope", None, None))
    # Segments on a model without a speech output: refused, stream cancelled.
    with pytest.raises(InvalidArgument, match="no speech output"):
        asyncio.run(bridge.open("echo", None, SegmentOptions()))
    assert runtime.handles[0].calls == ["cancel"]
    runtime.draining = True
    with pytest.raises(Unavailable):
        asyncio.run(bridge.open("echo", None, None))


def test_segments_events_follow_their_output() -> None:
    runtime = FakeRuntime(model_info("vad", speech_segments=True))
    bridge = StreamBridge(runtime, "websocket")

    async def main() -> list[type]:
        handle = await bridge.open("vad", None, SegmentOptions(threshold=0.7))
        assert runtime.handles[0].segments == SegmentOptions(threshold=0.7)
        return [type(i) async for i in bridge.pump(handle, messages([*chunks(2), END]))]

    assert asyncio.run(main()) == [Output, SpeechEvent, Ended]


def test_reject_counts_the_error_for_its_transport() -> None:
    runtime = FakeRuntime()
    StreamBridge(runtime, "grpc").reject(ModelNotFound("x"), "nope")
    StreamBridge(runtime, "websocket").reject(StreamError("boom"))
    assert runtime.recorded == [
        ErrorStats("nope", "NOT_FOUND", "grpc"),
        ErrorStats("", "INTERNAL", "websocket"),
    ]


def test_a_door_that_fails_mid_stream_frees_the_stream_at_once() -> None:
    """The door's write raised (the client is gone): under `aclosing` the
    stream is cancelled before the door's handler returns."""
    runtime = FakeRuntime()
    bridge = StreamBridge(runtime, "websocket")

    async def main() -> None:
        handle = await bridge.open("echo", None, None)
        pump = bridge.pump(handle, messages(chunks(1, 1), hold=True))
        with pytest.raises(ConnectionResetError):
            async with contextlib.aclosing(pump) as items:
                async for _ in items:
                    raise ConnectionResetError
        assert runtime.handles[0].calls[-1] == "cancel"

    asyncio.run(main())
