from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
INT16: DType
INT32: DType

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StreamConfig(_message.Message):
    __slots__ = ("model", "stream_id", "speech_segments", "resume_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    SPEECH_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    stream_id: str
    speech_segments: SpeechSegmentsConfig
    resume_token: bytes
    def __init__(self, model: _Optional[str] = ..., stream_id: _Optional[str] = ..., speech_segments: _Optional[_Union[SpeechSegmentsConfig, _Mapping]] = ..., resume_token: _Optional[bytes] = ...) -> None: ...

class SpeechSegmentsConfig(_message.Message):
    __slots__ = ("threshold", "neg_threshold", "min_silence_duration_ms", "speech_pad_ms")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NEG_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_SILENCE_DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    SPEECH_PAD_MS_FIELD_NUMBER: _ClassVar[int]
    threshold: float
    neg_threshold: float
    min_silence_duration_ms: int
    speech_pad_ms: int
    def __init__(self, threshold: _Optional[float] = ..., neg_threshold: _Optional[float] = ..., min_silence_duration_ms: _Optional[int] = ..., speech_pad_ms: _Optional[int] = ...) -> None: ...

class EndOfStream(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("config", "chunk", "end")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    config: StreamConfig
    chunk: Tensor
    end: EndOfStream
    def __init__(self, config: _Optional[_Union[StreamConfig, _Mapping]] = ..., chunk: _Optional[_Union[Tensor, _Mapping]] = ..., end: _Optional[_Union[EndOfStream, _Mapping]] = ...) -> None: ...

class Ratio(_message.Message):
    __slots__ = ("numerator", "denominator")
    NUMERATOR_FIELD_NUMBER: _ClassVar[int]
    DENOMINATOR_FIELD_NUMBER: _ClassVar[int]
    numerator: int
    denominator: int
    def __init__(self, numerator: _Optional[int] = ..., denominator: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "description", "input_shape", "input_dtype", "output_shape", "output_dtype", "sample_rate", "block_size", "output_ratio", "input_latency", "output_latency", "max_streams", "speech_segments")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_RATIO_FIELD_NUMBER: _ClassVar[int]
    INPUT_LATENCY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LATENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    SPEECH_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_dtype: DType
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    output_dtype: DType
    sample_rate: int
    block_size: int
    output_ratio: Ratio
    input_latency: int
    output_latency: int
    max_streams: int
    speech_segments: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_dtype: _Optional[_Union[DType, str]] = ..., output_shape: _Optional[_Iterable[int]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., sample_rate: _Optional[int] = ..., block_size: _Optional[int] = ..., output_ratio: _Optional[_Union[Ratio, _Mapping]] = ..., input_latency: _Optional[int] = ..., output_latency: _Optional[int] = ..., max_streams: _Optional[int] = ..., speech_segments: _Optional[bool] = ...) -> None: ...

class StreamStarted(_message.Message):
    __slots__ = ("model", "stream_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STREAM_ID_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    stream_id: str
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., stream_id: _Optional[str] = ...) -> None: ...

class StreamOutput(_message.Message):
    __slots__ = ("tensor", "offset")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    tensor: Tensor
    offset: int
    def __init__(self, tensor: _Optional[_Union[Tensor, _Mapping]] = ..., offset: _Optional[int] = ...) -> None: ...

class StreamEnded(_message.Message):
    __slots__ = ("frames_in", "frames_out", "ticks", "duration_seconds")
    FRAMES_IN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_OUT_FIELD_NUMBER: _ClassVar[int]
    TICKS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    frames_in: int
    frames_out: int
    ticks: int
    duration_seconds: float
    def __init__(self, frames_in: _Optional[int] = ..., frames_out: _Optional[int] = ..., ticks: _Optional[int] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class SpeechStarted(_message.Message):
    __slots__ = ("sample",)
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    sample: int
    def __init__(self, sample: _Optional[int] = ...) -> None: ...

class SpeechStopped(_message.Message):
    __slots__ = ("sample",)
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    sample: int
    def __init__(self, sample: _Optional[int] = ...) -> None: ...

class StreamMoved(_message.Message):
    __slots__ = ("resume_token", "frames_received")
    RESUME_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    resume_token: bytes
    frames_received: int
    def __init__(self, resume_token: _Optional[bytes] = ..., frames_received: _Optional[int] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("started", "output", "ended", "speech_started", "speech_stopped", "moved")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STARTED_FIELD_NUMBER: _ClassVar[int]
    SPEECH_STOPPED_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    started: StreamStarted
    output: StreamOutput
    ended: StreamEnded
    speech_started: SpeechStarted
    speech_stopped: SpeechStopped
    moved: StreamMoved
    def __init__(self, started: _Optional[_Union[StreamStarted, _Mapping]] = ..., output: _Optional[_Union[StreamOutput, _Mapping]] = ..., ended: _Optional[_Union[StreamEnded, _Mapping]] = ..., speech_started: _Optional[_Union[SpeechStarted, _Mapping]] = ..., speech_stopped: _Optional[_Union[SpeechStopped, _Mapping]] = ..., moved: _Optional[_Union[StreamMoved, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...
