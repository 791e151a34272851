"""The shared artefact cache in Redis: the adapter behind ArtefactCache for gateways
that share work (values are the same integrity-checked encoding as in memory)."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
import redis.asyncio as aioredis

from propscope_server import metrics
from propscope_server.cache.artefacts import decode_checked, encode_array

logger = logging.getLogger(__name__)


# What says Redis is down or slow. A ResponseError (one command refused, e.g. out of
# memory) is about that value only and does not turn the cache off.
OUTAGE_ERRORS = (aioredis.ConnectionError, aioredis.TimeoutError, OSError, TimeoutError)
# A larger value is not cached: it could not be written within the cache timeout, and
# one slow write must not look like an outage.
MAX_VALUE_BYTES = 32 * 1024 * 1024


class RedisArtefactCache:
    """Shared mode. Every call is bounded by `timeout_s`; a slow or absent Redis
    degrades to misses instead of failing the request. After a failure the cache
    is skipped for `retry_after_s` (or until a ping succeeds), so an outage costs
    each request nothing rather than a timeout per lookup."""

    name = "redis"

    def __init__(self, url: str, ttl_s: int, timeout_s: float, retry_after_s: float) -> None:
        self._redis = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._skip_until = 0.0
        self._outage = False  # logged once when it starts and once when it ends

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, operation: str, error: Exception) -> None:
        metrics.CACHE_ERRORS.labels(operation=operation).inc()
        if isinstance(error, aioredis.ResponseError):
            logger.warning("cache %s refused (%s); this value goes uncached", operation, error)
            return
        if not self._outage:
            logger.warning(
                "cache %s failed (%s: %s); going on without the cache until it answers",
                operation,
                type(error).__name__,
                error,
            )
            self._outage = True
        self._skip_until = time.monotonic() + self._retry_after_s

    async def get(self, key: str) -> np.ndarray | None:
        if not self.available:
            return None
        try:
            value = await asyncio.wait_for(self._redis.get(key), self._timeout_s)
        except (aioredis.RedisError, *OUTAGE_ERRORS) as error:
            self._failed("get", error)
            return None
        return None if value is None else await asyncio.to_thread(decode_checked, key, value)

    async def put(self, key: str, array: np.ndarray) -> None:
        if not self.available:
            return
        value = await asyncio.to_thread(encode_array, key, array)
        if len(value) > MAX_VALUE_BYTES:
            return
        try:
            await asyncio.wait_for(self._redis.set(key, value, ex=self._ttl_s), self._timeout_s)
        except (aioredis.RedisError, *OUTAGE_ERRORS) as error:
            self._failed("put", error)
            return
        metrics.CACHE_BYTES_WRITTEN.inc(len(value))

    async def ping(self) -> bool:
        """Always asks Redis, so the health poll is what ends an outage early."""
        try:
            answered = bool(await asyncio.wait_for(self._redis.ping(), self._timeout_s))
        except (aioredis.RedisError, *OUTAGE_ERRORS) as error:
            self._failed("ping", error)
            return False
        if answered and self._outage:
            logger.info("cache reachable again; caching resumes")
            self._outage = False
            self._skip_until = 0.0
        return answered

    async def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy, or None when it cannot be read (managed Redis often
        forbids CONFIG)."""
        try:
            config = await asyncio.wait_for(
                self._redis.config_get("maxmemory-policy"), self._timeout_s
            )
        except (aioredis.RedisError, *OUTAGE_ERRORS):
            return None
        value = config.get(b"maxmemory-policy") or config.get("maxmemory-policy")
        return value.decode() if isinstance(value, bytes) else value

    async def close(self) -> None:
        await self._redis.aclose()
