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
from propscope_server.backends.triton import ModelDescription, RepositoryEntry, TritonBackend
from propscope_server.config import Limits
from propscope_server.domain import PropertyOutcome
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
            spec = await asyncio.to_thread(convert.explain_spec, request, self._limits)
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
                if spec.return_path_images and isinstance(event, PropertyOutcome):
                    yield await asyncio.to_thread(convert.event_message, spec.request_id, event)
                else:
                    yield convert.event_message(spec.request_id, event)
        except PropscopeError as error:
            code = error.code
            await _abort(context, error)
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
            models = [
                convert.model_info(entry, await self._describe_listed(entry)) for entry in entries
            ]
            return pb.ListModelsResponse(models=models)
        except PropscopeError as error:
            code = error.code
            await _abort(context, error)
        except Exception:
            code = grpc.StatusCode.INTERNAL
            logger.exception("list models failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        finally:
            metrics.RPC_TOTAL.labels(method="ListModels", code=code.name).inc()
            metrics.RPC_SECONDS.labels(method="ListModels").observe(time.perf_counter() - started)

    async def _describe_listed(self, entry: RepositoryEntry) -> ModelDescription | None:
        """One model that cannot be described is listed bare, not a failed listing."""
        if entry.state != "READY":
            return None
        try:
            return await self._backend.describe(entry.name, entry.version)
        except Exception:
            logger.warning("cannot describe model %s", entry.name, exc_info=True)
            return None


async def _abort(context: grpc.aio.ServicerContext, error: PropscopeError) -> None:
    """End the call with the error's code, message and any BadRequest detail."""
    await context.abort_with_status(rpc_status.to_status(convert.error_status(error)))
