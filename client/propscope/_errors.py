"""The SDK's one exception type, and the translation of gRPC errors into it."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2, message
from google.rpc import error_details_pb2, status_pb2

__all__ = ["FieldViolation", "PropscopeError", "status_code_from_int"]

logger = logging.getLogger(__name__)

# The trailer in which servers (grpcio-status, grpc-go, ...) put the rich google.rpc.Status.
_STATUS_DETAILS_KEY = "grpc-status-details-bin"

_CODES_BY_INT = {code.value[0]: code for code in grpc.StatusCode}


def status_code_from_int(code: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a google.rpc.Code number (UNKNOWN for numbers outside it)."""
    return _CODES_BY_INT.get(code, grpc.StatusCode.UNKNOWN)


class FieldViolation(NamedTuple):
    """One ``google.rpc.BadRequest`` field violation: the request field (e.g.
    ``sobol.nb_design``) and what is wrong with it. A tuple, so ``field, why = violation``
    works."""

    field: str
    description: str


class PropscopeError(Exception):
    """A failed propscope call.

    ``code`` is the gRPC status code and ``message`` the server's message. ``details`` holds the
    ``google.protobuf.Any`` details of the rich ``google.rpc.Status`` when the server sent one, and
    ``field_violations`` the ``FieldViolation`` (field, description) of its
    ``google.rpc.BadRequest``.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        details: Iterable[any_pb2.Any] = (),
    ) -> None:
        self.code = code
        self.message = message
        self.details: tuple[any_pb2.Any, ...] = tuple(details)
        self.field_violations: tuple[FieldViolation, ...] = _field_violations(self.details)
        super().__init__(code, message)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> PropscopeError:
        """Builds the error from a ``grpc.RpcError`` (sync) or ``grpc.aio.AioRpcError``."""
        code = _call(error, "code") or grpc.StatusCode.UNKNOWN
        message = _call(error, "details") or ""
        status = _rich_status(_call(error, "trailing_metadata") or ())
        details = tuple(status.details) if status is not None else ()
        if status is not None and not message:
            message = status.message
        return cls(code, message or code.name, details=details)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.field_violations:
            # A violation that only repeats the message adds its field, not the text again.
            parts = [
                f"field {v.field}"
                if v.description == self.message
                else f"{v.field}: {v.description}"
                for v in self.field_violations
            ]
            text = f"{text} ({'; '.join(parts)})"
        return text

    def __repr__(self) -> str:
        return f"PropscopeError(code={self.code.name}, message={self.message!r})"


def _call(error: grpc.RpcError, method: str) -> Any:
    """``error.method()``, or None when the error is no ``grpc.Call`` or the call fails."""
    function = getattr(error, method, None)
    if function is None:
        return None
    try:
        return function()
    except Exception:  # a half-built error object must not hide the original failure
        logger.debug("grpc error has no usable %s()", method, exc_info=True)
        return None


def _rich_status(trailing_metadata: Iterable[tuple[str, Any]]) -> status_pb2.Status | None:
    for key, value in trailing_metadata:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except message.DecodeError:
                logger.debug("unreadable %s trailer", _STATUS_DETAILS_KEY)
                return None
    return None


def _field_violations(details: Iterable[any_pb2.Any]) -> tuple[FieldViolation, ...]:
    violations: list[FieldViolation] = []
    for detail in details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend(
                FieldViolation(v.field, v.description) for v in bad_request.field_violations
            )
    return tuple(violations)
