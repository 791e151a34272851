"""The ExplainService servicer: converts protobuf to domain calls and domain
errors to gRPC status codes, nothing else."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import grpc
from grpc_status import rpc_status

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc
from propscope_server import logs, metrics
from propscope_server.api import convert
from propscope_server.api.admission import Admission
from propscope_server.api.auth import Authenticator
from propscope_server.api.status import status_code
from propscope_server.backends.triton import ModelDescription, RepositoryEntry, TritonBackend
from propscope_server.config import Limits
from propscope_server.domain import PropertyOutcome
from propscope_server.errors import PropscopeError
from propscope_server.orchestration.explain import Explainer
from propscope_server.threads import in_thread

logger = logging.getLogger(__name__)


class ExplainServicer(explain_pb2_grpc.ExplainServiceServicer):
    def __init__(
        self,
        explainer: Explainer,
        backend: TritonBackend,
        limits: Limits,
        authenticator: Authenticator,
        admission: Admission,
    ) -> None:
        self._explainer = explainer
        self._backend = backend
        self._limits = limits
        self._authenticator = authenticator
        self._admission = admission

    async def Explain(  # noqa: N802 - gRPC method name
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExplainEvent]:
        async with _observed("Explain", context):
            tenant = self._tenant(context)
            # A call without a deadline still ends: slots and Triton work are bounded.
            remaining = context.time_remaining() or self._limits.max_call_s
            deadline = time.monotonic() + remaining
            with self._admission.admit(tenant), metrics.INFLIGHT_STREAMS.track_inprogress():
                spec = await in_thread(convert.explain_spec, request, self._limits, tenant)
                logs.bind_request(spec.request_id, tenant)
                plan = await self._explainer.plan(spec, deadline)
                logger.info(
                    "explain: model %s, %d properties, %d samples x %d steps",
                    spec.classifier.name,
                    len(spec.properties),
                    spec.samples,
                    spec.steps,
                )
                async with aclosing(self._explainer.run(plan)) as events:
                    async for event in events:
                        if spec.return_path_images and isinstance(event, PropertyOutcome):
                            yield await in_thread(convert.event_message, spec.request_id, event)
                        else:
                            yield convert.event_message(spec.request_id, event)

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async with _observed("ListModels", context):
            self._tenant(context)
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            entries = await self._backend.repository(deadline)
            descriptions = await asyncio.gather(
                *(self._describe_listed(entry, deadline) for entry in entries)
            )
            return pb.ListModelsResponse(
                models=[
                    convert.model_info(entry, description)
                    for entry, description in zip(entries, descriptions, strict=True)
                ]
            )

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The interceptor has refused unknown tokens already; this names the tenant. The
        request id is bound once the request is validated: never an unchecked string."""
        tenant = self._authenticator.tenant(context.invocation_metadata())
        if tenant is None:
            raise RuntimeError("a call without a known token reached the servicer")
        logs.bind_request("-", tenant)
        return tenant

    async def _describe_listed(
        self, entry: RepositoryEntry, deadline: float | None
    ) -> ModelDescription | None:
        """One model that cannot be described is listed bare, not a failed listing."""
        if entry.state != "READY":
            return None
        try:
            return await self._backend.describe(entry.name, entry.version, deadline)
        except Exception:
            logger.warning("cannot describe model %s", entry.name, exc_info=True)
            return None


@asynccontextmanager
async def _observed(method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Maps domain errors to statuses, hides unexpected ones, and records the call's
    status and latency in the metrics and the log."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except PropscopeError as error:
        code = status_code(error)
        logger.info("%s refused: %s %s", method, code.name, error)
        await context.abort_with_status(rpc_status.to_status(convert.error_status(error)))
    except GeneratorExit:  # the stream was closed while it waited to send
        code = grpc.StatusCode.CANCELLED
        raise
    except asyncio.CancelledError:
        remaining = context.time_remaining()
        late = remaining is not None and remaining <= 0.01
        code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        logger.exception("%s failed", method)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
    finally:
        elapsed = time.perf_counter() - started
        metrics.RPC_TOTAL.labels(method=method, code=code.name).inc()
        metrics.RPC_SECONDS.labels(method=method, code=code.name).observe(elapsed)
        logger.info("%s finished: %s in %.3f s", method, code.name, elapsed)
