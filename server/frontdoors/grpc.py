"""The gRPC front door: `sequence_layers.serving.v1.StreamingInference` on
`grpc.aio`, plus the standard health service and server reflection.

A thin adapter over the stream bridge (`server.frontdoors.bridge`): each bidi
`Stream` call is an async generator that opens a stream on its first (config)
message, decodes the rest of the request stream into chunks for the bridge,
and encodes the outputs the bridge yields as `StreamResponse`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import streaming_pb2 as pb
from protos import streaming_pb2_grpc as pb_grpc
from server.errors import InvalidArgument, StreamError, Unauthenticated
from server.frontdoors.auth import GRPC_HINT, ApiKeys
from server.frontdoors.bridge import END, Inbound, StreamBridge, StreamRuntime
from server.frontdoors.wire import (
    grpc_status,
    model_info_to_proto,
    output_response,
    segment_options_from_proto,
    tensor_to_array,
)
from server.runtime import Ended, Moved, Output
from server.segments import SpeechEvent

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
    """Implements the pinned service over the runtime, through a `StreamBridge`."""

    def __init__(self, runtime: StreamRuntime) -> None:
        self.runtime = runtime
        self.bridge = StreamBridge(runtime, "grpc")

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
            config = first.config
            model = config.model
            handle = await self.bridge.open(
                model,
                config.stream_id if config.HasField("stream_id") else None,
                segment_options_from_proto(config.speech_segments)
                if config.HasField("speech_segments")
                else None,
                config.resume_token or None,
            )
            try:
                yield pb.StreamResponse(
                    started=pb.StreamStarted(
                        model=model_info_to_proto(handle.info), stream_id=handle.stream_id
                    )
                )
            except BaseException:
                # The call ended before the pump took the stream over: free it
                # now, not at its idle timeout (a drain waits for its handle).
                handle.cancel()
                raise
            # aclosing: the stream is freed as soon as this call ends, however it ends.
            pump = self.bridge.pump(handle, _decode(request_iterator))
            async with contextlib.aclosing(pump) as items:
                async for item in items:
                    if isinstance(item, Output):
                        yield output_response(item.frames, item.offset)
                    elif isinstance(item, SpeechEvent):
                        if item.kind == "speech_started":
                            yield pb.StreamResponse(
                                speech_started=pb.SpeechStarted(sample=item.sample)
                            )
                        else:
                            yield pb.StreamResponse(
                                speech_stopped=pb.SpeechStopped(sample=item.sample)
                            )
                    elif isinstance(item, Moved):
                        # The server drains: the client resumes elsewhere; the call ends OK.
                        yield pb.StreamResponse(
                            moved=pb.StreamMoved(
                                resume_token=item.resume_token,
                                frames_received=item.frames_received,
                            )
                        )
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

    async def _abort(
        self, context: grpc.aio.ServicerContext, error: StreamError, model: str
    ) -> None:
        self.bridge.reject(error, model)
        await context.abort(grpc_status(error), error.message)


async def _decode(requests: AsyncIterator[pb.StreamRequest]) -> AsyncIterator[Inbound]:
    """The rest of a `Stream` call's requests as bridge input: chunks, then
    `END` at `end` or at the client's half-close (which equals `end`)."""
    async for request in requests:
        if isinstance(request, Malformed):
            raise InvalidArgument(request.error)
        kind = request.WhichOneof("request")
        if kind == "chunk":
            yield tensor_to_array(request.chunk, MAX_MESSAGE_BYTES)
        elif kind == "end":
            yield END
            return
        elif kind == "config":
            raise InvalidArgument("a second `config` message; a stream has exactly one.")
        else:
            raise InvalidArgument("empty StreamRequest; set config, chunk or end.")
    yield END


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

    def __init__(self, keys: ApiKeys, runtime: StreamRuntime) -> None:
        self._keys = keys
        self._bridge = StreamBridge(runtime, "grpc")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHODS):
            return handler
        metadata = dict(details.invocation_metadata or ())
        try:
            self._keys.check(metadata.get("authorization"), how=GRPC_HINT)
        except Unauthenticated as e:
            self._bridge.reject(e)
            return _deny(handler, e)
        return handler


def _deny(handler: grpc.RpcMethodHandler, error: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that answers UNAUTHENTICATED."""

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


class GrpcServer:
    """Owns the `grpc.aio` server: service, health, reflection, auth, TLS."""

    def __init__(
        self,
        runtime: StreamRuntime,
        host: str,
        port: int,
        api_keys: ApiKeys | None = None,
        tls: tuple[bytes, bytes] | None = None,
    ) -> None:
        keys = api_keys or ApiKeys()
        interceptors = [ApiKeyInterceptor(keys, runtime)] if keys.enabled else []
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
