"""A plaintext gRPC health probe of a gateway: the container health check and the dev stack's
readiness wait share it."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def health_status(target: str, service: str = "", timeout_s: float = 5.0) -> int | None:
    """The gateway's plaintext gRPC health status of `service`; None when it does not answer."""
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s).status
        except grpc.RpcError:
            return None
