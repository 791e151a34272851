"""The servicers: protobuf to domain calls, domain errors to gRPC status codes
(api/status.py), and the same admission, deadlines and runner for every method."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack, aclosing, asynccontextmanager
from typing import Any

import grpc
from grpc._cython import cygrpc
from grpc_status import rpc_status

from propscope.v1 import attribution_pb2 as apb
from propscope.v1 import (
    attribution_pb2_grpc,
    concepts_pb2_grpc,
    consistency_pb2_grpc,
    explain_pb2_grpc,
    graph_pb2_grpc,
    interactions_pb2_grpc,
    visualization_pb2_grpc,
)
from propscope.v1 import concepts_pb2 as cpb
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import interactions_pb2 as ipb
from propscope_server import logs, metrics
from propscope_server.api import (
    convert,
    convert_attribution,
    convert_concepts,
    convert_consistency,
    convert_graph,
    convert_interactions,
    convert_visualization,
)
from propscope_server.api.admission import Admission, Caller
from propscope_server.api.auth import Authenticator
from propscope_server.api.memory import MemoryAdmission
from propscope_server.api.parsing import PendingRequest
from propscope_server.api.rpc_metrics import GO_CODE_NAMES, cancelled_code
from propscope_server.api.status import status_code
from propscope_server.config import Limits
from propscope_server.domain import (
    AttributeSpec,
    AttributionOutcome,
    Event,
    ExplainSpec,
    PropertyOutcome,
    method_name,
)
from propscope_server.errors import DeadlineExceeded, PropscopeError, ResourceExhausted
from propscope_server.inference import Inference, ModelDescription, RepositoryEntry
from propscope_server.methods.attribution import Attribution
from propscope_server.methods.base import ExplanationMethod
from propscope_server.methods.craft import Craft
from propscope_server.methods.evaluation import Evaluation
from propscope_server.orchestration.explain import Explainer
from propscope_server.orchestration.runner import run_method
from propscope_server.threads import in_thread

logger = logging.getLogger(__name__)


class StreamStalled(ResourceExhausted):
    """The client stopped reading: the stream's send buffer is full."""


class MethodStreams:
    """What every method's RPC shares: the tenant, the same admission (a stream slot of
    the connection, the peer, the tenant and the gateway, and the request's memory), a
    deadline capped by max_call_s, validation in a thread, the runner, and writes that
    end the stream when the client stops taking them."""

    def __init__(
        self,
        limits: Limits,
        authenticator: Authenticator,
        admission: Admission,
        memory: MemoryAdmission,
    ) -> None:
        self.limits = limits
        self._authenticator = authenticator
        self._admission = admission
        self._memory = memory

    def tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The interceptor has refused unknown tokens already; this names the tenant. The
        request id is bound once the request is validated: never an unchecked string."""
        tenant = self._authenticator.tenant(context.invocation_metadata())
        if tenant is None:
            raise RuntimeError("a call without a known token reached the servicer")
        logs.bind_request("-", tenant)
        return tenant

    def spec_with_limits(
        self, to_spec: Callable[[Any, Limits, str], Any]
    ) -> Callable[[Any, str], Any]:
        """`to_spec(request, limits, tenant)` as `(request, tenant)` with this gateway's limits."""
        return lambda request, tenant: to_spec(request, self.limits, tenant)

    async def stream(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        pending: PendingRequest,
        to_spec: Callable[[Any, str], Any],
        method: ExplanationMethod,
        name_of: Callable[[Any], str],
        to_message: Callable[[Any, Any], Awaitable[Any]],
    ) -> None:
        """Runs `method` and writes its events. The stream's life is capped by
        max_call_s whatever the client's deadline, and a message the client does not take
        within send_timeout_s ends the stream: a slow reader cannot hold its slot. The
        request's memory estimate is reserved before it is decoded (api/memory.py)."""
        # Closed once the call has ended, its status sent: the request's memory stays
        # reserved as long as the call holds its message.
        with ExitStack() as held:
            async with _observed(rpc, context):
                tenant = self.tenant(context)
                caller = Caller.of(context.peer(), tenant if self._authenticator.enabled else None)
                client_remaining = context.time_remaining()
                capped = client_remaining is None or client_remaining > self.limits.max_call_s
                remaining = self.limits.max_call_s if capped else client_remaining
                deadline = time.monotonic() + remaining
                with self._admission.admit(caller), metrics.INFLIGHT_STREAMS.track_inprogress():
                    async with self._capped(remaining if capped else None):
                        request = await self._memory.receive(pending, deadline, held)
                        spec = await in_thread(to_spec, request, tenant)
                        logs.bind_request(spec.request_id, tenant)
                        events = run_method(method, name_of(spec), spec, deadline)
                        async with aclosing(events) as events:
                            async for event in events:
                                await self._write(context, await to_message(spec, event))

    async def stream_events(
        self,
        rpc: str,
        context: grpc.aio.ServicerContext,
        pending: PendingRequest,
        to_spec: Callable[[Any, Limits, str], Any],
        method: ExplanationMethod,
        name: str,
        event_message: Callable[[str, Any], Any],
        *,
        off_loop: bool = False,
    ) -> None:
        """`stream` for a method run under one name whose events each convert to one
        message by `event_message(request_id, event)`; off_loop encodes them in a thread
        (large maps or images would hold the event loop)."""

        async def to_message(spec: Any, event: object) -> Any:
            if off_loop:
                return await in_thread(event_message, spec.request_id, event)
            return event_message(spec.request_id, event)

        await self.stream(
            rpc,
            context,
            pending,
            self.spec_with_limits(to_spec),
            method,
            lambda _: name,
            to_message,
        )

    @asynccontextmanager
    async def _capped(self, remaining: float | None) -> AsyncIterator[None]:
        """Ends the block after `remaining` s (None: never) where the gateway's cap
        max_call_s binds; a client's own shorter deadline cancels the call by itself."""
        try:
            async with asyncio.timeout(remaining):
                yield
        except (TimeoutError, DeadlineExceeded) as error:
            # Where the cap binds it is the deadline of every Triton call too, so a call
            # that ran out of time ran out of the cap.
            if remaining is None:
                raise
            raise DeadlineExceeded(
                f"the stream reached the gateway's cap max_call_s ({self.limits.max_call_s:g} s); "
                "split the request (fewer properties, steps or samples)"
            ) from error

    async def _write(self, context: grpc.aio.ServicerContext, message: Any) -> None:
        try:
            await asyncio.wait_for(context.write(message), self.limits.send_timeout_s)
        except TimeoutError:
            metrics.STALLED_STREAMS.inc()
            raise StreamStalled(
                f"the client took no message for send_timeout_s ({self.limits.send_timeout_s:g} s): "
                "the stream is ended and its work stopped; read a stream as it arrives"
            ) from None
        except cygrpc.ExecuteBatchError:
            # The only way gRPC reports that the client hung up while a message was on
            # its way (its cancellation arrives after): a cancelled call, not a failure.
            raise asyncio.CancelledError from None


class ExplainServicer(explain_pb2_grpc.ExplainServiceServicer):
    def __init__(self, explainer: Explainer, backend: Inference, streams: MethodStreams) -> None:
        self._explainer = explainer
        self._backend = backend
        self._streams = streams

    async def Explain(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def to_message(spec: ExplainSpec, event: Event) -> pb.ExplainEvent:
            if isinstance(event, PropertyOutcome):
                _count_property_result(spec.classifier.name, event)
            if spec.return_path_images and isinstance(event, PropertyOutcome):
                return await in_thread(
                    convert.event_message,
                    spec.request_id,
                    event,
                    spec.path_image_max_side_px,
                )
            return convert.event_message(spec.request_id, event)

        await self._streams.stream(
            "Explain",
            context,
            request,
            self._streams.spec_with_limits(convert.explain_spec),
            self._explainer,
            lambda _: "propgrad",
            to_message,
        )

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async with _observed("ListModels", context):
            self._streams.tenant(context)
            deadline = _deadline(context)
            entries = await self._backend.repository(deadline)
            descriptions = await asyncio.gather(
                *(self._describe_listed(entry, deadline) for entry in entries)
            )
            return pb.ListModelsResponse(models=convert.model_listing(entries, descriptions))

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


def _count_property_result(model: str, outcome: PropertyOutcome) -> None:
    """Failed properties inside an OK stream included. `model` is a name Triton serves:
    property results follow the plan, which described the classifier."""
    score, error = outcome.score, outcome.error
    if score is None or error is not None:
        code = status_code(error) if isinstance(error, PropscopeError) else grpc.StatusCode.INTERNAL
        status = GO_CODE_NAMES[code]  # spelt as grpc_server_handled_total's grpc_code
        significant = relevant = flipped = ""
    else:
        status = "OK"
        significant, relevant, flipped = (
            str(flag).lower()
            for flag in (score.significant, score.relevant, score.prediction_flipped)
        )
    metrics.PROPERTY_RESULTS.labels(
        model=model, status=status, significant=significant, relevant=relevant, flipped=flipped
    ).inc()


@asynccontextmanager
async def _observed(method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Maps domain errors to statuses, hides unexpected ones, and records the call's
    status and latency in the metrics and the log."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except StreamStalled as error:  # abort would wait for the client to read
        code = status_code(error)
        logger.warning("%s ended: %s", method, error)
        context.set_code(code)
        context.set_details(str(error))
    except PropscopeError as error:
        code = status_code(error)
        logger.info("%s refused: %s %s", method, code.name, error)
        await context.abort_with_status(rpc_status.to_status(convert.error_status(error)))
    except asyncio.CancelledError:
        code = cancelled_code(context)
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


class AttributionServicer(attribution_pb2_grpc.AttributionServiceServicer):
    def __init__(
        self, attribution: Attribution, evaluation: Evaluation, streams: MethodStreams
    ) -> None:
        self._attribution = attribution
        self._evaluation = evaluation
        self._streams = streams

    async def Attribute(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def to_message(spec: AttributeSpec, event: object) -> apb.AttributeEvent:
            if isinstance(event, AttributionOutcome):  # a large map is encoded off the loop
                return await in_thread(convert_attribution.attribute_event, spec.request_id, event)
            return convert_attribution.attribute_event(spec.request_id, event)

        await self._streams.stream(
            "Attribute",
            context,
            request,
            self._streams.spec_with_limits(convert_attribution.attribute_spec),
            self._attribution,
            lambda spec: method_name(spec.method),
            to_message,
        )

    async def EvaluateAttribution(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._streams.stream_events(
            "EvaluateAttribution",
            context,
            request,
            convert_attribution.evaluate_spec,
            self._evaluation,
            "evaluation",
            convert_attribution.evaluate_event,
        )


class CausalGraphServicer(graph_pb2_grpc.CausalGraphServiceServicer):
    """BuildGraph through the same MethodStreams as every method (auth, admission, the
    memory budget, deadlines, the runner)."""

    def __init__(self, graph: ExplanationMethod, streams: MethodStreams) -> None:
        self._graph = graph
        self._streams = streams

    async def BuildGraph(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._streams.stream_events(
            "BuildGraph",
            context,
            request,
            convert_graph.graph_spec,
            self._graph,
            "causal_graph",
            convert_graph.graph_event,
        )


class ConsistencyServicer(consistency_pb2_grpc.ConsistencyServiceServicer):
    """EvaluateConsistency through the same MethodStreams as every method."""

    def __init__(self, consistency: ExplanationMethod, streams: MethodStreams) -> None:
        self._consistency = consistency
        self._streams = streams

    async def EvaluateConsistency(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._streams.stream_events(
            "EvaluateConsistency",
            context,
            request,
            convert_consistency.consistency_spec,
            self._consistency,
            "consistency",
            convert_consistency.consistency_event,
        )


class ConceptServicer(concepts_pb2_grpc.ConceptServiceServicer):
    """FitConcepts and DecomposeConcept through the same MethodStreams as every method;
    GetConceptBank and ConceptMaps read a stored bank (one forward pass for a map)."""

    def __init__(self, craft: Craft, streams: MethodStreams) -> None:
        self._craft = craft
        self._streams = streams

    async def _fit_stream(
        self,
        rpc: str,
        request: PendingRequest,
        context: grpc.aio.ServicerContext,
        to_spec: Any,
        kind: type[cpb.FitConceptsEvent | cpb.DecomposeConceptEvent],
    ) -> None:
        await self._streams.stream_events(
            rpc,
            context,
            request,
            to_spec,
            self._craft,
            "craft",
            lambda request_id, event: convert_concepts.fit_event(request_id, event, kind),
            off_loop=True,
        )

    async def FitConcepts(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._fit_stream(
            "FitConcepts", request, context, convert_concepts.fit_spec, cpb.FitConceptsEvent
        )

    async def DecomposeConcept(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._fit_stream(
            "DecomposeConcept",
            request,
            context,
            convert_concepts.decompose_spec,
            cpb.DecomposeConceptEvent,
        )

    async def GetConceptBank(  # noqa: N802 - gRPC method name
        self, request: cpb.GetConceptBankRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ConceptBank:
        async with _observed("GetConceptBank", context):
            tenant = self._streams.tenant(context)
            bank = await self._craft.bank(
                convert_concepts.bank_ref(request, tenant), _deadline(context)
            )
            return await in_thread(convert_concepts.bank_message, bank)

    async def ConceptMaps(  # noqa: N802 - gRPC method name
        self, request: cpb.ConceptMapsRequest, context: grpc.aio.ServicerContext
    ) -> cpb.ConceptMapsResponse:
        async with _observed("ConceptMaps", context):
            tenant = self._streams.tenant(context)
            spec = await in_thread(
                convert_concepts.maps_spec, request, self._streams.limits, tenant
            )
            maps = await self._craft.maps(spec, _deadline(context))
            return await in_thread(convert_concepts.maps_message, maps)


class VisualizationServicer(visualization_pb2_grpc.VisualizationServiceServicer):
    """Visualize (MACO) through the same MethodStreams as every method."""

    def __init__(self, maco: ExplanationMethod, streams: MethodStreams) -> None:
        self._maco = maco
        self._streams = streams

    async def Visualize(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._streams.stream_events(
            "Visualize",
            context,
            request,
            convert_visualization.visualize_spec,
            self._maco,
            "maco",
            convert_visualization.visualize_event,
            off_loop=True,  # the done event's PNGs
        )


class InteractionServicer(interactions_pb2_grpc.InteractionServiceServicer):
    """Interactions through the same MethodStreams as every method; InteractionDesign
    answers the design's rows (pure: no model is asked)."""

    def __init__(self, interactions: ExplanationMethod, streams: MethodStreams) -> None:
        self._interactions = interactions
        self._streams = streams

    async def Interactions(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        await self._streams.stream_events(
            "Interactions",
            context,
            request,
            convert_interactions.interactions_spec,
            self._interactions,
            "interactions",
            convert_interactions.interactions_event,
        )

    async def InteractionDesign(  # noqa: N802 - gRPC method name
        self, request: ipb.InteractionDesignRequest, context: grpc.aio.ServicerContext
    ) -> ipb.InteractionDesignResponse:
        async with _observed("InteractionDesign", context):
            self._streams.tenant(context)
            spec = await in_thread(convert_interactions.design_spec, request, self._streams.limits)
            rows = await in_thread(convert_interactions.design_rows, spec)
            return await in_thread(convert_interactions.design_response, rows)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value (None: the client set none)."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None else None
