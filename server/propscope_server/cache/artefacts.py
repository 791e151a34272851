"""Artefacts that are deterministic given their inputs (edited paths, attribution
maps) keyed by everything that determines them, in one namespace per tenant so that
no tenant can learn whether another sent the same image.

A value is the array as a compressed npz, prefixed with the SHA-256 of its key
and that payload: a value that fails the check (corrupted, truncated, or copied
from another key) is a miss. Cache failures never fail a request: they count as
misses and are logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis

from propscope_server import metrics

# Every key is "propscope:<kind>:v1:<namespace>:<sha256>"; the path kind's prefix:
KEY_PREFIX = "propscope:path:v1:"
DIGEST_BYTES = 32

logger = logging.getLogger(__name__)


def artefact_key(kind: str, namespace: str, parts: Sequence[str | bytes]) -> str:
    """The key of one artefact of `kind` determined by `parts` (in order)."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode() if isinstance(part, str) else part)
        hasher.update(b"\0")
    return f"propscope:{kind}:v1:{namespace}:{hasher.hexdigest()}"


def path_key(
    namespace: str,
    image_digest: str,
    editor: str,
    editor_version: str,
    parameters: str,
    strengths: np.ndarray,
    seed: int,
) -> str:
    """The key of one edited path. `image_digest` hashes the decoded pixels, so the
    same picture re-encoded still hits."""
    return artefact_key(
        "path",
        namespace,
        (
            image_digest,
            editor,
            editor_version,
            parameters,
            str(seed),
            np.asarray(strengths, dtype=np.float32).tobytes(),
        ),
    )


def _value_digest(key: str, payload: bytes) -> bytes:
    return hashlib.sha256(key.encode() + b"\0" + payload).digest()


def encode_array(key: str, array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, path=array)  # "path": the name values were first written under
    payload = buffer.getvalue()
    return _value_digest(key, payload) + payload


def decode_array(key: str, value: bytes) -> np.ndarray | None:
    """The array, or None when the value is not one we wrote intact under `key`."""
    digest, payload = value[:DIGEST_BYTES], value[DIGEST_BYTES:]
    if _value_digest(key, payload) != digest:
        return None
    try:
        archive = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        return None
    with archive:
        return archive["path"] if "path" in archive.files else None


class ArtefactCache(Protocol):
    name: str

    async def get(self, key: str) -> np.ndarray | None: ...

    async def put(self, key: str, array: np.ndarray) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class InMemoryArtefactCache:
    """Single-node mode: an LRU bounded by the bytes of its encoded values."""

    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    async def get(self, key: str) -> np.ndarray | None:
        value = self._entries.get(key)
        if value is None:
            return None
        self._entries.move_to_end(key)
        return await asyncio.to_thread(_checked, key, value)

    async def put(self, key: str, array: np.ndarray) -> None:
        value = await asyncio.to_thread(encode_array, key, array)
        if len(value) > self._max_bytes:
            return
        if key in self._entries:
            self._bytes -= len(self._entries.pop(key))
        self._entries[key] = value
        self._bytes += len(value)
        metrics.CACHE_BYTES_WRITTEN.inc(len(value))
        while self._bytes > self._max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._entries.clear()


def _checked(key: str, value: bytes) -> np.ndarray | None:
    metrics.CACHE_BYTES_READ.inc(len(value))
    path = decode_array(key, value)
    if path is None:
        metrics.CACHE_REJECTED_VALUES.inc()
        logger.warning("cache value for %s failed its integrity check; treating as a miss", key)
    return path


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
        return None if value is None else await asyncio.to_thread(_checked, key, value)

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
