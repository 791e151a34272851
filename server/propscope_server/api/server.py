"""Assemble the gateway: servicer, standard health, reflection, metrics."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from propscope.v1 import (
    attribution_pb2,
    attribution_pb2_grpc,
    concepts_pb2,
    concepts_pb2_grpc,
    consistency_pb2,
    consistency_pb2_grpc,
    explain_pb2,
    explain_pb2_grpc,
    graph_pb2,
    graph_pb2_grpc,
    interactions_pb2,
    interactions_pb2_grpc,
    visualization_pb2,
    visualization_pb2_grpc,
)
from propscope_server import metrics
from propscope_server.api.admission import Admission
from propscope_server.api.auth import Authenticator, BearerTokenInterceptor
from propscope_server.api.memory import MemoryAdmission, MemoryBudget
from propscope_server.api.parsing import ParseRequestsInterceptor
from propscope_server.api.rpc_metrics import RpcMetricsInterceptor
from propscope_server.api.servicer import (
    AttributionServicer,
    CausalGraphServicer,
    ConceptServicer,
    ConsistencyServicer,
    ExplainServicer,
    InteractionServicer,
    MethodStreams,
    VisualizationServicer,
)
from propscope_server.backends.model_health import health_service
from propscope_server.backends.triton import TritonBackend
from propscope_server.backends.triton_endpoints import TritonEndpoints
from propscope_server.cache import ArtefactCache, InMemoryArtefactCache
from propscope_server.cache.redis_cache import RedisArtefactCache
from propscope_server.config import Settings, TlsSettings
from propscope_server.methods.attribution import Attribution
from propscope_server.methods.causal_graph import CausalGraph
from propscope_server.methods.consistency import Consistency
from propscope_server.methods.craft import Craft
from propscope_server.methods.evaluation import Evaluation
from propscope_server.methods.interactions import Interactions
from propscope_server.methods.maco import Maco
from propscope_server.orchestration.explain import Explainer

SERVICE_NAME = explain_pb2.DESCRIPTOR.services_by_name["ExplainService"].full_name
ATTRIBUTION_SERVICE_NAME = attribution_pb2.DESCRIPTOR.services_by_name[
    "AttributionService"
].full_name
GRAPH_SERVICE_NAME = graph_pb2.DESCRIPTOR.services_by_name["CausalGraphService"].full_name
CONCEPT_SERVICE_NAME = concepts_pb2.DESCRIPTOR.services_by_name["ConceptService"].full_name
CONSISTENCY_SERVICE_NAME = consistency_pb2.DESCRIPTOR.services_by_name[
    "ConsistencyService"
].full_name
VISUALIZATION_SERVICE_NAME = visualization_pb2.DESCRIPTOR.services_by_name[
    "VisualizationService"
].full_name
INTERACTION_SERVICE_NAME = interactions_pb2.DESCRIPTOR.services_by_name[
    "InteractionService"
].full_name
# Every propscope.v1 service: each is reported by grpc.health.v1 and listed by reflection.
PROPSCOPE_SERVICES = (
    SERVICE_NAME,
    ATTRIBUTION_SERVICE_NAME,
    GRAPH_SERVICE_NAME,
    CONCEPT_SERVICE_NAME,
    CONSISTENCY_SERVICE_NAME,
    VISUALIZATION_SERVICE_NAME,
    INTERACTION_SERVICE_NAME,
)
# A health service of its own: the cache being down degrades the gateway (slower,
# uncached) but does not stop it serving, so it must not flip the overall status.
CACHE_HEALTH_SERVICE = "propscope.cache"
# SERVING while the event loop answers, whatever the dependencies: for liveness probes,
# which must not restart a gateway because Triton is down.
LIVENESS_SERVICE = "propscope.liveness"
HEALTH_METHODS = frozenset(
    f"/{health.SERVICE_NAME}/{method}" for method in ("Check", "Watch", "List")
)
REFLECTION_METHODS = frozenset(
    f"/{service}/ServerReflectionInfo"
    for service in (reflection.SERVICE_NAME, "grpc.reflection.v1.ServerReflection")
)
# Pings find dead peers, whose streams would otherwise hold their admission slots; aged
# connections are closed gracefully so that clients re-resolve and reach new replicas.
CONNECTION_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_connection_age_ms", 30 * 60_000),
    ("grpc.max_connection_age_grace_ms", 60 * 60_000),
    # gRPC binds with SO_REUSEPORT by default: a second gateway started on a port in use
    # would listen beside the first and the kernel would split callers between them.
    ("grpc.so_reuseport", 0),
]
# HTTP/2 streams of one connection, open in any state (admitted, refused, or ended by
# the gateway but not yet read by a client that stopped reading); more wait client-side.
MAX_HTTP2_STREAMS_PER_CONNECTION = 100
# Below this memory budget no real request fits (a small image's Explain needs tens of MiB).
SMALL_REQUEST_BYTES = 64 * 2**20
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

logger = logging.getLogger(__name__)


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    backend: TritonBackend
    cache: ArtefactCache
    health: health.aio.HealthServicer
    settings: Settings
    authenticated: bool
    health_server: grpc.aio.Server | None = None
    _health_task: asyncio.Task | None = None
    _healthy: dict[str, bool] = field(default_factory=dict)

    async def start(self) -> None:
        """Health is known before the first caller or probe can ask."""
        await self.health.set(LIVENESS_SERVICE, SERVING)
        await self._update_health()
        await self.server.start()
        if self.health_server:
            await self.health_server.start()
        self._health_task = asyncio.create_task(self._poll_health())

    async def stop(self) -> None:
        """Health goes NOT_SERVING first; after `shutdown_drain_s`, while load balancers
        stop sending, new calls are refused and in-flight streams get `shutdown_grace_s`."""
        if self._health_task:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        await asyncio.sleep(self.settings.shutdown_drain_s)
        await self.server.stop(self.settings.shutdown_grace_s)
        if self.health_server:
            await self.health_server.stop(0)
        await self.backend.close()
        await self.cache.close()

    async def _update_health(self) -> None:
        triton_ok, cache_ok = await asyncio.gather(self.backend.is_live(), self.cache.ping())
        for dependency, ok in (("triton", triton_ok), ("cache", cache_ok)):
            metrics.DEPENDENCY_UP.labels(dependency=dependency).set(ok)
            if self._healthy.get(dependency, True) != ok:
                log = logger.info if ok else logger.warning
                log("%s is %s", dependency, "reachable again" if ok else "unreachable")
            self._healthy[dependency] = ok
        for service in ("", *PROPSCOPE_SERVICES):
            await self.health.set(service, SERVING if triton_ok else NOT_SERVING)
        await self.health.set(CACHE_HEALTH_SERVICE, SERVING if cache_ok else NOT_SERVING)

    async def _poll_health(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_poll_s)
            try:
                await self._update_health()
            except Exception:  # the poll must outlive any one failure
                logger.exception("health poll failed")


def make_cache(settings: Settings) -> ArtefactCache:
    if settings.redis_url:
        return RedisArtefactCache(
            settings.redis_url,
            settings.cache_ttl_s,
            settings.cache_timeout_s,
            settings.cache_retry_after_s,
        )
    return InMemoryArtefactCache(settings.memory_cache_bytes)


def interceptors(settings: Settings, authenticator: Authenticator) -> list:
    """Metrics around everything (refusals included); then authentication: an
    unauthenticated caller learns nothing, not even whether its message parses."""
    if not authenticator.enabled:
        return [RpcMetricsInterceptor(), ParseRequestsInterceptor()]
    open_methods = frozenset()
    if settings.auth.health_open:
        open_methods |= HEALTH_METHODS
    if settings.auth.reflection_open:
        open_methods |= REFLECTION_METHODS
    return [
        RpcMetricsInterceptor(),
        BearerTokenInterceptor(authenticator, open_methods),
        ParseRequestsInterceptor(),
    ]


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """None without a certificate; a client CA makes client certificates mandatory."""
    if tls.cert_file is None and tls.key_file is None and tls.client_ca_file is None:
        return None
    if tls.cert_file is None or tls.key_file is None:
        raise ValueError(
            "TLS needs both PROPSCOPE_TLS__CERT_FILE and PROPSCOPE_TLS__KEY_FILE "
            "(a client CA alone would silently leave the port in plaintext)"
        )
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def build_gateway(settings: Settings) -> Gateway:
    """A gateway bound to its port but not started; port 0 picks a free one."""
    endpoints = TritonEndpoints(
        settings.triton_url,
        settings.triton_endpoint_retry_s,
        settings.triton_resolve_interval_s,
        settings.triton_metadata_timeout_s,
    )
    backend = TritonBackend(
        endpoints,
        settings.triton_timeout_s,
        settings.triton_retries,
        settings.triton_retry_backoff_s,
        settings.triton_metadata_timeout_s,
        settings.model_heal_backoff_s,
        settings.model_heal_backoff_max_s,
        settings.load_on_demand,
    )
    cache = make_cache(settings)
    explainer = Explainer(backend, cache, settings)
    authenticator = Authenticator(settings.auth.token_tenants())
    server = grpc.aio.server(
        interceptors=interceptors(settings, authenticator),
        options=[
            ("grpc.max_receive_message_length", settings.limits.max_request_bytes),
            # HTTP/2 streams per connection, whatever their state: a stream that admission
            # has let go but whose client never reads stays open until the client reads.
            ("grpc.max_concurrent_streams", MAX_HTTP2_STREAMS_PER_CONNECTION),
            *CONNECTION_OPTIONS,
        ],
    )
    budget = MemoryBudget(settings.memory_budget())
    logger.info("memory budget for requests: %d MiB", budget.budget_bytes // 2**20)
    if budget.budget_bytes < SMALL_REQUEST_BYTES:
        logger.warning(
            "memory budget of %d MiB leaves no room for a request: every one will be refused; "
            "raise the container's memory limit or set PROPSCOPE_MEMORY_BUDGET_BYTES",
            budget.budget_bytes // 2**20,
        )
    streams = MethodStreams(
        settings.limits,
        authenticator,
        Admission(settings.limits),
        MemoryAdmission(budget, settings, backend),
    )
    explain_pb2_grpc.add_ExplainServiceServicer_to_server(
        ExplainServicer(explainer, backend, streams), server
    )
    attribution_pb2_grpc.add_AttributionServiceServicer_to_server(
        AttributionServicer(
            Attribution(backend, cache, settings), Evaluation(backend, settings), streams
        ),
        server,
    )
    graph_pb2_grpc.add_CausalGraphServiceServicer_to_server(
        CausalGraphServicer(CausalGraph(backend, settings), streams), server
    )
    concepts_pb2_grpc.add_ConceptServiceServicer_to_server(
        ConceptServicer(Craft(backend, cache, settings), streams), server
    )
    consistency_pb2_grpc.add_ConsistencyServiceServicer_to_server(
        ConsistencyServicer(Consistency(backend, settings), streams), server
    )
    visualization_pb2_grpc.add_VisualizationServiceServicer_to_server(
        VisualizationServicer(Maco(backend, cache, settings), streams), server
    )
    interactions_pb2_grpc.add_InteractionServiceServicer_to_server(
        InteractionServicer(Interactions(backend, cache, settings), streams), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    backend.model_health.listen(  # propscope.model.<name>: NOT_SERVING while it is sick
        lambda model, ok: health_servicer.set(health_service(model), SERVING if ok else NOT_SERVING)
    )
    reflection.enable_server_reflection(
        (*PROPSCOPE_SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME),
        server,
    )
    port = _listen(
        server, settings.listen_address, "listen_address", server_credentials(settings.tls)
    )
    host = settings.listen_address.rsplit(":", 1)[0]
    if not authenticator.enabled and host not in ("127.0.0.1", "localhost", "[::1]"):
        logger.warning("no tokens configured: any caller that reaches the port is served")
    health_server = None
    if settings.health_listen_address:
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        _listen(health_server, settings.health_listen_address, "health_listen_address")
    return Gateway(
        server,
        port,
        backend,
        cache,
        health_servicer,
        settings,
        authenticator.enabled,
        health_server,
    )


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.metrics_address)
    gateway = build_gateway(settings)
    await gateway.start()
    if isinstance(gateway.cache, RedisArtefactCache):
        await gateway.cache.check_kind()
        policy = await gateway.cache.eviction_policy()
        if policy is not None and policy != "allkeys-lru":
            logger.warning(
                "Redis maxmemory-policy is %s; propscope expects allkeys-lru so that a full "
                "cache evicts old paths instead of refusing writes",
                policy,
            )
    logger.info(
        "propscope gateway listening on port %d (%s, auth %s; triton %s, cache %s)",
        gateway.port,
        "TLS" if settings.tls.cert_file else "plaintext",
        "on" if gateway.authenticated else "off",
        settings.triton_url,
        gateway.cache.name,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logger.info(
        "shutting down: NOT_SERVING now, refusing new calls in %.1f s, streams get %.1f s more",
        settings.shutdown_drain_s,
        settings.shutdown_grace_s,
    )
    await gateway.stop()
    logger.info("stopped")


class ListenError(RuntimeError):
    """The gateway cannot take its address; the message names the setting to change."""


def _listen(
    server: grpc.aio.Server,
    address: str,
    setting: str,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """The port bound, or ListenError."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio raises where older versions returned 0
        port = 0
    if port == 0:
        raise ListenError(
            f"could not listen on {address}: the port is in use (another gateway?) or not "
            f"allowed; set {setting} (PROPSCOPE_{setting.upper()}) to a free address"
        )
    return port
