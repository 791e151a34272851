"""The shared artefact cache in Redis or a Redis Cluster: the adapter behind ArtefactCache
for gateways that share work (values are the same integrity-checked encoding as in
memory). REDIS_URL selects which (cache/redis_url.py)."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
)
from redis.retry import Retry

from propscope_server import metrics
from propscope_server.cache.artefacts import decode_checked, encode_array
from propscope_server.cache.redis_url import RedisTarget, host_port, parse_redis_url

logger = logging.getLogger(__name__)


# What says Redis is down or slow. A ResponseError (one command refused, e.g. out of
# memory) is about that value only and does not turn the cache off.
OUTAGE_ERRORS = (aioredis.ConnectionError, aioredis.TimeoutError, OSError, TimeoutError)
CACHE_ERRORS = (aioredis.RedisError, RedisClusterException, *OUTAGE_ERRORS)
# A larger value is not cached: it could not be written within the cache timeout, and
# one slow write must not look like an outage.
MAX_VALUE_BYTES = 32 * 1024 * 1024
# The scope of an outage that is not one cluster node's: one Redis, or the whole cluster.
EVERYWHERE = ""

# A URL of the wrong kind: what the ERROR line says, once.
PLAIN_URL_AT_CLUSTER = (
    "REDIS_URL {url} is a plain Redis URL but the server is a Redis Cluster node ({evidence}); "
    "write it as redis+cluster://host:port (rediss+cluster:// for TLS). "
    "The cache is off until the gateway restarts with that URL"
)
CLUSTER_URL_AT_PLAIN = (
    "REDIS_URL {url} is a Redis Cluster URL but the server has cluster mode disabled "
    "({evidence}); write it as redis://host:port/0 (rediss:// for TLS), or point it at a "
    "cluster node. The cache is off until the gateway restarts with that URL"
)


def connect(target: RedisTarget, timeout_s: float) -> aioredis.Redis | RedisCluster:
    """The client for `target`. In a cluster, one retry after a connection failure: it
    re-reads the slot map, so a key whose primary failed over is found on the new one;
    more would only spend the cache timeout."""
    if not target.cluster:
        return aioredis.from_url(
            target.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
    return RedisCluster.from_url(
        target.url,
        startup_nodes=[ClusterNode(host, port) for host, port in target.seeds[1:]],
        # A primary down without a replica leaves its slots unserved; the others serve.
        require_full_coverage=False,
        retry=Retry(NoBackoff(), retries=1),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )


class RedisArtefactCache:
    """Shared mode. Every call is bounded by `timeout_s`; a slow or absent Redis
    degrades to misses instead of failing the request. After a failure the cache
    is skipped for `retry_after_s` (or until a ping succeeds), so an outage costs
    each request nothing rather than a timeout per lookup. In a cluster that skip is
    per node: a node down turns its slots into misses while the others keep serving.

    A URL of the wrong kind (a cluster URL at a single Redis, a plain URL at a cluster
    node) turns the cache off with an error naming REDIS_URL and the fix, instead of
    stopping the gateway: it is only found once Redis answers, perhaps long after the
    start, and the gateway serves uncached without Redis anyway."""

    name = "redis"

    def __init__(self, url: str, ttl_s: int, timeout_s: float, retry_after_s: float) -> None:
        self._target = parse_redis_url(url)
        self._redis = connect(self._target, timeout_s)
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._skip_until: dict[str, float] = {}  # scope (EVERYWHERE or a node) -> until
        self._outages: set[str] = set()  # logged once when one starts and once when it ends
        self.misconfigured: str | None = None

    @property
    def available(self) -> bool:
        """Whether the cache is worth asking: rightly configured and not skipped whole."""
        return self.misconfigured is None and self._open(EVERYWHERE)

    def _open(self, scope: str) -> bool:
        return time.monotonic() >= self._skip_until.get(scope, 0.0)

    def _node_of(self, key: str) -> str:
        """The cluster node holding `key`'s slot, while the slot map is known."""
        if not isinstance(self._redis, RedisCluster):
            return EVERYWHERE
        try:
            node = self._redis.get_node_from_key(key)
        except SlotNotCoveredError:
            return EVERYWHERE
        return node.name if node else EVERYWHERE

    def _usable(self, key: str) -> str | None:
        """The key's scope, or None when the cache is skipped for it."""
        if not self.available:
            return None
        scope = self._node_of(key)
        return scope if self._open(scope) else None

    def _failed(self, operation: str, error: Exception, scope: str) -> None:
        metrics.CACHE_ERRORS.labels(operation=operation).inc()
        if self._wrong_kind(error):
            return
        # CLUSTERDOWN: that node serves no slot now (restarting, or the cluster lost a
        # primary while it requires full coverage); it is an outage, not a refused value.
        if isinstance(error, aioredis.ResponseError) and not isinstance(error, ClusterDownError):
            logger.warning("cache %s refused (%s); this value goes uncached", operation, error)
            return
        node = getattr(error, "connection", None)
        if isinstance(node, ClusterNode):
            scope = node.name
        if scope not in self._outages:
            logger.warning(
                "cache %s failed (%s: %s); going on without %s until it answers",
                operation,
                type(error).__name__,
                error,
                f"cache node {scope} (its slots are misses)" if scope else "the cache",
            )
            self._outages.add(scope)
        self._skip_until[scope] = time.monotonic() + self._retry_after_s

    def _wrong_kind(self, error: Exception) -> bool:
        """A URL of the wrong kind for the server turns the cache off (logged once)."""
        if self._target.cluster:
            cause = error.__cause__ if isinstance(error, RedisClusterException) else None
            if "Cluster mode is not enabled" not in str(cause):  # redis-py's words
                return False
            self._misconfigure(CLUSTER_URL_AT_PLAIN, str(cause))
            return True
        if not isinstance(error, AskError):  # MOVED or ASK: only cluster nodes say so
            return False
        self._misconfigure(PLAIN_URL_AT_CLUSTER, f"it redirected a key: {error}")
        return True

    def _misconfigure(self, template: str, evidence: str) -> None:
        if self.misconfigured is None:
            self.misconfigured = template.format(url=self._shown_url(), evidence=evidence)
            logger.error("%s", self.misconfigured)

    def _shown_url(self) -> str:
        """The URL without credentials or options."""
        if self._target.cluster:
            scheme = self._target.url.partition(":")[0]
            seeds = ",".join(host_port(host, port) for host, port in self._target.seeds)
            return f"{scheme}+cluster://{seeds}"
        scheme, _, rest = self._target.url.partition("://")
        # redis-py reads a password from the query too (?password=...).
        return f"{scheme}://{rest.rpartition('@')[2].partition('?')[0]}"

    def _recovered(self, scope: str) -> None:
        if scope in self._outages:
            self._outages.discard(scope)
            logger.info(
                "cache %sreachable again; caching resumes", f"node {scope} " if scope else ""
            )
        self._skip_until.pop(scope, None)

    async def get(self, key: str) -> np.ndarray | None:
        scope = self._usable(key)
        if scope is None:
            return None
        try:
            value = await asyncio.wait_for(self._redis.get(key), self._timeout_s)
        except CACHE_ERRORS as error:
            self._failed("get", error, scope)
            return None
        return None if value is None else await asyncio.to_thread(decode_checked, key, value)

    async def put(self, key: str, array: np.ndarray) -> None:
        scope = self._usable(key)
        if scope is None:
            return
        value = await asyncio.to_thread(encode_array, key, array)
        if len(value) > MAX_VALUE_BYTES:
            return
        try:
            await asyncio.wait_for(self._redis.set(key, value, ex=self._ttl_s), self._timeout_s)
        except CACHE_ERRORS as error:
            self._failed("put", error, scope)
            return
        metrics.CACHE_BYTES_WRITTEN.inc(len(value))

    async def ping(self) -> bool:
        """Always asks Redis (in a cluster: every primary, each on its own), so the
        health poll is what ends an outage early. False while any node is down."""
        if self.misconfigured is not None:
            return False
        if isinstance(self._redis, RedisCluster):
            return await self._ping_cluster(self._redis)
        try:
            answered = bool(await asyncio.wait_for(self._redis.ping(), self._timeout_s))
        except CACHE_ERRORS as error:
            self._failed("ping", error, EVERYWHERE)
            return False
        if answered:
            self._recovered(EVERYWHERE)
        return answered

    async def _ping_cluster(self, cluster: RedisCluster) -> bool:
        """Reads the slot map again while a node is out (a replica promoted in its place
        takes its slots: the lookups skipped for it go there), then pings each primary
        directly: a node that does not answer is skipped alone."""
        try:
            if any(self._outages):
                await asyncio.wait_for(cluster.nodes_manager.initialize(), self._timeout_s)
            else:
                await asyncio.wait_for(cluster.initialize(), self._timeout_s)
        except CACHE_ERRORS as error:
            self._failed("ping", error, EVERYWHERE)
            return False
        self._recovered(EVERYWHERE)
        primaries = cluster.get_primaries()
        for gone in self._outages - {node.name for node in primaries} - {EVERYWHERE}:
            logger.info("cache node %s holds no slots any more; its outage is over", gone)
            self._outages.discard(gone)
            self._skip_until.pop(gone, None)
        answers = await asyncio.gather(*(self._ping_node(node) for node in primaries))
        return all(answers)

    async def _ping_node(self, node: ClusterNode) -> bool:
        try:
            answered = bool(await asyncio.wait_for(node.execute_command("PING"), self._timeout_s))
        except CACHE_ERRORS as error:
            self._failed("ping", error, node.name)
            return False
        if answered:
            self._recovered(node.name)
        return answered

    async def check_kind(self) -> None:
        """At the start: a plain URL at a cluster node would only show itself at the
        first key redirected elsewhere (a cluster URL at a single Redis shows itself at
        the first ping). INFO may be forbidden (managed Redis): then the redirect tells."""
        if self._target.cluster:
            return
        try:
            info = await asyncio.wait_for(self._redis.info("cluster"), self._timeout_s)
        except CACHE_ERRORS:
            return
        if info.get("cluster_enabled"):
            self._misconfigure(PLAIN_URL_AT_CLUSTER, "INFO cluster says cluster_enabled:1")

    async def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy (in a cluster: one node's, as all should have the
        same), or None when it cannot be read (managed Redis often forbids CONFIG)."""
        try:
            config = await asyncio.wait_for(
                self._redis.config_get("maxmemory-policy"), self._timeout_s
            )
        except CACHE_ERRORS:
            return None
        value = config.get(b"maxmemory-policy") or config.get("maxmemory-policy")
        return value.decode() if isinstance(value, bytes) else value

    async def close(self) -> None:
        await self._redis.aclose()
