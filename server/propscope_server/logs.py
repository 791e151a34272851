"""Structured logs: one JSON object per line, each carrying the request id and
tenant of the call that logged it (context variables, so tasks a request starts
inherit them)."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
TENANT: ContextVar[str] = ContextVar("tenant", default="-")
FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(tenant)s"


class RequestContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.tenant = TENANT.get()
        return True


class ClientGoneFilter(logging.Filter):
    """gRPC's core logs an ERROR with a traceback when it cannot send a call's status
    because the client has left: after a stream the gateway ended for not being read,
    the client hanging up is the expected end, not a gateway failure. Logged at INFO,
    without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("ExecuteBatchError raised in core"):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "the client left before the call's status was sent", ()
            record.exc_info = record.exc_text = None
        return True


def configure(log_format: str, level: int = logging.INFO) -> None:
    """`json` for log pipelines (the default), `text` for a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        formatter: logging.Formatter = JsonFormatter(
            FIELDS, rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}
        )
    else:
        formatter = logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(tenant)s] %(message)s"
        )
    handler.setFormatter(formatter)
    handler.addFilter(RequestContextFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("grpc._cython.cygrpc").addFilter(ClientGoneFilter())


def bind_request(request_id: str, tenant: str) -> None:
    """Tags the current task's logs. gRPC runs each call in its own task, whose
    context is a copy, so nothing needs resetting afterwards."""
    REQUEST_ID.set(request_id)
    TENANT.set(tenant)
