"""What a stream gives back to the caller: events and typed errors.

Shared by the transports (clients/client.py) and the logic that follows a
moved stream (clients/resume.py); `clients.client` re-exports all of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterable, Iterable
from typing import Any

import numpy as np


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


class PermissionDeniedError(StreamingError):
    """A resume token whose signature or key this server does not accept."""

    code = "PERMISSION_DENIED"


class FailedPreconditionError(StreamingError):
    """A resume token for another model (version), or replicas whose clocks disagree."""

    code = "FAILED_PRECONDITION"


_ERRORS = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        ResourceExhaustedError,
        UnauthenticatedError,
        DeadlineExceededError,
        UnavailableError,
        PermissionDeniedError,
        FailedPreconditionError,
    )
}


def error_for(code: str, message: str) -> StreamingError:
    cls = _ERRORS.get(code, StreamingError)
    return cls(message, code)


@dataclasses.dataclass(frozen=True)
class Started:
    """The stream is open; `model` is the server's ModelInfo as a dict."""

    stream_id: str
    model: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Output:
    """Valid output frames `[n, *output_shape]`; `offset` indexes the first
    one in the stream's whole output."""

    frames: np.ndarray
    offset: int


@dataclasses.dataclass(frozen=True)
class Ended:
    """The stream finished; totals as the server counted them."""

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


@dataclasses.dataclass(frozen=True)
class Moved:
    """The server handed the stream off and the client resumed it on
    `url`, resending input from frame `frames_received` (only streams
    opened with `report_moves=True` see these)."""

    frames_received: int
    url: str


@dataclasses.dataclass(frozen=True)
class MovedMessage:
    """`moved` on the wire: the token to resume with."""

    resume_token: bytes
    frames_received: int


Event = Started | Output | Speech | Ended
# A stream's input: arrays `[frames, *c]`, from a list, generator or async generator.
Chunks = Iterable[np.ndarray] | AsyncIterable[np.ndarray]
