"""Assemble the gateway: servicer, standard health, reflection, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from propscope.v1 import explain_pb2, explain_pb2_grpc
from propscope_server.api.servicer import ExplainServicer
from propscope_server.backends.triton import TritonBackend
from propscope_server.cache import InMemoryPathCache, PathCache, RedisPathCache
from propscope_server.config import Settings
from propscope_server.orchestration.explain import Explainer

SERVICE_NAME = explain_pb2.DESCRIPTOR.services_by_name["ExplainService"].full_name
SHUTDOWN_GRACE_S = 10.0

logger = logging.getLogger(__name__)


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    backend: TritonBackend
    cache: PathCache
    health: health.aio.HealthServicer
    settings: Settings
    _health_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        await self._update_health()
        self._health_task = asyncio.create_task(self._poll_health())

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Health goes NOT_SERVING first, then in-flight streams get `grace_s`."""
        await self.health.enter_graceful_shutdown()
        if self._health_task:
            self._health_task.cancel()
        await self.server.stop(grace_s)
        await self.backend.close()
        await self.cache.close()

    async def _update_health(self) -> None:
        triton_ok, cache_ok = await asyncio.gather(self.backend.is_ready(), self.cache.ping())
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if triton_ok and cache_ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_poll_s)
            with contextlib.suppress(Exception):
                await self._update_health()


def make_cache(settings: Settings) -> PathCache:
    if settings.redis_url:
        return RedisPathCache(settings.redis_url, settings.cache_ttl_s, settings.cache_timeout_s)
    return InMemoryPathCache(settings.memory_cache_bytes)


def build_gateway(settings: Settings) -> Gateway:
    """A gateway bound to its port but not started; port 0 picks a free one."""
    backend = TritonBackend(settings.triton_url, settings.triton_timeout_s)
    cache = make_cache(settings)
    explainer = Explainer(backend, cache, settings)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", settings.limits.max_request_bytes)]
    )
    explain_pb2_grpc.add_ExplainServiceServicer_to_server(
        ExplainServicer(explainer, backend, settings.limits), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(settings.listen_address)
    if port == 0:
        raise RuntimeError(f"could not listen on {settings.listen_address}")
    return Gateway(server, port, backend, cache, health_servicer, settings)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr="127.0.0.1")
    gateway = build_gateway(settings)
    await gateway.start()
    if isinstance(gateway.cache, RedisPathCache):
        policy = await gateway.cache.eviction_policy()
        if policy is not None and policy != "allkeys-lru":
            logger.warning(
                "Redis maxmemory-policy is %s; propscope expects allkeys-lru so that a full "
                "cache evicts old paths instead of refusing writes",
                policy,
            )
    logger.info(
        "propscope gateway listening on port %d (triton %s, cache %s)",
        gateway.port,
        settings.triton_url,
        gateway.cache.name,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info("shutting down")
    await gateway.stop()
