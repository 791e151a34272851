"""The ExplainService servicer: converts protobuf to domain calls and domain
errors to gRPC status codes, nothing else."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_status import rpc_status

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc
from propscope_server import metrics
from propscope_server.api import convert
from propscope_server.backends.triton import TritonBackend
from propscope_server.config import Limits
from propscope_server.errors import PropscopeError
from propscope_server.orchestration.explain import Explainer

logger = logging.getLogger(__name__)


class ExplainServicer(explain_pb2_grpc.ExplainServiceServicer):
    def __init__(self, explainer: Explainer, backend: TritonBackend, limits: Limits) -> None:
        self._explainer = explainer
        self._backend = backend
        self._limits = limits

    async def Explain(  # noqa: N802 - gRPC method name
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExplainEvent]:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        metrics.INFLIGHT_STREAMS.inc()
        try:
            spec = convert.explain_spec(request, self._limits)
            remaining = context.time_remaining()
            deadline = time.monotonic() + remaining if remaining is not None else None
            plan = await self._explainer.plan(spec, deadline)
            logger.info(
                "explain %s: model %s, %d properties",
                spec.request_id,
                spec.classifier.name,
                len(spec.properties),
            )
            async for event in self._explainer.run(plan):
                yield convert.event_message(spec.request_id, event)
        except PropscopeError as error:
            code = error.code
            await context.abort_with_status(rpc_status.to_status(convert.error_status(error)))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("explain failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            metrics.INFLIGHT_STREAMS.dec()
            metrics.RPC_TOTAL.labels(method="Explain", code=code.name).inc()
            metrics.RPC_SECONDS.labels(method="Explain").observe(time.perf_counter() - started)

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            entries = await self._backend.repository()
            models = []
            for entry in entries:
                description = None
                if entry.state == "READY":
                    description = await self._backend.describe(entry.name, entry.version)
                models.append(convert.model_info(entry, description))
            return pb.ListModelsResponse(models=models)
        except PropscopeError as error:
            code = error.code
            await context.abort(error.code, str(error))
        finally:
            metrics.RPC_TOTAL.labels(method="ListModels", code=code.name).inc()
            metrics.RPC_SECONDS.labels(method="ListModels").observe(time.perf_counter() - started)
