"""The VisualizationService servicer (MACO): protobuf to domain and back through the
same MethodStreams as every method (auth, admission, the memory budget, deadlines,
the runner)."""

from __future__ import annotations

import grpc

from propscope.v1 import visualization_pb2 as vpb
from propscope.v1 import visualization_pb2_grpc
from propscope_server.api import convert_visualization
from propscope_server.api.parsing import PendingRequest
from propscope_server.api.servicer import MethodStreams
from propscope_server.methods.base import ExplanationMethod
from propscope_server.threads import in_thread
from propscope_server.visualization_domain import VisualizeEvent, VisualizeSpec


class VisualizationServicer(visualization_pb2_grpc.VisualizationServiceServicer):
    def __init__(self, maco: ExplanationMethod, streams: MethodStreams) -> None:
        self._maco = maco
        self._streams = streams

    async def Visualize(  # noqa: N802 - gRPC method name
        self, request: PendingRequest, context: grpc.aio.ServicerContext
    ) -> None:
        async def to_message(spec: VisualizeSpec, event: VisualizeEvent) -> vpb.VisualizeEvent:
            # The done event's PNGs are encoded off the loop.
            return await in_thread(convert_visualization.visualize_event, spec.request_id, event)

        await self._streams.stream(
            "Visualize",
            context,
            request,
            self._streams.spec_with_limits(convert_visualization.visualize_spec),
            self._maco,
            lambda _: "maco",
            to_message,
        )
