"""grpc.aio answers a request message that fails to parse (truncated bytes, invalid
UTF-8 in a string field) with UNKNOWN. Callers deserve INVALID_ARGUMENT, so our own
service's messages are parsed here instead of by gRPC."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from propscope_server import metrics

OWN_SERVICE_PREFIX = "/propscope."

logger = logging.getLogger(__name__)


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

        async def parsed(raw: bytes, context: grpc.aio.ServicerContext) -> object:
            try:
                return parse(raw)
            except DecodeError as error:
                metrics.RPC_TOTAL.labels(method=method, code="INVALID_ARGUMENT").inc()
                logger.info("%s refused: the request does not parse: %s", method, error)
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid protobuf message for {details.method}: {error}",
                )

        if handler.response_streaming:  # our streaming methods write through the context

            async def stream(raw: bytes, context: grpc.aio.ServicerContext) -> None:
                await handler.unary_stream(await parsed(raw, context), context)

            return grpc.unary_stream_rpc_method_handler(
                stream, response_serializer=handler.response_serializer
            )

        async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> object:
            return await handler.unary_unary(await parsed(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(
            unary, response_serializer=handler.response_serializer
        )
