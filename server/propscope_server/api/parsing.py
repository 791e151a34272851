"""grpc.aio answers a request message that fails to parse (truncated bytes, invalid
UTF-8 in a string field) with UNKNOWN. Callers deserve INVALID_ARGUMENT, so our own
service's messages are parsed here instead of by gRPC: a unary method's at once, a
streaming method's when its servicer reads it, after admission."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message

from propscope_server import metrics
from propscope_server.errors import InvalidArgument

OWN_SERVICE_PREFIX = "/propscope."

logger = logging.getLogger(__name__)


class PendingRequest:
    """A request message not received yet. The servicer reads it once the call is
    admitted (its stream slot and the memory the message may take), so that callers
    cannot make the gateway hold more messages than it admits."""

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        parse: Callable[[bytes], Message],
        method: str,
    ) -> None:
        self._context = context
        self._parse = parse
        self._method = method

    async def read(self) -> Message:
        """The message; InvalidArgument when there is none or it does not parse."""
        raw = await self._context.read()
        if raw is grpc.aio.EOF:
            raise InvalidArgument(f"the call to {self._method} carries no request message")
        try:
            return self._parse(raw)
        except DecodeError as error:
            raise InvalidArgument(
                f"the request is not a valid protobuf message for {self._method}: {error}"
            ) from None


class ParseRequestsInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if (
            handler is None
            or handler.request_streaming
            or not details.method.startswith(OWN_SERVICE_PREFIX)
        ):
            return handler
        parse = handler.request_deserializer
        method = details.method.rsplit("/", 1)[-1]

        if handler.response_streaming:
            # Request-streaming to gRPC, so that nothing is received before the servicer
            # reads it: our streaming methods take a PendingRequest and write through the
            # context.
            async def stream(requests: object, context: grpc.aio.ServicerContext) -> None:
                await handler.unary_stream(PendingRequest(context, parse, details.method), context)

            return grpc.stream_stream_rpc_method_handler(
                stream, response_serializer=handler.response_serializer
            )

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> object:
            try:
                request = parse(raw)
            except DecodeError as error:
                metrics.RPC_TOTAL.labels(method=method, code="INVALID_ARGUMENT").inc()
                logger.info("%s refused: the request does not parse: %s", method, error)
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid protobuf message for {details.method}: {error}",
                )
            return await handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, response_serializer=handler.response_serializer
        )
