"""Domain errors. Nothing below the API layer knows about gRPC: `api/status.py`
maps each class to one status code."""

from __future__ import annotations


class PropscopeError(Exception):
    """Base class of every refusal or failure a caller is told about."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        # The request field to change, sent as a google.rpc.BadRequest detail.
        self.field = field


class InvalidArgument(PropscopeError):
    """The request itself is wrong: a field to change."""


class NotFound(PropscopeError):
    """A named model does not exist."""


class FailedPrecondition(PropscopeError):
    """The request is valid but the system's state (a model's config or readiness, the
    image's content) does not allow it."""


class Unavailable(PropscopeError):
    """A backend is unreachable: retry with backoff."""


class DeadlineExceeded(PropscopeError):
    """The caller's deadline passed."""


class BackendError(PropscopeError):
    """A backend model failed while serving a request."""


class ResourceExhausted(PropscopeError):
    """A concurrency limit or a request budget is reached."""
