"""Typed errors of the runtime, each carrying its pinned gRPC status code name.

The front doors map these to transport codes in one place; the runtime only
raises them. Messages must say what to do about the problem.
"""

from __future__ import annotations


class StreamError(Exception):
    """Base: an error a client can act on. `code` is a gRPC status code name."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(StreamError):
    """Bad tensor (shape, dtype, byte count), non-finite values, protocol misuse."""

    code = "INVALID_ARGUMENT"


class ModelNotFound(StreamError):
    code = "NOT_FOUND"


class ResourceExhausted(StreamError):
    """No free slot, chunk too large, or the client is not reading its outputs."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(StreamError):
    code = "UNAUTHENTICATED"


class PermissionDenied(StreamError):
    """The caller is known (or need not be) but may not do this."""

    code = "PERMISSION_DENIED"


class DeadlineExceeded(StreamError):
    """The stream was idle for longer than the idle timeout."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(StreamError):
    """The server is draining or stopping."""

    code = "UNAVAILABLE"


class Cancelled(StreamError):
    code = "CANCELLED"


class Internal(StreamError):
    code = "INTERNAL"


class ModelLoadError(Exception):
    """A model directory or model.json could not be loaded; says which file and why."""
