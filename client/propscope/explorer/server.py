"""The explorer's HTTP server (the standard library's ``ThreadingHTTPServer``): the static page
and the JSON endpoints its script calls.

    GET  /                      the page (static/index.html); /static/<file> its script and style
    GET  /api/settings          the gateway's address and the explorer's settings
    GET  /api/models            the ready classifiers: versions (latest first), classes, methods
    GET  /api/classes?model=M   one model's classes
    POST /api/images            the request body is an image (PNG/JPEG): {image_id, width, height}
    POST /api/jobs              {kind, model, version, class, image_id}: the job (started or cached)
    GET  /api/jobs/<id>         a job: state, stage, done/total, then result or error

Kinds: propgrad, sobol, concept_map (of an uploaded image), concepts, class_picture and
concept_picture:<index> (of a class). Errors are JSON ``{"error": {"code", "message"}}`` with
the gateway's status code name and message, so the page shows them.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from propscope._client import Client
from propscope._errors import PropscopeError
from propscope.explorer.jobs import JobFailed
from propscope.explorer.service import ExplorerService, ExplorerSettings

__all__ = ["MAX_UPLOAD_BYTES", "make_server", "serve"]

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 16 * 1024 * 1024
STATIC_FILES = ("index.html", "explorer.js", "explorer.css")
_STATUS = {
    "INVALID_ARGUMENT": HTTPStatus.BAD_REQUEST,
    "NOT_FOUND": HTTPStatus.NOT_FOUND,
    "FAILED_PRECONDITION": HTTPStatus.CONFLICT,
}


class _Refused(Exception):
    def __init__(self, status: HTTPStatus, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def make_server(service: ExplorerService, host: str, port: int) -> ThreadingHTTPServer:
    """The server, bound (port 0: a free one, ``server.server_address`` says which)."""

    class Handler(_Handler):
        explorer = service

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(client: Client, settings: ExplorerSettings, host: str, port: int) -> None:
    """Serves the explorer until interrupted (KeyboardInterrupt propagates)."""
    service = ExplorerService(client, settings)
    server = make_server(service, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(
        f"propscope explorer: http://{bound_host}:{bound_port}/ (gateway {client.target})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
        service.close()


class _Handler(BaseHTTPRequestHandler):
    explorer: ExplorerService
    server_version = "propscope-explorer"

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        logger.debug("%s %s", self.address_string(), format % args)

    def _get(self, path: str, query: dict[str, str]) -> Any:
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/api/settings":
            return {"gateway": self.explorer.client.target, **self.explorer.settings.to_dict()}
        if path == "/api/models":
            return self.explorer.models()
        if path == "/api/classes":
            return self.explorer.classes(_required(query, "model"))
        if path.startswith("/api/jobs/"):
            job = self.explorer.jobs.get(path.removeprefix("/api/jobs/"))
            if job is None:
                raise _Refused(HTTPStatus.NOT_FOUND, "NOT_FOUND", "no such job: start it again")
            return job.to_dict()
        raise _Refused(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no page {path!r}")

    def _post(self, path: str, query: dict[str, str]) -> Any:
        body = self._body()
        if path == "/api/images":
            try:
                return self.explorer.upload(body)
            except ValueError as error:
                raise _Refused(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", str(error)) from None
        if path == "/api/jobs":
            try:
                request = json.loads(body or b"{}")
                target_class = int(request.get("class", -1))
            except (ValueError, TypeError) as error:
                raise _Refused(
                    HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"a job needs JSON: {error}"
                ) from None
            if target_class < 0:
                raise _Refused(
                    HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", "a job needs a class index >= 0"
                )
            job = self.explorer.start(
                str(request.get("kind", "")),
                _required(request, "model"),
                str(request.get("version", "")),
                target_class,
                str(request.get("image_id", "")),
            )
            return job.to_dict()
        raise _Refused(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no endpoint {path!r}")

    def _answer(self, route: Any) -> None:
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        try:
            answer = route(url.path, query)
        except _Refused as refused:
            self._json(
                refused.status, {"error": {"code": refused.code, "message": refused.message}}
            )
        except JobFailed as error:
            status = _STATUS.get(error.code, HTTPStatus.BAD_GATEWAY)
            self._json(status, {"error": {"code": error.code, "message": error.message}})
        except PropscopeError as error:  # the gateway's refusal or failure, in its words
            status = _STATUS.get(error.code.name, HTTPStatus.BAD_GATEWAY)
            self._json(status, {"error": {"code": error.code.name, "message": error.message}})
        except Exception as error:
            logger.exception("explorer: %s %s failed", self.command, self.path)
            message = f"{type(error).__name__}: {error}"
            self._json(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": {"code": "INTERNAL", "message": message}},
            )
        else:
            if isinstance(answer, tuple):
                self._send(HTTPStatus.OK, *answer)
            else:
                self._json(HTTPStatus.OK, answer)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_UPLOAD_BYTES:
            raise _Refused(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "INVALID_ARGUMENT",
                f"the body holds {length} bytes, more than {MAX_UPLOAD_BYTES}",
            )
        return self.rfile.read(length)

    def _static(self, name: str) -> tuple[bytes, str]:
        if name not in STATIC_FILES:
            raise _Refused(HTTPStatus.NOT_FOUND, "NOT_FOUND", f"no static file {name!r}")
        content = (resources.files("propscope.explorer") / "static" / name).read_bytes()
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return content, f"{kind}; charset=utf-8"

    def _json(self, status: HTTPStatus, document: Any) -> None:
        body = json.dumps(document, allow_nan=False).encode("utf-8")
        self._send(status, body, "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def _required(values: dict[str, Any], name: str) -> str:
    value = str(values.get(name) or "")
    if not value:
        raise _Refused(HTTPStatus.BAD_REQUEST, "INVALID_ARGUMENT", f"{name!r} is required")
    return value
