"""Domain errors. The API layer maps each to one gRPC status code; nothing
below the API layer knows about gRPC."""

from __future__ import annotations

import grpc


class PropscopeError(Exception):
    """Base class: carries the status code the caller sees."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        # The request field to change, sent as a google.rpc.BadRequest detail.
        self.field = field


class InvalidArgument(PropscopeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PropscopeError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(PropscopeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(PropscopeError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PropscopeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class BackendError(PropscopeError):
    """A backend model failed while serving a request."""

    code = grpc.StatusCode.INTERNAL


class ResourceExhausted(PropscopeError):
    """A concurrency limit is reached: retry later, with backoff."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
