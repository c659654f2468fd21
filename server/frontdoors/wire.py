"""Conversions between wire messages and runtime values, and the one mapping
from runtime errors to transport codes (gRPC status, WebSocket close).

Decoded chunks are owned, writable, native-order arrays. A read-only view of
the message bytes would save a copy of a few KB, but measured over gRPC it
cost more server CPU per chunk than it saved (loadtests/bench_doors.py, 377
vs 331 us, silero-vad), and it would tie the runtime to never writing into
what it was sent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from protos import streaming_pb2 as pb
from server.errors import InvalidArgument, ResourceExhausted, StreamError
from server.model import ModelInfo
from server.segments import SegmentOptions

_NP_BY_DTYPE = {pb.FLOAT32: np.dtype("<f4"), pb.INT16: np.dtype("<i2"), pb.INT32: np.dtype("<i4")}
_DTYPE_BY_NAME = {"float32": pb.FLOAT32, "int16": pb.INT16, "int32": pb.INT32}
WIRE_DTYPES = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2"), "int32": np.dtype("<i4")}

# WebSocket close codes (RFC 6455) for each status code name.
WS_CLOSE_CODES = {
    "INVALID_ARGUMENT": 1007,
    "NOT_FOUND": 1008,
    "UNAUTHENTICATED": 1008,
    # Refused resume tokens (server/resume.py): a policy refusal, not bad data.
    "PERMISSION_DENIED": 1008,
    "FAILED_PRECONDITION": 1008,
    "DEADLINE_EXCEEDED": 1008,
    "RESOURCE_EXHAUSTED": 1013,
    "UNAVAILABLE": 1013,
    "CANCELLED": 1000,
    "INTERNAL": 1011,
}


def grpc_status(error: StreamError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def ws_close_code(error: StreamError) -> int:
    return WS_CLOSE_CODES.get(error.code, 1011)


def tensor_to_array(tensor: pb.Tensor, max_bytes: int) -> np.ndarray:
    """Decodes a chunk; raises InvalidArgument naming what is wrong."""
    dtype = _NP_BY_DTYPE.get(tensor.dtype)
    if dtype is None:
        name = pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else tensor.dtype
        raise InvalidArgument(f"chunk dtype {name} is not supported; use FLOAT32 or INT16.")
    # Read once: each read of a bytes field makes a new copy of its bytes.
    data = tensor.data
    shape = list(tensor.shape)
    if not shape or min(shape) < 0:
        raise InvalidArgument(f"chunk shape {shape} is invalid; use [frames, *channel_shape].")
    if len(data) > max_bytes:
        raise ResourceExhausted(
            f"chunk of {len(data)} bytes exceeds the limit of {max_bytes}; send smaller chunks."
        )
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"chunk data has {len(data)} bytes but shape {shape} of {dtype.name} needs {expected}."
        )
    return _native(np.frombuffer(data, dtype=dtype).reshape(shape))


def array_to_tensor(values: np.ndarray) -> pb.Tensor:
    values = np.ascontiguousarray(values, dtype="<f4")
    return pb.Tensor(shape=values.shape, dtype=pb.FLOAT32, data=values.tobytes())


def output_response(frames: np.ndarray, offset: int) -> pb.StreamResponse:
    """`StreamResponse.output` for valid output frames `[n, *C]` starting at `offset`.

    Filled in place rather than from nested constructors, which copy each
    submessage into its parent (one output message per stream per tick).
    """
    values = np.ascontiguousarray(frames, dtype="<f4")
    response = pb.StreamResponse()
    output = response.output
    output.offset = offset
    tensor = output.tensor
    tensor.shape.extend(values.shape)
    tensor.dtype = pb.FLOAT32
    tensor.data = values.tobytes()
    return response


def ws_output(frames: np.ndarray) -> bytes:
    """One WebSocket output message: little-endian float32 `[n, *C]` bytes."""
    return np.ascontiguousarray(frames, dtype="<f4").tobytes()


def _native(x: np.ndarray) -> np.ndarray:
    # An owned copy in host byte order (the wire is little-endian).
    return x.astype(x.dtype.newbyteorder("="))


def decode_ws_frames(data: bytes, dtype_name: str, channel_shape: tuple[int, ...]) -> np.ndarray:
    """Binary WebSocket message -> `[frames, *channel_shape]`."""
    dtype = WIRE_DTYPES[dtype_name]
    frame_bytes = math.prod(channel_shape) * dtype.itemsize
    if len(data) % frame_bytes:
        raise InvalidArgument(
            f"binary message of {len(data)} bytes is not a whole number of frames "
            f"({frame_bytes} bytes each: {list(channel_shape)} {dtype_name})."
        )
    return _native(np.frombuffer(data, dtype=dtype).reshape(-1, *channel_shape))


def model_info_to_proto(info: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=info.name,
        description=info.description,
        input_shape=list(info.input_shape),
        input_dtype=_DTYPE_BY_NAME.get(info.input_dtype, pb.FLOAT32),
        output_shape=list(info.output_shape),
        output_dtype=pb.FLOAT32,
        sample_rate=info.sample_rate,
        block_size=info.block_size,
        output_ratio=pb.Ratio(
            numerator=info.output_ratio.numerator, denominator=info.output_ratio.denominator
        ),
        input_latency=info.input_latency,
        output_latency=info.output_latency,
        max_streams=info.max_streams,
        speech_segments=info.speech_segments,
    )


def segment_options_from_proto(config: pb.SpeechSegmentsConfig) -> SegmentOptions:
    """gRPC `SpeechSegmentsConfig` -> options; unset fields keep the defaults."""
    fields = ("threshold", "neg_threshold", "min_silence_duration_ms", "speech_pad_ms")
    return SegmentOptions(**{f: getattr(config, f) for f in fields if config.HasField(f)})


def segment_options_from_query(params: Mapping[str, str]) -> SegmentOptions | None:
    """WebSocket query `?speech_segments=1&threshold=0.5&neg_threshold=..&
    min_silence_duration_ms=100&speech_pad_ms=30` -> options (None if not asked)."""
    if params.get("speech_segments", "").lower() not in ("1", "true", "yes"):
        return None
    kwargs: dict[str, Any] = {}
    for name, cast in (
        ("threshold", float),
        ("neg_threshold", float),
        ("min_silence_duration_ms", int),
        ("speech_pad_ms", int),
    ):
        if name in params:
            try:
                kwargs[name] = cast(params[name])
            except ValueError:
                raise InvalidArgument(
                    f"query parameter {name}={params[name]!r} is not a {cast.__name__}."
                ) from None
    return SegmentOptions(**kwargs)
