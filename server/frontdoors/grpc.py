"""The gRPC front door: `sequence_layers.serving.v1.StreamingInference` on
`grpc.aio`, plus the standard health service and server reflection.

A thin adapter over `Runtime`: each bidi `Stream` call is an async generator
that opens a session on its first (config) message, feeds chunks from a reader
task, and yields the session's outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import streaming_pb2 as pb
from protos import streaming_pb2_grpc as pb_grpc
from server.errors import InvalidArgument, StreamError, Unauthenticated
from server.runtime import Runtime
from server.segments import SpeechEvent
from server.session import Ended, Output, Session
from server.stats import ChunkStats, ErrorStats
from server.wire import (
    array_to_tensor,
    grpc_status,
    model_info_to_proto,
    segment_options_from_proto,
    tensor_to_array,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["StreamingInference"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Keepalive that holds long, quiet streams through proxies and NAT, and lets
# clients ping while a stream waits for audio.
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]
_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class StreamingService(pb_grpc.StreamingInferenceServicer):
    """Implements the pinned service over a `Runtime`."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if isinstance(request, Malformed):
            await self._abort(context, InvalidArgument(request.error), "")
        return pb.ListModelsResponse(
            models=[model_info_to_proto(info) for info in self.runtime.list_models()]
        )

    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            if isinstance(request, Malformed):
                raise InvalidArgument(request.error)
            return model_info_to_proto(self.runtime.get_model(request.name))
        except StreamError as e:
            await self._abort(context, e, getattr(request, "name", ""))
            raise  # unreachable: abort raises

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamResponse]:
        session: Session | None = None
        reader: asyncio.Task[None] | None = None
        started = time.monotonic()
        model = ""
        try:
            try:
                first = await anext(aiter(request_iterator))
            except StopAsyncIteration:
                return
            if isinstance(first, Malformed):
                raise InvalidArgument(first.error)
            if first.WhichOneof("request") != "config":
                raise InvalidArgument(
                    "the first message of a stream must be `config` (StreamConfig with the "
                    "model name); send chunks after it."
                )
            stream_id = first.config.stream_id if first.config.HasField("stream_id") else None
            model = first.config.model
            session = self.runtime.open_stream(model, stream_id)
            if first.config.HasField("speech_segments"):
                session.request_segments(segment_options_from_proto(first.config.speech_segments))
            yield pb.StreamResponse(
                started=pb.StreamStarted(
                    model=model_info_to_proto(session.info), stream_id=session.stream_id
                )
            )
            reader = asyncio.create_task(self._read(request_iterator, session))
            async for item in session.outputs():
                if isinstance(item, Output):
                    yield pb.StreamResponse(
                        output=pb.StreamOutput(
                            tensor=array_to_tensor(item.frames), offset=item.offset
                        )
                    )
                    # Resumes once grpc has taken the message: it is written.
                    self.runtime.record(
                        ChunkStats(
                            model,
                            "grpc",
                            time.monotonic() - item.received_at,
                            item.frames.shape[0],
                        )
                    )
                elif isinstance(item, SpeechEvent):
                    if item.kind == "speech_started":
                        yield pb.StreamResponse(speech_started=pb.SpeechStarted(sample=item.sample))
                    else:
                        yield pb.StreamResponse(speech_stopped=pb.SpeechStopped(sample=item.sample))
                elif isinstance(item, Ended):
                    yield pb.StreamResponse(
                        ended=pb.StreamEnded(
                            frames_in=item.frames_in,
                            frames_out=item.frames_out,
                            ticks=item.ticks,
                            duration_seconds=time.monotonic() - started,
                        )
                    )
        except StreamError as e:
            await self._abort(context, e, model)
        finally:
            if reader is not None:
                reader.cancel()
            if session is not None:
                session.cancel()  # no-op once ended; frees the slot if the client left

    async def _read(self, requests: AsyncIterator[pb.StreamRequest], session: Session) -> None:
        max_bytes = MAX_MESSAGE_BYTES
        try:
            async for request in requests:
                if isinstance(request, Malformed):
                    raise InvalidArgument(request.error)
                kind = request.WhichOneof("request")
                if kind == "chunk":
                    session.send(tensor_to_array(request.chunk, max_bytes))
                elif kind == "end":
                    session.end()
                    return
                elif kind == "config":
                    raise InvalidArgument("a second `config` message; a stream has exactly one.")
                else:
                    raise InvalidArgument("empty StreamRequest; set config, chunk or end.")
            session.end()  # half-close equals end
        except StreamError as e:
            session.fail(e)
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away mid-read
            session.cancel()

    async def _abort(
        self, context: grpc.aio.ServicerContext, error: StreamError, model: str
    ) -> None:
        self.runtime.record(ErrorStats(model, error.code, "grpc"))
        await context.abort(grpc_status(error), error.message)


class Malformed:
    """A request whose bytes did not parse; the servicer answers INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(message_type: Any) -> Callable[[bytes], Any]:
    # grpc's own deserializer failure becomes INTERNAL, which is not a code
    # clients can act on; parse here and let the servicer refuse it.
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as e:
            return Malformed(f"malformed {message_type.DESCRIPTOR.name}: {e}")

    return parse


def _service_handler(service: StreamingService) -> grpc.GenericRpcHandler:
    serialize = lambda m: m.SerializeToString()
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Stream": grpc.stream_stream_rpc_method_handler(
                service.Stream, _tolerant(pb.StreamRequest), serialize
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                service.ListModels, _tolerant(pb.ListModelsRequest), serialize
            ),
            "GetModel": grpc.unary_unary_rpc_method_handler(
                service.GetModel, _tolerant(pb.GetModelRequest), serialize
            ),
        },
    )


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer KEY` on every method but health and reflection."""

    def __init__(self, api_keys: list[str], runtime: Runtime) -> None:
        self._keys = [k.encode() for k in api_keys]
        self._runtime = runtime

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHODS):
            return handler
        metadata = dict(details.invocation_metadata or ())
        if self._authorized(metadata.get("authorization", "")):
            return handler
        error = Unauthenticated(
            "missing or wrong API key: send metadata `authorization: Bearer <key>`."
        )
        self._runtime.record(ErrorStats("", error.code, "grpc"))

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.message)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if hasattr(request, "__aiter__"):
                # Aborting before the client's first message races its request
                # stream in grpc-core (the client sees INTERNAL); read one first.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(anext(aiter(request)), timeout=5)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, error.message)
            yield  # pragma: no cover - makes this an async generator

        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)

    def _authorized(self, header: str | bytes) -> bool:
        value = header.encode() if isinstance(header, str) else header
        if not value.startswith(b"Bearer "):
            return False
        token = value[len(b"Bearer ") :].strip()
        return any(hmac.compare_digest(token, key) for key in self._keys)


class GrpcServer:
    """Owns the `grpc.aio` server: service, health, reflection, auth, TLS."""

    def __init__(
        self,
        runtime: Runtime,
        host: str,
        port: int,
        api_keys: list[str] | None = None,
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        interceptors = [ApiKeyInterceptor(api_keys, runtime)] if api_keys else []
        self.server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        self.server.add_generic_rpc_handlers((_service_handler(StreamingService(runtime)),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        address = f"{host}:{port}"
        if tls:
            key, cert = tls
            self.port = self.server.add_secure_port(
                address, grpc.ssl_server_credentials([(key, cert)])
            )
        else:
            self.port = self.server.add_insecure_port(address)

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self, serving: bool, models: list[str] | None = None) -> None:
        """The overall status ("" and the service name), and each model's in
        `models`: a Health check with `service` = a model's name reports
        that model, which serves before the others have compiled."""
        await self.set_model_serving(["", SERVICE_NAME, *(models or [])], serving)

    async def set_model_serving(self, names: list[str], serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in names:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)
