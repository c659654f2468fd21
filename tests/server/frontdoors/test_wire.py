"""Wire conversions: pinned formats, exact bytes, decoded arrays the runtime owns."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos import streaming_pb2 as pb
from sequence_layers.testing import assert_allclose
from server.errors import InvalidArgument, ResourceExhausted, StreamError
from server.frontdoors.wire import (
    array_to_tensor,
    decode_ws_frames,
    grpc_status,
    output_response,
    tensor_to_array,
    ws_close_code,
    ws_output,
)


def test_output_response_is_the_pinned_message_byte_for_byte() -> None:
    frames = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    nested = pb.StreamResponse(
        output=pb.StreamOutput(
            tensor=pb.Tensor(shape=[3, 4], dtype=pb.FLOAT32, data=frames.astype("<f4").tobytes()),
            offset=17,
        )
    )
    assert output_response(frames, 17).SerializeToString() == nested.SerializeToString()
    assert array_to_tensor(frames) == nested.output.tensor


def test_ws_output_is_little_endian_float32() -> None:
    frames = np.arange(6, dtype=np.float64).reshape(3, 2)
    assert ws_output(frames) == frames.astype("<f4").tobytes()


@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_decoding_round_trips_to_owned_native_arrays(dtype: str) -> None:
    x = (np.random.default_rng(1).normal(size=(5, 2)) * 100).astype(dtype)
    data = x.astype(x.dtype.newbyteorder("<")).tobytes()
    y = decode_ws_frames(data, dtype, (2,))
    assert y.dtype == np.dtype(dtype) and y.shape == (5, 2)
    assert_allclose(y, x)
    tensor = pb.Tensor(
        shape=[5, 2], dtype=pb.FLOAT32 if dtype == "float32" else pb.INT16, data=data
    )
    z = tensor_to_array(tensor, 1 << 20)
    assert_allclose(z, x)
    for decoded in (y, z):
        assert decoded.dtype.isnative and decoded.flags.writeable and decoded.flags.owndata


def test_bad_tensors_say_what_is_wrong() -> None:
    good = np.ones((2, 3), "<f4").tobytes()
    with pytest.raises(InvalidArgument, match="needs 36"):
        tensor_to_array(pb.Tensor(shape=[3, 3], dtype=pb.FLOAT32, data=good), 1 << 20)
    with pytest.raises(InvalidArgument, match="shape"):
        tensor_to_array(pb.Tensor(shape=[], dtype=pb.FLOAT32, data=good), 1 << 20)
    with pytest.raises(ResourceExhausted, match="exceeds"):
        tensor_to_array(pb.Tensor(shape=[2, 3], dtype=pb.FLOAT32, data=good), 10)
    with pytest.raises(InvalidArgument, match="whole number of frames"):
        decode_ws_frames(good[:-2], "float32", (3,))


def test_one_mapping_to_transport_codes() -> None:
    assert grpc_status(InvalidArgument("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(StreamError("x")) == grpc.StatusCode.INTERNAL
    assert ws_close_code(ResourceExhausted("x")) == 1013
    assert ws_close_code(StreamError("x")) == 1011
