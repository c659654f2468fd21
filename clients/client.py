"""Python clients for sequence-layers-serving, over gRPC or WebSocket.

Both return numpy arrays and raise `StreamingError` subclasses carrying the
server's status code. Asyncio and blocking flavours:

    from clients import connect
    client = connect("grpc://127.0.0.1:50051")           # or ws://127.0.0.1:8080
    y = client.infer("logmel", samples)                 # all output frames, [n, 80]

    async with aconnect("ws://127.0.0.1:8080") as client:
        async for event in client.stream("logmel", chunks):
            ...                                         # Started, Output, Ended
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import queue
import ssl
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import grpc
import numpy as np
import websockets

from protos import streaming_pb2 as pb
from protos import streaming_pb2_grpc as pb_grpc


class StreamingError(Exception):
    """An error the server returned; `code` is a gRPC status code name."""

    code = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(f"{code or self.code}: {message}")
        self.message = message
        if code:
            self.code = code


class InvalidArgumentError(StreamingError):
    code = "INVALID_ARGUMENT"


class NotFoundError(StreamingError):
    code = "NOT_FOUND"


class ResourceExhaustedError(StreamingError):
    code = "RESOURCE_EXHAUSTED"


class UnauthenticatedError(StreamingError):
    code = "UNAUTHENTICATED"


class DeadlineExceededError(StreamingError):
    code = "DEADLINE_EXCEEDED"


class UnavailableError(StreamingError):
    code = "UNAVAILABLE"


_ERRORS = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        UnauthenticatedError,
        DeadlineExceededError,
        UnavailableError,
    )
}


def error_for(code: str, message: str) -> StreamingError:
    cls = _ERRORS.get(code, StreamingError)
    return cls(message, code)


@dataclasses.dataclass(frozen=True)
class Started:
    stream_id: str
    model: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Output:
    frames: np.ndarray
    offset: int


@dataclasses.dataclass(frozen=True)
class Ended:
    frames_in: int
    frames_out: int
    totals: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Speech:
    """A speech segment event (streams that asked for `speech_segments`):
    `kind` is "speech_started" or "speech_stopped", `sample` the input
    sample from the stream's start."""

    kind: str
    sample: int


Event = Started | Output | Speech | Ended
_CLOSE = object()  # ends the request iterator / the response stream
Chunks = Iterable[np.ndarray] | AsyncIterable[np.ndarray]


def chunked(x: np.ndarray, frames: int) -> list[np.ndarray]:
    """Splits `[n, *c]` into chunks of `frames` frames."""
    return [x[i : i + frames] for i in range(0, max(len(x), 1), frames) if len(x[i : i + frames])]


async def _aiter(chunks: Chunks) -> AsyncIterator[np.ndarray]:
    if isinstance(chunks, AsyncIterable):
        async for c in chunks:
            yield c
    else:
        for c in chunks:
            yield c


async def collect(events: AsyncIterator[Event]) -> tuple[np.ndarray | None, Ended | None]:
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


class AsyncGrpcClient:
    """asyncio gRPC client. `target` is HOST:PORT."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        secure: bool = False,
    ) -> None:
        """`secure` (or `root_certificates`) uses TLS; without root
        certificates the system's trusted roots verify the server."""
        options = [("grpc.max_receive_message_length", 16 * 1024 * 1024)]
        if secure or root_certificates is not None:
            creds = grpc.ssl_channel_credentials(root_certificates)
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
            self._sync_channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
            self._sync_channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.StreamingInferenceStub(self._channel)
        self._sync_stub = pb_grpc.StreamingInferenceStub(self._sync_channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def close(self) -> None:
        await self._channel.close()
        self._sync_channel.close()

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

    async def stream(
        self,
        model: str,
        chunks: Chunks,
        *,
        stream_id: str | None = None,
        speech_segments: dict[str, Any] | None = None,
    ) -> AsyncIterator[Event]:
        """Sends `chunks` (arrays `[frames, *c]`, float32 or int16) and yields events.

        `speech_segments` (a dict of SpeechSegmentsConfig fields, `{}` for the
        defaults) asks for `Speech` events.

        The call runs on grpc's synchronous API in a thread: its asyncio API
        reports INTERNAL instead of the server's status when the server ends a
        stream while the client is still writing (grpc/grpc#36066), and a
        client must see RESOURCE_EXHAUSTED or UNAUTHENTICATED to act on them.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        requests: queue.Queue[Any] = queue.Queue(maxsize=32)
        config = pb.StreamConfig(model=model)
        if stream_id is not None:
            config.stream_id = stream_id
        if speech_segments is not None:
            config.speech_segments.CopyFrom(pb.SpeechSegmentsConfig(**speech_segments))
        holder: dict[str, Any] = {}

        def request_iterator() -> Iterator[pb.StreamRequest]:
            yield pb.StreamRequest(config=config)
            while (item := requests.get()) is not _CLOSE:
                yield item

        def run() -> None:
            try:
                call = self._sync_stub.Stream(request_iterator(), metadata=self._metadata)
                holder["call"] = call
                for resp in call:
                    loop.call_soon_threadsafe(events.put_nowait, resp)
                loop.call_soon_threadsafe(events.put_nowait, _CLOSE)
            except grpc.RpcError as e:
                loop.call_soon_threadsafe(events.put_nowait, e)

        async def feed() -> None:
            async for chunk in _aiter(chunks):
                request = pb.StreamRequest(chunk=encode_tensor(chunk))
                await loop.run_in_executor(None, requests.put, request)
            await loop.run_in_executor(None, requests.put, pb.StreamRequest(end=pb.EndOfStream()))
            await loop.run_in_executor(None, requests.put, _CLOSE)

        thread = threading.Thread(target=run, name="grpc-stream", daemon=True)
        thread.start()
        feeder = asyncio.create_task(feed())
        try:
            while True:
                resp = await events.get()
                if resp is _CLOSE:
                    return
                if isinstance(resp, grpc.RpcError):
                    raise error_for(resp.code().name, resp.details() or "") from None
                kind = resp.WhichOneof("response")
                if kind == "started":
                    yield Started(resp.started.stream_id, _model_info_dict(resp.started.model))
                elif kind == "output":
                    yield Output(decode_tensor(resp.output.tensor), resp.output.offset)
                elif kind in ("speech_started", "speech_stopped"):
                    yield Speech(kind, getattr(resp, kind).sample)
                elif kind == "ended":
                    e = resp.ended
                    yield Ended(
                        e.frames_in,
                        e.frames_out,
                        {"ticks": e.ticks, "duration_seconds": e.duration_seconds},
                    )
        finally:
            feeder.cancel()
            if "call" in holder:
                holder["call"].cancel()
            with contextlib.suppress(queue.Full):
                requests.put_nowait(_CLOSE)

    async def infer(self, model: str, x: np.ndarray, chunk_frames: int = 1600) -> np.ndarray:
        y, _ = await collect(self.stream(model, chunked(x, chunk_frames)))
        return y if y is not None else np.zeros((0,), np.float32)


class AsyncWebSocketClient:
    """asyncio WebSocket client. `base_url` is ws://HOST:PORT (or wss://)."""

    def __init__(self, base_url: str, *, api_key: str | None = None, ssl: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.ssl = ssl

    async def __aenter__(self) -> AsyncWebSocketClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(
        self,
        model: str,
        chunks: Chunks,
        *,
        dtype: str = "float32",
        stream_id: str | None = None,
        speech_segments: dict[str, Any] | None = None,
    ) -> AsyncIterator[Event]:
        url = f"{self.base_url}/v1/models/{quote(model)}/stream?dtype={dtype}"
        if stream_id:
            url += f"&stream_id={quote(stream_id)}"
        if speech_segments is not None:
            url += "&speech_segments=1" + "".join(
                f"&{k}={quote(str(v))}" for k, v in speech_segments.items()
            )
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        wire = np.dtype("<f4") if dtype == "float32" else np.dtype("<i2")
        kwargs: dict[str, Any] = {"additional_headers": headers, "max_size": 16 * 1024 * 1024}
        if self.ssl is not None:
            kwargs["ssl"] = self.ssl
        async with websockets.connect(url, **kwargs) as ws:
            started = json.loads(await ws.recv())
            if started.get("type") == "error":
                raise error_for(started["code"], started["message"])
            shape = tuple(started["output_shape"])
            yield Started(started["stream_id"], started)

            async def send_all() -> None:
                async for chunk in _aiter(chunks):
                    await ws.send(np.ascontiguousarray(chunk, dtype=wire).tobytes())
                await ws.send(json.dumps({"type": "end"}))

            sender = asyncio.create_task(send_all())
            offset = 0
            try:
                async for message in ws:
                    if isinstance(message, bytes):
                        frames = np.frombuffer(message, "<f4").reshape(-1, *shape)
                        yield Output(frames.astype(np.float32), offset)
                        offset += frames.shape[0]
                        continue
                    event = json.loads(message)
                    if event["type"] == "ended":
                        yield Ended(event["frames_in"], event["frames_out"], event)
                        return
                    if event["type"] == "error":
                        raise error_for(event["code"], event["message"])
                    if event["type"] in ("speech_started", "speech_stopped"):
                        yield Speech(event["type"], int(event["sample"]))
            finally:
                sender.cancel()
                if sender.done() and not sender.cancelled() and sender.exception():
                    pass  # the server's error message explains the failure

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
    url: str, *, api_key: str | None = None, ca_cert: str | None = None
) -> AsyncGrpcClient | AsyncWebSocketClient:
    """`grpc://HOST:PORT`, `grpcs://HOST:PORT` (TLS), `ws://HOST:PORT` or
    `wss://HOST:PORT`. `ca_cert` is a PEM file to trust (e.g. a self-signed
    server certificate) instead of the system's roots."""
    parsed = urlparse(url)
    if parsed.scheme in ("grpc", "grpcs"):
        roots = Path(ca_cert).read_bytes() if ca_cert else None
        return AsyncGrpcClient(
            parsed.netloc, api_key=api_key, root_certificates=roots, secure=parsed.scheme == "grpcs"
        )
    if parsed.scheme in ("ws", "wss"):
        context = ssl.create_default_context(cafile=ca_cert) if parsed.scheme == "wss" else None
        return AsyncWebSocketClient(url, api_key=api_key, ssl=context)
    raise ValueError(
        f"unsupported URL {url!r}: use grpc://, grpcs://, ws:// or wss:// followed by HOST:PORT."
    )


class Client:
    """Blocking wrapper around the asyncio clients (runs its own event loop)."""

    def __init__(self, url: str, *, api_key: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._url, self._api_key = url, api_key
        self._client = self._loop.run_until_complete(self._make())

    async def _make(self) -> AsyncGrpcClient | AsyncWebSocketClient:
        return aconnect(self._url, api_key=self._api_key)

    def infer(self, model: str, x: np.ndarray, chunk_frames: int = 1600) -> np.ndarray:
        return self._loop.run_until_complete(self._client.infer(model, x, chunk_frames))

    def stream(self, model: str, chunks: Iterable[np.ndarray]) -> list[Event]:
        async def run() -> list[Event]:
            return [e async for e in self._client.stream(model, list(chunks))]

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


def connect(url: str, *, api_key: str | None = None) -> Client:
    return Client(url, api_key=api_key)


def frames_for_ms(info: dict[str, Any], ms: float) -> int:
    rate = info.get("sample_rate") or 100
    return max(1, math.ceil(rate * ms / 1000))
