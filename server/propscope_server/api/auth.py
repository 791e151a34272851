"""Bearer-token authentication: a grpc.aio interceptor refuses calls without a
known token; the servicer asks `Authenticator.tenant` who the caller is."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping

import grpc

from propscope_server import metrics
from propscope_server.domain import DEFAULT_TENANT


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Authenticator:
    """Maps `authorization: Bearer <token>` metadata to a tenant. Tokens are kept
    and compared as SHA-256 digests, so lookups take the same time for any token."""

    def __init__(self, token_tenants: Mapping[str, str]) -> None:
        self._tenants = {_digest(token): tenant for token, tenant in token_tenants.items()}

    @property
    def enabled(self) -> bool:
        return bool(self._tenants)

    def tenant(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
        """The caller's tenant; None when the call carries no known token."""
        if not self.enabled:
            return DEFAULT_TENANT
        token = bearer_token(metadata)
        return None if token is None else self._tenants.get(_digest(token))


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses with UNAUTHENTICATED before the handler runs; `open_methods` (full
    method names such as /grpc.health.v1.Health/Check) skip the check."""

    def __init__(self, authenticator: Authenticator, open_methods: frozenset[str]) -> None:
        self._authenticator = authenticator
        self._open_methods = open_methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in self._open_methods:
            return handler
        metadata = details.invocation_metadata
        if self._authenticator.tenant(metadata) is not None:
            return handler
        if bearer_token(metadata) is None:
            metrics.AUTH_FAILURES.labels(reason="missing").inc()
            return _refusal(handler, "missing bearer token: send 'authorization: Bearer <token>'")
        metrics.AUTH_FAILURES.labels(reason="unknown").inc()
        return _refusal(handler, "unknown bearer token")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that only aborts, and never reads the request: as a request-streaming
    handler nothing is received before the refusal beyond HTTP/2's flow-control window,
    so a caller without a token cannot make the gateway hold a large message."""

    async def refuse(requests: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            refuse, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        refuse, response_serializer=handler.response_serializer
    )
