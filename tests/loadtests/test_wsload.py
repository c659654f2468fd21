"""The load generator's lean WebSocket streams (loadtests/wsload.py), with no
server: frames checked against the `websockets` library's own parser, and a
stream fed a scripted server's bytes in random splits. Against a real
`sl-serve`: tests/clients/test_cli.py."""

from __future__ import annotations

import asyncio
import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from loadtests.wsload import LeanStream, Plan, accept_key, client_frame

INFO: dict[str, Any] = {
    "output_ratio": {"numerator": 1, "denominator": 160},
    "block_size": 160,
    "output_latency": 2,
    "output_shape": [80],
}


def parse(data: bytes, mask: bool) -> Frame:
    """One frame as the `websockets` library reads it (`mask`: sent by a client)."""
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=mask, max_size=None, extensions=[])
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


def test_accept_key_is_rfc6455s_example() -> None:
    # RFC 6455, section 1.3.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("size", [0, 5, 125, 126, 4000, 65535, 65536, 70000])
def test_client_frames_parse_as_websockets_reads_them(size: int) -> None:
    payload = np.random.default_rng(size).bytes(size)
    frame = parse(client_frame(0x2, payload, b"\x01\x02\xfe\xff"), mask=True)
    assert frame.opcode is Opcode.BINARY and frame.fin
    assert frame.data == payload


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        return struct.pack("!BB", b0, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", b0, 126, n) + payload
    return struct.pack("!BBQ", b0, 127, n) + payload


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True


def written_frames(transport: Transport) -> list[Frame]:
    return [parse(w, mask=True) for w in transport.written[1:]]  # [0]: the upgrade request


@pytest.mark.parametrize("seed", range(4))
def test_stream_reads_a_server_in_any_split(seed: int) -> None:
    """A whole stream: upgrade, a fragmented `started`, outputs of every
    length encoding, a ping, `ended` and the close, fed in random pieces.
    Every chunk is sent, each answered chunk is timed once, the ping is
    answered and so is the close."""
    rng = np.random.default_rng(seed)
    rate, chunk = 16000, 2560
    audio = np.zeros((8 * chunk, 1), np.float32)
    plan = Plan(audio, rate, chunk, INFO, server_chunk_blocks=4, fast=True)

    async def main() -> tuple[tuple[list[float], float | None, str | None, int], Transport]:
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        stream = LeanStream(plan, b"GET / HTTP/1.1\r\n\r\n", key, 0.0, math.inf)
        transport = Transport()
        stream.connection_made(transport)
        started = {"type": "started", "output_shape": [80], "stream_id": "s"}
        text = json.dumps(started).encode()
        script = (
            f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n\r\n".encode()
            + server_frame(0x1, text[:10], fin=False)
            + server_frame(0x0, text[10:])
        )
        # 8 chunks of 2560 samples: 16 output frames each (320 bytes), 126
        # in all after the latency of 2. Outputs in sizes that use each
        # length encoding, not aligned to frames: 74,480 bytes, 232 frames.
        for size in (100, 4380, 70000):
            script += server_frame(0x2, bytes(size))
        script += server_frame(0x9, b"hi")
        script += server_frame(0x1, b'{"type": "ended", "frames_in": 1, "frames_out": 1}')
        script += server_frame(0x8, struct.pack("!H", 1000))
        cuts = np.sort(rng.choice(np.arange(1, len(script)), 12, replace=False))
        for piece in np.split(np.frombuffer(script, np.uint8), cuts):
            stream.data_received(piece.tobytes())
        result = await stream.done
        stream.connection_lost(None)
        return result, transport

    (latencies, first, error, in_window), transport = asyncio.run(main())
    assert error is None
    assert first is not None
    # Every chunk whose outputs exist (all 8: the last brings 128 - 2 frames).
    assert len(latencies) == sum(1 for n in plan.needed if n > 0) == 8
    assert in_window == len(audio)
    sent = written_frames(transport)
    binary = [f for f in sent if f.opcode is Opcode.BINARY]
    assert b"".join(f.data for f in binary) == audio.astype("<f4").tobytes()
    rest = [(f.opcode, f.data) for f in sent if f.opcode is not Opcode.BINARY]
    assert rest == [
        (Opcode.TEXT, b'{"type": "end"}'),
        (Opcode.PONG, b"hi"),
        (Opcode.CLOSE, struct.pack("!H", 1000)),
    ]


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n", "InvalidStatus"),
        (b"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: x\r\n\r\n", "InvalidHandshake"),
    ],
)
def test_refused_upgrade_ends_the_stream(reply: bytes, error: str) -> None:
    plan = Plan(np.zeros((2560, 1), np.float32), 16000, 2560, INFO, 4, fast=True)

    async def main() -> tuple[str | None, Transport]:
        stream = LeanStream(plan, b"GET / HTTP/1.1\r\n\r\n", "a2V5", 0.0, math.inf)
        transport = Transport()
        stream.connection_made(transport)
        stream.data_received(reply)
        return (await stream.done)[2], transport

    got, transport = asyncio.run(main())
    assert got == error
    assert transport.closed and len(transport.written) == 1  # nothing sent past the request


def test_server_error_stops_sending() -> None:
    """A refusal (`error`, then the close) ends the stream with its code, and
    no chunk is sent after it."""
    plan = Plan(np.zeros((4 * 2560, 1), np.float32), 16000, 2560, INFO, 4, fast=False)

    async def main() -> tuple[str | None, Transport]:
        key = "a2V5"
        loop = asyncio.get_running_loop()
        stream = LeanStream(plan, b"GET / HTTP/1.1\r\n\r\n", key, loop.time(), math.inf)
        transport = Transport()
        stream.connection_made(transport)
        stream.data_received(
            f"HTTP/1.1 101 OK\r\nSec-WebSocket-Accept: {accept_key(key)}\r\n\r\n".encode()
            + server_frame(0x1, b'{"type": "started", "output_shape": [80]}')
            + server_frame(0x1, b'{"type": "error", "code": "RESOURCE_EXHAUSTED", "message": "x"}')
        )
        error = (await stream.done)[2]
        await asyncio.sleep(0.4)  # past the next chunks' due times
        return error, transport

    error, transport = asyncio.run(main())
    assert error == "RESOURCE_EXHAUSTED"
    assert [f.opcode for f in written_frames(transport)] == [Opcode.BINARY]  # chunk 0 only
