"""The gRPC server metrics of go-grpc-prometheus (grpc_server_*), recorded around every
call to a registered method by the outermost interceptor: calls the other interceptors
refuse (UNAUTHENTICATED, unparsable requests) are counted too, and a method nobody
registered (answered UNIMPLEMENTED by gRPC) makes no series, whatever its name."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import cache
from typing import Any

import grpc
from google.protobuf import descriptor_pool

from propscope_server import metrics

# Go's codes.Code.String(), the values go-grpc-prometheus writes in grpc_code.
GO_CODE_NAMES = {
    code: "".join(word.capitalize() for word in code.name.split("_")) for code in grpc.StatusCode
} | {grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled"}


def cancelled_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """A cancelled handler ran out of its caller's time, or its caller hung up."""
    remaining = context.time_remaining()
    late = remaining is not None and remaining <= 0.01
    return grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED


@cache
def grpc_type(method: str, request_streaming: bool, response_streaming: bool) -> str:
    """unary, client_stream, server_stream or bidi_stream, as the contract declares it:
    the handler gRPC runs may differ (ParseRequestsInterceptor serves our server-streaming
    methods as bidirectional ones, to receive their request after admission)."""
    try:
        found = descriptor_pool.Default().FindMethodByName(method.lstrip("/").replace("/", "."))
        request_streaming, response_streaming = found.client_streaming, found.server_streaming
    except KeyError:
        pass
    return {
        (False, False): "unary",
        (True, False): "client_stream",
        (False, True): "server_stream",
        (True, True): "bidi_stream",
    }[request_streaming, response_streaming]


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Must come first in the server's interceptors, so that it wraps what the others
    return. Handlers are async (the gateway's are); messages written and read through the
    context are counted as well as those yielded and iterated."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").rpartition("/")
        labels = {
            "grpc_type": grpc_type(
                details.method, handler.request_streaming, handler.response_streaming
            ),
            "grpc_service": service,
            "grpc_method": method,
        }
        kind = {
            (False, False): "unary_unary",
            (False, True): "unary_stream",
            (True, False): "stream_unary",
            (True, True): "stream_stream",
        }[handler.request_streaming, handler.response_streaming]
        observed = _observed(getattr(handler, kind), handler, labels)
        return handler._replace(**{kind: observed})


def _observed(
    behavior: Callable, handler: grpc.RpcMethodHandler, labels: dict[str, str]
) -> Callable:
    """`behavior` recording its call in the grpc_server_* metrics, in the same form (a
    coroutine function or an async generator function) so that gRPC runs it as before."""

    def start(request: Any, context: grpc.aio.ServicerContext) -> tuple[Any, _CountingContext]:
        metrics.GRPC_STARTED.labels(**labels).inc()
        if handler.request_streaming:
            request = _counted(request, metrics.GRPC_MSG_RECEIVED.labels(**labels))
        else:
            metrics.GRPC_MSG_RECEIVED.labels(**labels).inc()
        return request, _CountingContext(context, labels)

    def handled(context: grpc.aio.ServicerContext, error: BaseException | None, started: float):
        metrics.GRPC_HANDLED.labels(**labels, grpc_code=GO_CODE_NAMES[_code(context, error)]).inc()
        metrics.GRPC_HANDLING_SECONDS.labels(**labels).observe(time.perf_counter() - started)

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, error = time.perf_counter(), None
            request, counting = start(request, context)
            try:
                async for response in behavior(request, counting):
                    yield response
                    metrics.GRPC_MSG_SENT.labels(**labels).inc()
            except BaseException as raised:
                error = raised
                raise
            finally:
                handled(context, error, started)

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started, error = time.perf_counter(), None
        request, counting = start(request, context)
        try:
            response = await behavior(request, counting)
        except BaseException as raised:
            error = raised
            raise
        finally:
            handled(context, error, started)
        if not handler.response_streaming:  # streamed messages were written to the context
            metrics.GRPC_MSG_SENT.labels(**labels).inc()
        return response

    return call


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the call ends with: what the handler set or aborted with; for an
    exception gRPC did not raise, UNKNOWN (what gRPC answers). A generator closed while
    paused at ``yield`` (GeneratorExit) was left by a call that ended, as a cancelled one."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return cancelled_code(context)
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN
    return context.code() or grpc.StatusCode.OK


async def _counted(requests: AsyncIterator[Any], counter: Any) -> AsyncIterator[Any]:
    async for request in requests:
        counter.inc()
        yield request


class _CountingContext:
    """The call's context, counting the messages written and read through it."""

    def __init__(self, context: grpc.aio.ServicerContext, labels: dict[str, str]) -> None:
        self._context = context
        self._sent = metrics.GRPC_MSG_SENT.labels(**labels)
        self._received = metrics.GRPC_MSG_RECEIVED.labels(**labels)

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._sent.inc()

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._received.inc()
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)
