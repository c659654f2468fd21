"""The WebSocket door's protocol at the ASGI boundary (no sockets): what it
sends for each client behaviour, over the fake runtime. The same behaviours
go through real sockets in tests/server/test_e2e.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from sequence_layers.testing import assert_allclose
from server.frontdoors.auth import ApiKeys
from server.frontdoors.websocket import WebSocketStream
from tests.server.frontdoors.fakes import FakeRuntime


def converse(
    client: list[dict[str, Any]],
    query: str = "",
    headers: list[tuple[bytes, bytes]] | None = None,
    keys: ApiKeys | None = None,
    runtime: FakeRuntime | None = None,
    model: str = "echo",
) -> list[dict[str, Any]]:
    """Runs one connection: `client` messages in (then a disconnect), the
    server's ASGI messages out."""
    runtime = runtime or FakeRuntime()
    door = WebSocketStream(runtime, keys or ApiKeys(), max_message_bytes=64)
    scope = {
        "type": "websocket",
        "path_params": {"model": model},
        "query_string": query.encode(),
        "headers": headers or [],
    }
    incoming = [{"type": "websocket.connect"}, *client]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(0)
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(0.05)  # the client waits for outputs, then leaves
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(asyncio.wait_for(door(scope, receive, send), timeout=10))
    return sent


def binary(x: np.ndarray) -> dict[str, Any]:
    return {"type": "websocket.receive", "bytes": x.astype("<f4").tobytes()}


END = {"type": "websocket.receive", "text": '{"type": "end"}'}


def texts(sent: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [json.loads(m["text"]) for m in sent if m.get("text") is not None]


def closed_with(sent: list[dict[str, Any]]) -> int | None:
    closes = [m for m in sent if m["type"] == "websocket.close"]
    assert len(closes) <= 1
    return closes[0]["code"] if closes else None


def test_stream_started_outputs_ended_then_close_1000() -> None:
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    sent = converse([binary(x[:2]), binary(x[2:]), END], query="stream_id=abc")
    assert sent[0] == {"type": "websocket.accept"}
    started = texts(sent)[0]
    assert started["type"] == "started" and started["stream_id"] == "abc"
    assert started["input_shape"] == [2] and started["name"] == "echo"
    outputs = [np.frombuffer(m["bytes"], "<f4").reshape(-1, 2) for m in sent if "bytes" in m]
    assert_allclose(np.concatenate(outputs), 2 * x)
    ended = texts(sent)[-1]
    assert (ended["type"], ended["frames_in"], ended["frames_out"]) == ("ended", 5, 5)
    assert closed_with(sent) == 1000


def test_int16_input_is_decoded_as_int16() -> None:
    runtime = FakeRuntime()
    pcm = np.array([[1, -2], [300, -32768]], np.int16)
    converse(
        [{"type": "websocket.receive", "bytes": pcm.astype("<i2").tobytes()}, END],
        query="dtype=int16",
        runtime=runtime,
    )
    (received,) = runtime.handles[0].sent
    assert received.dtype == np.int16 and received.tolist() == pcm.tolist()


def test_errors_get_their_code_and_close_code() -> None:
    keys = ApiKeys(["k"])
    cases = {
        "no_key": converse([], keys=keys),
        "unknown_model": converse([], model="nope"),
        "bad_dtype": converse([], query="dtype=float64"),
        "bad_bytes": converse([{"type": "websocket.receive", "bytes": b"\x00" * 10}]),
        "too_large": converse([{"type": "websocket.receive", "bytes": b"\x00" * 72}]),
        "bad_text": converse([{"type": "websocket.receive", "text": "hello"}]),
        "unknown_control": converse([{"type": "websocket.receive", "text": '{"type": "x"}'}]),
        "segments_refused": converse([], query="speech_segments=1"),
        "bad_segment_option": converse([], query="speech_segments=1&threshold=high"),
    }
    got = {name: (texts(sent)[-1]["code"], closed_with(sent)) for name, sent in cases.items()}
    assert got == {
        "no_key": ("UNAUTHENTICATED", 1008),
        "unknown_model": ("NOT_FOUND", 1008),
        "bad_dtype": ("INVALID_ARGUMENT", 1007),
        "bad_bytes": ("INVALID_ARGUMENT", 1007),
        "too_large": ("RESOURCE_EXHAUSTED", 1013),
        "bad_text": ("INVALID_ARGUMENT", 1007),
        "unknown_control": ("INVALID_ARGUMENT", 1007),
        "segments_refused": ("INVALID_ARGUMENT", 1007),
        "bad_segment_option": ("INVALID_ARGUMENT", 1007),
    }


def test_auth_by_header_or_token() -> None:
    keys = ApiKeys(["k"])
    by_header = converse([END], headers=[(b"authorization", b"Bearer k")], keys=keys)
    by_token = converse([END], query="token=k", keys=keys)
    for sent in (by_header, by_token):
        assert [t["type"] for t in texts(sent)] == ["started", "ended"]


def test_draining_refuses_with_1013() -> None:
    runtime = FakeRuntime()
    runtime.draining = True
    sent = converse([], runtime=runtime)
    assert (texts(sent)[-1]["code"], closed_with(sent)) == ("UNAVAILABLE", 1013)


def test_a_client_that_leaves_cancels_its_stream_quietly() -> None:
    runtime = FakeRuntime()
    sent = converse([binary(np.ones((1, 2)))], runtime=runtime)
    assert [t["type"] for t in texts(sent)] == ["started"]
    assert closed_with(sent) is None
    assert runtime.handles[0].calls == ["send", "cancel", "cancel"]


def test_a_moved_stream_gets_moved_then_close_1001() -> None:
    runtime = FakeRuntime()
    runtime.moves = True
    sent = converse([binary(np.ones((3, 2), np.float32))], runtime=runtime)
    assert texts(sent)[-1] == {"type": "moved", "resume_token": "/3Rva2Vu", "frames_received": 3}
    assert sent[-1] == {"type": "websocket.close", "code": 1001, "reason": "moved"}
    assert "bytes" in sent[2]  # after `started`, the outputs before it


def test_resume_token_in_the_query_or_the_first_message() -> None:
    token = b"\xfftoken"
    for query, first in (
        ("resume_token=_3Rva2Vu", []),  # base64url, unpadded
        (
            "resume=1",
            [
                {
                    "type": "websocket.receive",
                    "text": '{"type": "config", "resume_token": "/3Rva2Vu"}',
                }
            ],
        ),
    ):
        runtime = FakeRuntime()
        sent = converse([*first, END], query=query, runtime=runtime)
        started = texts(sent)[0]
        assert started["type"] == "started" and started["output_offset"] == 7, query
        assert runtime.tokens == [token], query
    # Not a resume: no `output_offset`; a bad token: INVALID_ARGUMENT, 1007.
    assert "output_offset" not in texts(converse([END]))[0]
    sent = converse([END], query="resume_token=%25%25")
    assert texts(sent)[0]["code"] == "INVALID_ARGUMENT"
    assert closed_with(sent) == 1007
