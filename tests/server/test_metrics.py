"""Prometheus metrics after a known set of streams (3 ok, 1 cancelled,
1 refused, 1 bad input, 1 idle timeout): exact counters and gauges, and
histogram counts that match what clients saw."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import websockets

from clients.client import AsyncGrpcClient, AsyncWebSocketClient, StreamingError, chunked, collect
from server.defaults import logmel
from tests.reliability.conftest import metric
from tests.server.serving import running_server

pytestmark = pytest.mark.e2e  # starts server processes: not in `make test-fast`

WAVE = (np.random.default_rng(4).normal(size=(3200, 1)) * 0.1).astype(np.float32)


def test_metrics_after_known_streams() -> None:
    with running_server(
        [
            "--model",
            "logmel",
            "--max-streams",
            "1",
            "--buckets",
            "1",
            "--chunk-blocks",
            "4",
            "--idle-timeout-s",
            "1.5",
        ]
    ) as server:
        messages = {"grpc": 0, "websocket": 0}

        async def main() -> dict[str, str]:
            codes: dict[str, str] = {}
            grpc_client = AsyncGrpcClient(server.grpc_target)
            ws_client = AsyncWebSocketClient(server.ws_url)
            # 3 ok: two over gRPC, one over WebSocket.
            for client, transport in (
                (grpc_client, "grpc"),
                (grpc_client, "grpc"),
                (ws_client, "websocket"),
            ):
                async for event in client.stream("logmel", chunked(WAVE, 500)):
                    messages[transport] += type(event).__name__ == "Output"
            # 1 cancelled: one tick's worth of audio, wait for its output, leave.
            async with websockets.connect(f"{server.ws_url}/v1/models/logmel/stream") as ws:
                json.loads(await ws.recv())
                await ws.send(WAVE[:640].tobytes())
                assert isinstance(await ws.recv(), bytes)
                messages["websocket"] += 1
            # 1 idle stream holding the only slot; meanwhile 1 refused.
            async with grpc_client_for(server) as idle_client:

                async def idle_chunks():  # type: ignore[no-untyped-def]
                    await asyncio.sleep(30)
                    yield WAVE

                idle = asyncio.create_task(collect(idle_client.stream("logmel", idle_chunks())))
                await asyncio.sleep(0.3)
                with pytest.raises(StreamingError) as refused:
                    await grpc_client.infer("logmel", WAVE)
                codes["refused"] = refused.value.code
                with pytest.raises(StreamingError) as timeout:
                    await idle
                codes["idle"] = timeout.value.code
            # 1 bad input.
            with pytest.raises(StreamingError) as bad:
                await grpc_client.infer("logmel", np.full((100, 1), np.nan, np.float32))
            codes["bad"] = bad.value.code
            await grpc_client.close()
            return codes

        codes = asyncio.run(main())
        assert codes == {
            "refused": "RESOURCE_EXHAUSTED",
            "idle": "DEADLINE_EXCEEDED",
            "bad": "INVALID_ARGUMENT",
        }
        m = lambda name, **labels: metric(server, name, model="logmel", **labels)
        assert m("sl_streams_total", outcome="ok") == 3
        assert m("sl_streams_total", outcome="cancelled") == 1
        assert m("sl_streams_total", outcome="rejected") == 1
        assert m("sl_streams_rejected_total", reason="full") == 1  # the one slot was held
        assert m("sl_streams_total", outcome="error") == 1
        assert m("sl_streams_total", outcome="timeout") == 1
        assert m("sl_errors_total", code="INVALID_ARGUMENT") == 1
        assert m("sl_errors_total", code="RESOURCE_EXHAUSTED") == 1
        assert m("sl_errors_total", code="DEADLINE_EXCEEDED") == 1
        assert m("sl_streams_active") == 0
        assert m("sl_stream_slots") == 1
        frames = logmel().offline(WAVE).shape[0]
        assert m("sl_input_frames_total") == 3 * len(WAVE) + 640
        # The cancelled stream's one tick gives 4 frames less the 2 latency frames.
        assert m("sl_output_frames_total") == 3 * frames + 2
        ticks = m("sl_tick_seconds_count")
        assert ticks > 0 and m("sl_tick_batch_size_count") == ticks
        # One slot: every tick carries exactly one stream's chunk.
        assert m("sl_queue_wait_seconds_count") == ticks
        assert m("sl_tick_batch_size_sum") == ticks
        assert m("sl_first_output_seconds_count") == 4
        assert m("sl_chunk_latency_seconds_count", transport="grpc") == messages["grpc"]
        assert m("sl_chunk_latency_seconds_count", transport="websocket") == messages["websocket"]
        assert m("sl_compile_seconds", bucket="1") > 0


def grpc_client_for(server):  # type: ignore[no-untyped-def]
    return AsyncGrpcClient(server.grpc_target)
