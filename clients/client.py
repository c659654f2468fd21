"""Python clients for sequence-layers-serving, over gRPC or WebSocket.

Both return numpy arrays and raise `StreamingError` subclasses carrying the
server's status code. Asyncio and blocking flavours:

    from clients import connect
    client = connect("grpc://127.0.0.1:50051")           # or ws://127.0.0.1:8080
    y = client.infer("logmel", samples)                 # all output frames, [n, 80]

    async with aconnect("ws://127.0.0.1:8080") as client:
        async for event in client.stream("logmel", chunks):
            ...                                         # Started, Output, Ended

Streams follow a server's hand-off (`moved`, when it drains) on their own:
they reopen on the same URL (a load balancer) or the next of a list
(`aconnect(["grpc://a:50051", "grpc://b:50051"])`), resume from the token
and resend the input the server had not received, with no gap and no
duplicate output (clients/resume.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import queue
import ssl
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import grpc
import numpy as np
import websockets

from clients.events import Chunks as Chunks
from clients.events import DeadlineExceededError as DeadlineExceededError
from clients.events import Ended as Ended
from clients.events import Event as Event
from clients.events import FailedPreconditionError as FailedPreconditionError
from clients.events import InvalidArgumentError as InvalidArgumentError
from clients.events import Moved as Moved
from clients.events import MovedMessage
from clients.events import NotFoundError as NotFoundError
from clients.events import Output as Output
from clients.events import PermissionDeniedError as PermissionDeniedError
from clients.events import ResourceExhaustedError as ResourceExhaustedError
from clients.events import Speech as Speech
from clients.events import Started as Started
from clients.events import StreamingError as StreamingError
from clients.events import UnauthenticatedError as UnauthenticatedError
from clients.events import UnavailableError as UnavailableError
from clients.events import error_for as error_for
from clients.resume import Connection, ResumeOptions, follow_moves
from protos import streaming_pb2 as pb
from protos import streaming_pb2_grpc as pb_grpc

_CLOSE = object()  # ends the request iterator / the response stream


def chunked(x: np.ndarray, frames: int) -> list[np.ndarray]:
    """Splits `[n, *c]` into chunks of `frames` frames."""
    return [x[i : i + frames] for i in range(0, max(len(x), 1), frames) if len(x[i : i + frames])]


async def collect(events: AsyncIterator[Any]) -> tuple[np.ndarray | None, Ended | None]:
    """Concatenates Output frames (checking offsets are contiguous)."""
    frames: list[np.ndarray] = []
    received = 0
    ended = None
    async for event in events:
        if isinstance(event, Output):
            if event.offset != received:
                raise StreamingError(f"output offset {event.offset}, expected {received}")
            received += event.frames.shape[0]
            frames.append(event.frames)
        elif isinstance(event, Ended):
            ended = event
    return (np.concatenate(frames) if frames else None), ended


def _model_info_dict(info: pb.ModelInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "description": info.description,
        "input_shape": list(info.input_shape),
        "input_dtype": pb.DType.Name(info.input_dtype).lower(),
        "output_shape": list(info.output_shape),
        "sample_rate": info.sample_rate,
        "block_size": info.block_size,
        "output_ratio": {
            "numerator": info.output_ratio.numerator,
            "denominator": info.output_ratio.denominator,
        },
        "input_latency": info.input_latency,
        "output_latency": info.output_latency,
        "max_streams": info.max_streams,
        "speech_segments": info.speech_segments,
    }


class _GrpcStream:
    """One `Stream` call, on grpc's synchronous API in a thread: its asyncio
    API reports INTERNAL instead of the server's status when the server ends
    a stream while the client is still writing (grpc/grpc#36066), and a
    client must see RESOURCE_EXHAUSTED or UNAUTHENTICATED to act on them."""

    def __init__(self, stub: Any, metadata: Any, config: pb.StreamConfig) -> None:
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._requests: queue.Queue[Any] = queue.Queue(maxsize=32)
        self._call: Any = None
        self._closed = False
        self._stub, self._metadata, self._config = stub, metadata, config
        self._thread: threading.Thread | None = None

    def _request_iterator(self) -> Iterator[pb.StreamRequest]:
        yield pb.StreamRequest(config=self._config)
        while (item := self._requests.get()) is not _CLOSE:
            yield item

    def _post(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:
            pass  # the event loop closed: nobody is listening any more

    def _run(self) -> None:
        try:
            self._call = self._stub.Stream(self._request_iterator(), metadata=self._metadata)
            if self._closed:
                self._call.cancel()
            for resp in self._call:
                self._post(resp)
            self._post(_CLOSE)
        except grpc.RpcError as e:
            # Also the cancel of a stream its owner abandoned, possibly after
            # its loop closed: `_post` drops it then.
            self._post(e)

    async def _next(self) -> Any:
        resp = await self._events.get()
        if isinstance(resp, grpc.RpcError):
            raise error_for(resp.code().name, resp.details() or "") from None
        return resp

    async def open(self) -> Started:
        self._thread = threading.Thread(target=self._run, name="grpc-stream", daemon=True)
        self._thread.start()
        resp = await self._next()
        if resp is _CLOSE:
            raise UnavailableError("the server closed the stream before `started`.")
        if resp.WhichOneof("response") != "started":
            raise StreamingError(f"expected `started`, got {resp.WhichOneof('response')}")
        return Started(resp.started.stream_id, _model_info_dict(resp.started.model))

    async def _put(self, item: Any) -> None:
        await self._loop.run_in_executor(None, self._requests.put, item)

    async def send(self, chunk: np.ndarray) -> None:
        await self._put(pb.StreamRequest(chunk=encode_tensor(chunk)))

    async def end(self) -> None:
        await self._put(pb.StreamRequest(end=pb.EndOfStream()))
        await self._put(_CLOSE)

    async def events(self) -> AsyncIterator[Output | Speech | Ended | MovedMessage]:
        while (resp := await self._next()) is not _CLOSE:
            kind = resp.WhichOneof("response")
            if kind == "output":
                yield Output(decode_tensor(resp.output.tensor), resp.output.offset)
            elif kind in ("speech_started", "speech_stopped"):
                yield Speech(kind, getattr(resp, kind).sample)
            elif kind == "moved":
                yield MovedMessage(resp.moved.resume_token, resp.moved.frames_received)
            elif kind == "ended":
                e = resp.ended
                totals = {"ticks": e.ticks, "duration_seconds": e.duration_seconds}
                yield Ended(e.frames_in, e.frames_out, totals)

    async def close(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
        # Unblocks a sender stuck on a full queue, and ends the request iterator.
        with contextlib.suppress(queue.Empty):
            while True:
                self._requests.get_nowait()
        with contextlib.suppress(queue.Full):
            self._requests.put_nowait(_CLOSE)


class AsyncGrpcClient:
    """asyncio gRPC client. `target` is HOST:PORT, or a list of them: a
    moved stream resumes on the next (one target: the same, e.g. a load
    balancer)."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        secure: bool = False,
        resume: ResumeOptions | None = None,
    ) -> None:
        """`secure` (or `root_certificates`) uses TLS; without root
        certificates the system's trusted roots verify the server."""
        self.targets = [target] if isinstance(target, str) else list(target)
        if not self.targets:
            raise ValueError("give at least one target HOST:PORT.")
        self._options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        self._creds = (
            grpc.ssl_channel_credentials(root_certificates)
            if secure or root_certificates is not None
            else None
        )
        self._channel = self._aio_channel(self.targets[0])
        self._stub = pb_grpc.StreamingInferenceStub(self._channel)
        # Synchronous channels for streams (see `_GrpcStream`), one per target.
        self._sync_channels: dict[str, grpc.Channel] = {}
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.resume = resume or ResumeOptions()

    def _aio_channel(self, target: str) -> grpc.aio.Channel:
        if self._creds is not None:
            return grpc.aio.secure_channel(target, self._creds, options=self._options)
        return grpc.aio.insecure_channel(target, options=self._options)

    def _sync_stub(self, target: str) -> pb_grpc.StreamingInferenceStub:
        if target not in self._sync_channels:
            self._sync_channels[target] = (
                grpc.secure_channel(target, self._creds, options=self._options)
                if self._creds is not None
                else grpc.insecure_channel(target, options=self._options)
            )
        return pb_grpc.StreamingInferenceStub(self._sync_channels[target])

    async def close(self) -> None:
        await self._channel.close()
        for channel in self._sync_channels.values():
            channel.close()

    async def __aenter__(self) -> AsyncGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def list_models(self) -> list[dict[str, Any]]:
        try:
            resp = await self._stub.ListModels(pb.ListModelsRequest(), metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise error_for(e.code().name, e.details() or "") from None
        return [_model_info_dict(m) for m in resp.models]

    async def get_model(self, name: str) -> dict[str, Any]:
        try:
            info = await self._stub.GetModel(pb.GetModelRequest(name=name), metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            raise error_for(e.code().name, e.details() or "") from None
        return _model_info_dict(info)

    def stream(
        self,
        model: str,
        chunks: Chunks,
        *,
        stream_id: str | None = None,
        speech_segments: dict[str, Any] | None = None,
        report_moves: bool = False,
    ) -> AsyncIterator[Event | Moved]:
        """Sends `chunks` (arrays `[frames, *c]`, float32 or int16) and yields
        events: `Started`, `Output`s, `Speech` (if asked), `Ended`.

        `speech_segments` (a dict of SpeechSegmentsConfig fields, `{}` for the
        defaults) asks for `Speech` events. A stream the server moves resumes
        on its own (see `clients/resume.py`); `report_moves` yields a `Moved`
        event for each.
        """
        config = pb.StreamConfig(model=model)
        if stream_id is not None:
            config.stream_id = stream_id
        if speech_segments is not None:
            config.speech_segments.CopyFrom(pb.SpeechSegmentsConfig(**speech_segments))

        def opener(index: int, token: bytes | None, offset: int) -> Connection:
            resumed = pb.StreamConfig()
            resumed.CopyFrom(config)
            if token is not None:
                resumed.resume_token = token
            stub = self._sync_stub(self.targets[index])
            return _GrpcStream(stub, self._metadata, resumed)

        return follow_moves(opener, self.targets, chunks, self.resume, report_moves)

    async def infer(self, model: str, x: np.ndarray, chunk_frames: int = 1600) -> np.ndarray:
        y, _ = await collect(self.stream(model, chunked(x, chunk_frames)))
        return y if y is not None else np.zeros((0,), np.float32)


# Tokens up to this many base64url characters go in the URL (`?resume_token=`);
# longer ones in a first text message, since proxies cap URLs at about 8 KiB.
MAX_QUERY_TOKEN_CHARS = 4096


class _WebSocketStream:
    """One WebSocket connection of a stream."""

    def __init__(self, url: str, kwargs: dict[str, Any], token: bytes | None, offset: int) -> None:
        self._url, self._kwargs, self._token = url, kwargs, token
        self._offset = offset  # binary outputs carry no offset: count them
        self._ws: Any = None
        self._shape: tuple[int, ...] = ()
        self._wire = np.dtype("<f4")

    async def open(self) -> Started:
        url, first = self._url, None
        if self._token is not None:
            text = base64.urlsafe_b64encode(self._token).decode().rstrip("=")
            if len(text) <= MAX_QUERY_TOKEN_CHARS:
                url += f"&resume_token={text}"
            else:
                url += "&resume=1"
                first = json.dumps({"type": "config", "resume_token": text})
        self._ws = await websockets.connect(url, **self._kwargs)
        if first is not None:
            await self._ws.send(first)
        started = json.loads(await self._ws.recv())
        if started.get("type") == "error":
            raise error_for(started["code"], started["message"])
        if started.get("type") != "started":
            raise StreamingError(f"expected `started`, got {str(started)[:80]}")
        self._shape = tuple(started["output_shape"])
        # A resumed stream's `started` says where its outputs continue.
        self._offset = int(started.get("output_offset", self._offset))
        return Started(started["stream_id"], started)

    async def send(self, chunk: np.ndarray) -> None:
        await self._ws.send(np.ascontiguousarray(chunk, dtype=self._wire).tobytes())

    async def end(self) -> None:
        await self._ws.send(json.dumps({"type": "end"}))

    async def events(self) -> AsyncIterator[Output | Speech | Ended | MovedMessage]:
        async for message in self._ws:
            if isinstance(message, bytes):
                frames = np.frombuffer(message, "<f4").reshape(-1, *self._shape)
                yield Output(frames.astype(np.float32), self._offset)
                self._offset += frames.shape[0]
                continue
            event = json.loads(message)
            if event["type"] == "ended":
                yield Ended(event["frames_in"], event["frames_out"], event)
                return
            if event["type"] == "error":
                raise error_for(event["code"], event["message"])
            if event["type"] in ("speech_started", "speech_stopped"):
                yield Speech(event["type"], int(event["sample"]))
            if event["type"] == "moved":
                token = _b64decode(event["resume_token"])
                yield MovedMessage(token, int(event["frames_received"]))
                return

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 2.0)
            # A close handshake cut short (timeout, cancellation) must not
            # leave the socket open.
            self._ws.transport.abort()


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not."""
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4))


class AsyncWebSocketClient:
    """asyncio WebSocket client. `base_url` is ws://HOST:PORT (or wss://), or
    a list of them: a moved stream resumes on the next (one URL: the same,
    e.g. a load balancer)."""

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None = None,
        ssl: Any = None,
        resume: ResumeOptions | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("give at least one ws:// or wss:// URL.")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.base_url = self.base_urls[0]
        self.api_key = api_key
        self.ssl = ssl
        self.resume = resume or ResumeOptions()

    async def __aenter__(self) -> AsyncWebSocketClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def close(self) -> None:
        return None

    def stream(
        self,
        model: str,
        chunks: Chunks,
        *,
        dtype: str = "float32",
        stream_id: str | None = None,
        speech_segments: dict[str, Any] | None = None,
        report_moves: bool = False,
    ) -> AsyncIterator[Event | Moved]:
        """As `AsyncGrpcClient.stream`; `dtype` is the wire dtype of the input."""
        query = f"/v1/models/{quote(model)}/stream?dtype={dtype}"
        if stream_id:
            query += f"&stream_id={quote(stream_id)}"
        if speech_segments is not None:
            query += "&speech_segments=1" + "".join(
                f"&{k}={quote(str(v))}" for k, v in speech_segments.items()
            )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        # No permessage-deflate offer: sl-serve declines it (audio and float
        # frames barely compress), and setting up the offer cost each
        # connection client CPU for nothing.
        kwargs: dict[str, Any] = {
            "additional_headers": headers,
            "max_size": 16 * 1024 * 1024,
            "compression": None,
        }
        if self.ssl is not None:
            kwargs["ssl"] = self.ssl

        def opener(index: int, token: bytes | None, offset: int) -> Connection:
            conn = _WebSocketStream(self.base_urls[index] + query, kwargs, token, offset)
            conn._wire = np.dtype("<f4") if dtype == "float32" else np.dtype("<i2")
            return conn

        return follow_moves(opener, self.base_urls, chunks, self.resume, report_moves)

    async def infer(
        self, model: str, x: np.ndarray, chunk_frames: int = 1600, dtype: str = "float32"
    ) -> np.ndarray:
        y, _ = await collect(self.stream(model, chunked(x, chunk_frames), dtype=dtype))
        return y if y is not None else np.zeros((0,), np.float32)

    async def list_models(self) -> list[dict[str, Any]]:
        import urllib.request

        http = self.base_url.replace("ws://", "http://").replace("wss://", "https://")
        req = urllib.request.Request(f"{http}/v1/models")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        loop = asyncio.get_running_loop()
        body = await loop.run_in_executor(
            None, lambda: urllib.request.urlopen(req, context=self.ssl).read()
        )
        return json.loads(body)["models"]


def encode_tensor(chunk: np.ndarray) -> pb.Tensor:
    chunk = np.asarray(chunk)
    if chunk.dtype == np.int16:
        return pb.Tensor(
            shape=list(chunk.shape), dtype=pb.INT16, data=chunk.astype("<i2").tobytes()
        )
    data = np.ascontiguousarray(chunk, dtype="<f4")
    return pb.Tensor(shape=list(data.shape), dtype=pb.FLOAT32, data=data.tobytes())


def decode_tensor(tensor: pb.Tensor) -> np.ndarray:
    dtype = {pb.FLOAT32: "<f4", pb.INT16: "<i2", pb.INT32: "<i4"}[tensor.dtype]
    return np.frombuffer(tensor.data, dtype).reshape(list(tensor.shape)).astype(np.float32)


def aconnect(
    url: str | Sequence[str],
    *,
    api_key: str | None = None,
    ca_cert: str | None = None,
    resume: ResumeOptions | None = None,
) -> AsyncGrpcClient | AsyncWebSocketClient:
    """`grpc://HOST:PORT`, `grpcs://HOST:PORT` (TLS), `ws://HOST:PORT` or
    `wss://HOST:PORT`, or a list of such URLs of one scheme: replicas a
    moved stream resumes on, in turn. `ca_cert` is a PEM file to trust (e.g.
    a self-signed server certificate) instead of the system's roots."""
    urls = [url] if isinstance(url, str) else list(url)
    parsed = [urlparse(u) for u in urls]
    schemes = {p.scheme for p in parsed}
    if not urls or len(schemes) != 1:
        raise ValueError(f"give one or more URLs of one scheme, got {urls!r}.")
    scheme = schemes.pop()
    if scheme in ("grpc", "grpcs"):
        roots = Path(ca_cert).read_bytes() if ca_cert else None
        return AsyncGrpcClient(
            [p.netloc for p in parsed],
            api_key=api_key,
            root_certificates=roots,
            secure=scheme == "grpcs",
            resume=resume,
        )
    if scheme in ("ws", "wss"):
        context = ssl.create_default_context(cafile=ca_cert) if scheme == "wss" else None
        return AsyncWebSocketClient(urls, api_key=api_key, ssl=context, resume=resume)
    raise ValueError(
        f"unsupported URL {urls[0]!r}: use grpc://, grpcs://, ws:// or wss:// followed by "
        "HOST:PORT."
    )


class Client:
    """Blocking wrapper around the asyncio clients (runs its own event loop).
    `url` as in `aconnect`: one URL or a list of replicas."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str | None = None,
        resume: ResumeOptions | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._url, self._api_key, self._resume = url, api_key, resume
        self._client = self._loop.run_until_complete(self._make())

    async def _make(self) -> AsyncGrpcClient | AsyncWebSocketClient:
        return aconnect(self._url, api_key=self._api_key, resume=self._resume)

    def infer(self, model: str, x: np.ndarray, chunk_frames: int = 1600) -> np.ndarray:
        return self._loop.run_until_complete(self._client.infer(model, x, chunk_frames))

    def stream(
        self, model: str, chunks: Iterable[np.ndarray], **kwargs: Any
    ) -> list[Event | Moved]:
        """All events of one stream (keyword arguments as the asyncio
        client's `stream`, e.g. `report_moves=True`)."""

        async def run() -> list[Event | Moved]:
            return [e async for e in self._client.stream(model, list(chunks), **kwargs)]

        return self._loop.run_until_complete(run())

    def list_models(self) -> list[dict[str, Any]]:
        return self._loop.run_until_complete(self._client.list_models())

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    url: str | Sequence[str], *, api_key: str | None = None, resume: ResumeOptions | None = None
) -> Client:
    return Client(url, api_key=api_key, resume=resume)


def frames_for_ms(info: dict[str, Any], ms: float) -> int:
    rate = info.get("sample_rate") or 100
    return max(1, math.ceil(rate * ms / 1000))
