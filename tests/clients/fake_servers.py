"""Fake streaming servers for client tests: a real `grpc.aio` server and a
real WebSocket server on localhost, speaking the pinned protocols, with a
tiny stateful model and real resume tokens (server/resume.py).

The model: input frames `[t, 1]`, stepped in chunks of 4 frames, raw output
`y[t] = x[t] + x[t - 1]` (state: the last frame), the first 2 raw outputs
dropped (output_latency 2), so a stream's output is `offline(x)`. Test
inputs are `x[t] = t`, so the server can check that every frame arrives
exactly once, in order, across moves.

A server made with `move_after=n` sends `moved` once a stream has received
n frames (after every output so far), at most `moves` times; `refuse` makes
it answer every stream with that status (a draining or full replica).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
import numpy as np
import websockets
from websockets.datastructures import Headers
from websockets.http11 import Response

from protos import streaming_pb2 as pb
from protos import streaming_pb2_grpc as pb_grpc
from server.resume import (
    ResumeKeys,
    ResumeTokenError,
    StreamSnapshot,
    sign_token,
    verify_token,
)

CHUNK = 4
LATENCY = 2
MODEL = "fake"
FINGERPRINT = "c0ffee" * 10
KEYS = ResumeKeys((b"k" * 40,))


def offline(x: np.ndarray) -> np.ndarray:
    """What one uninterrupted stream of `x [t, 1]` outputs."""
    prev = np.concatenate([np.zeros((1, 1), np.float32), x[:-1]])
    return (x + prev)[LATENCY:]


class FakeModelStream:
    """One stream's host state (what a real session holds) for the fake model."""

    def __init__(self, snapshot: StreamSnapshot | None = None, check: bool = True) -> None:
        self.check = check
        self.received = self.consumed = self.emitted = 0
        self.to_drop = LATENCY
        self.prev = np.float32(0)
        self.buffer = np.zeros((0, 1), np.float32)
        if snapshot is not None:
            self.received, self.consumed = snapshot.frames_received, snapshot.frames_consumed
            self.emitted, self.to_drop = snapshot.frames_emitted, snapshot.outputs_to_drop
            self.buffer = snapshot.buffered_input
            self.prev = snapshot.state[0][()]

    def push(self, x: np.ndarray) -> list[tuple[int, np.ndarray]]:
        # Every frame once, in order: x[t] = t.
        expected = np.arange(self.received, self.received + len(x), dtype=np.float32)
        if self.check and not np.array_equal(x[:, 0], expected):
            raise AssertionError(f"frames {x[:, 0].tolist()} arrived, expected {expected.tolist()}")
        self.received += len(x)
        self.buffer = np.concatenate([self.buffer, x])
        outputs = []
        while len(self.buffer) >= CHUNK:
            outputs += self._step(self.buffer[:CHUNK])
            self.buffer = self.buffer[CHUNK:]
        return outputs

    def end(self) -> list[tuple[int, np.ndarray]]:
        outputs = self._step(self.buffer) if len(self.buffer) else []
        self.buffer = self.buffer[:0]
        return outputs

    def _step(self, chunk: np.ndarray) -> list[tuple[int, np.ndarray]]:
        prev = np.concatenate([[[self.prev]], chunk[:-1]]).astype(np.float32)
        y = chunk + prev
        self.prev = chunk[-1, 0]
        self.consumed += len(chunk)
        drop = min(self.to_drop, len(y))
        self.to_drop -= drop
        y = y[drop:]
        if not len(y):
            return []
        self.emitted += len(y)
        return [(self.emitted - len(y), y)]

    def token(self) -> bytes:
        snapshot = StreamSnapshot(
            stream_id="s1",
            frames_received=self.received,
            frames_consumed=self.consumed,
            frames_emitted=self.emitted,
            ticks=0,
            outputs_to_drop=self.to_drop,
            buffered_input=self.buffer,
            state=(np.asarray(self.prev, np.float32),),
        )
        return sign_token(snapshot, KEYS, model_name=MODEL, fingerprint=FINGERPRINT)


INFO = {
    "name": MODEL,
    "description": "fake",
    "input_shape": [1],
    "input_dtype": "float32",
    "output_shape": [1],
    # A real audio rate, so the browser client can capture for it.
    "sample_rate": 16000,
    "block_size": CHUNK,
    "output_ratio": {"numerator": 1, "denominator": 1},
    "input_latency": 0,
    "output_latency": LATENCY,
    "max_streams": 8,
    "speech_segments": False,
}


@dataclasses.dataclass
class Behaviour:
    """What one fake replica does; `log` records what it saw."""

    move_after: int | None = None
    moves: int = 1
    refuse: str | None = None  # a status code name for every stream
    # Once its moves are done, refuse every stream as draining (UNAVAILABLE).
    drains: bool = False
    # Check that frames are x[t] = t (off for real audio, e.g. a browser's).
    check_values: bool = True
    keys: ResumeKeys = KEYS
    # After a resume, send the previous output again (offset < delivered):
    # the client must drop what it already has.
    repeat_last_output: bool = False
    log: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _open(behaviour: Behaviour, model: str, token: bytes | None) -> FakeModelStream:
    """Raises ResumeTokenError (a refused token) or returns the stream."""
    if token is None:
        behaviour.log.append({"opened": True})
        return FakeModelStream(check=behaviour.check_values)
    snapshot = verify_token(token, behaviour.keys, model_name=model, fingerprint=FINGERPRINT)
    behaviour.log.append({"resumed": snapshot.frames_received, "emitted": snapshot.frames_emitted})
    return FakeModelStream(snapshot, check=behaviour.check_values)


def _model_proto() -> pb.ModelInfo:
    return pb.ModelInfo(
        name=MODEL,
        input_shape=[1],
        output_shape=[1],
        block_size=CHUNK,
        output_ratio=pb.Ratio(numerator=1, denominator=1),
        output_latency=LATENCY,
        sample_rate=16000,
    )


class FakeGrpc(pb_grpc.StreamingInferenceServicer):
    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        return _model_proto()

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Any
    ) -> AsyncIterator[pb.StreamResponse]:
        b = self.b
        config = (await anext(aiter(request_iterator))).config
        if b.refuse:
            await context.abort(grpc.StatusCode[b.refuse], "fake replica refuses")
        try:
            stream = _open(b, config.model, config.resume_token or None)
        except ResumeTokenError as e:
            b.log.append({"refused": e.code})
            await context.abort(grpc.StatusCode[e.code], e.message)
        yield pb.StreamResponse(started=pb.StreamStarted(model=_model_proto(), stream_id="s1"))

        def output(offset: int, y: np.ndarray) -> pb.StreamResponse:
            tensor = pb.Tensor(
                shape=list(y.shape), dtype=pb.FLOAT32, data=y.astype("<f4").tobytes()
            )
            return pb.StreamResponse(output=pb.StreamOutput(tensor=tensor, offset=offset))

        if config.resume_token and b.repeat_last_output and stream.emitted >= 3:
            # Values are irrelevant: the client must drop frames it has.
            yield output(stream.emitted - 3, np.full((3, 1), -1.0, np.float32))
        async for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "chunk":
                x = np.frombuffer(request.chunk.data, "<f4").reshape(list(request.chunk.shape))
                for offset, y in stream.push(x.reshape(-1, 1)):
                    yield output(offset, y)
                if b.move_after is not None and b.moves and stream.received >= b.move_after:
                    b.moves -= 1
                    b.log.append({"moved": stream.received})
                    b.refuse = "UNAVAILABLE" if b.drains and not b.moves else b.refuse
                    moved = pb.StreamMoved(
                        resume_token=stream.token(), frames_received=stream.received
                    )
                    yield pb.StreamResponse(moved=moved)
                    return
            elif kind == "end":
                for offset, y in stream.end():
                    yield output(offset, y)
                ended = pb.StreamEnded(frames_in=stream.received, frames_out=stream.emitted)
                yield pb.StreamResponse(ended=ended)
                return


async def fake_ws_handler(ws: Any, b: Behaviour) -> None:
    url = urlparse(ws.request.path)
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    model = url.path.split("/")[3]
    if b.refuse:
        await ws.send(json.dumps({"type": "error", "code": b.refuse, "message": "refused"}))
        await ws.close(1013)
        return
    token = None
    if "resume_token" in query:
        text = query["resume_token"]
        token = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        b.log.append({"token_in": "query"})
    elif query.get("resume") == "1":
        first = json.loads(await ws.recv())
        assert first["type"] == "config"
        text = first["resume_token"]
        token = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        b.log.append({"token_in": "message"})
    try:
        stream = _open(b, model, token)
    except ResumeTokenError as e:
        b.log.append({"refused": e.code})
        await ws.send(json.dumps({"type": "error", "code": e.code, "message": e.message}))
        await ws.close(1008)
        return
    started = {"type": "started", **INFO, "stream_id": "s1"}
    if token is not None:
        started["output_offset"] = stream.emitted
    await ws.send(json.dumps(started))
    async for message in ws:
        if isinstance(message, bytes):
            x = np.frombuffer(message, "<f4").reshape(-1, 1)
            for _, y in stream.push(x):
                await ws.send(y.astype("<f4").tobytes())
            if b.move_after is not None and b.moves and stream.received >= b.move_after:
                b.moves -= 1
                b.log.append({"moved": stream.received})
                b.refuse = "UNAVAILABLE" if b.drains and not b.moves else b.refuse
                text = base64.b64encode(stream.token()).decode()
                moved = {"type": "moved", "resume_token": text, "frames_received": stream.received}
                await ws.send(json.dumps(moved))
                await ws.close(1001)
                return
        elif json.loads(message)["type"] == "end":
            for _, y in stream.end():
                await ws.send(y.astype("<f4").tobytes())
            ended = {"type": "ended", "frames_in": stream.received, "frames_out": stream.emitted}
            b.log.append({"ended": stream.received})
            await ws.send(json.dumps(ended))
            await ws.close(1000)
            return


WEB = Path(__file__).resolve().parents[2] / "clients" / "web"
_TYPES = {".html": "text/html", ".js": "text/javascript"}


def _http(connection: Any, request: Any) -> Any:
    """Plain HTTP on the WebSocket port, as sl-serve has: the browser client
    (`/`, `/web/...`) and the model listing."""
    path = urlparse(request.path).path
    if path.endswith("/stream"):
        return None  # a WebSocket stream
    if path == "/v1/models":
        body, kind = json.dumps({"models": [INFO]}).encode(), "application/json"
    else:
        name = "index.html" if path == "/" else path.removeprefix("/web/")
        file = WEB / name
        if "/" in name or not file.is_file():
            return connection.respond(404, "not found\n")
        body, kind = file.read_bytes(), _TYPES.get(file.suffix, "text/plain")
    headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body)))])
    return Response(200, "OK", headers, body)


class FakeReplicas:
    """Fake replicas on one background event loop: `grpc_urls[i]` and
    `ws_urls[i]` behave as `behaviours[i]`."""

    def __init__(self, behaviours: list[Behaviour]) -> None:
        self.behaviours = behaviours
        self.grpc_urls: list[str] = []
        self.ws_urls: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._closers: list[Any] = []

    def _call(self, coro: Any, timeout: float = 30.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    async def _start(self) -> None:
        for b in self.behaviours:
            server = grpc.aio.server()
            pb_grpc.add_StreamingInferenceServicer_to_server(FakeGrpc(b), server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            self.grpc_urls.append(f"grpc://127.0.0.1:{port}")
            self._closers.append(server)

            async def handler(ws: Any, b: Behaviour = b) -> None:
                await fake_ws_handler(ws, b)

            # A short close timeout: after `moved` the fake stops reading, so
            # the client's close frame waits behind input nobody reads.
            ws_server = await websockets.serve(
                handler, "127.0.0.1", 0, close_timeout=0.2, process_request=_http
            )
            ws_port = next(iter(ws_server.sockets)).getsockname()[1]
            self.ws_urls.append(f"ws://127.0.0.1:{ws_port}")
            self._closers.append(ws_server)

    def __enter__(self) -> FakeReplicas:
        self._thread.start()
        self._closers = []
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            for closer in self._closers:
                with contextlib.suppress(Exception):
                    if isinstance(closer, grpc.aio.Server):
                        await closer.stop(None)
                    else:
                        closer.close()
                        await closer.wait_closed()

        with contextlib.suppress(Exception):
            self._call(stop(), timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            # Closed here, not left to the collector: an unclosed loop warns
            # (an error under this suite's filterwarnings) in whichever test
            # happens to run when it is collected.
            self._loop.close()


@contextlib.contextmanager
def replicas(*behaviours: Behaviour) -> Iterator[FakeReplicas]:
    with FakeReplicas(list(behaviours)) as fakes:
        yield fakes
