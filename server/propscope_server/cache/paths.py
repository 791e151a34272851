"""Edited paths keyed by everything that determines them.

A value is the path as a compressed npz, prefixed with the SHA-256 of that
payload: a value that fails the check (corrupted, truncated) is a miss.
Cache failures never fail a request: they count as misses and are logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from collections import OrderedDict
from typing import Protocol

import numpy as np
import redis.asyncio as aioredis

from propscope_server import metrics

KEY_PREFIX = "propscope:path:v1:"
DIGEST_BYTES = 32

logger = logging.getLogger(__name__)


def path_key(
    image_digest: str,
    editor: str,
    editor_version: str,
    parameters: str,
    strengths: np.ndarray,
    seed: int,
) -> str:
    """The key of one edited path. `image_digest` hashes the decoded pixels, so the
    same picture re-encoded still hits."""
    hasher = hashlib.sha256()
    for part in (image_digest, editor, editor_version, parameters, str(seed)):
        hasher.update(part.encode())
        hasher.update(b"\0")
    hasher.update(np.asarray(strengths, dtype=np.float32).tobytes())
    return KEY_PREFIX + hasher.hexdigest()


def encode_path(path: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, path=path)
    payload = buffer.getvalue()
    return hashlib.sha256(payload).digest() + payload


def decode_path(value: bytes) -> np.ndarray | None:
    """The path, or None when the value is not one we wrote intact."""
    digest, payload = value[:DIGEST_BYTES], value[DIGEST_BYTES:]
    if hashlib.sha256(payload).digest() != digest:
        return None
    try:
        archive = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        return None
    with archive:
        return archive["path"] if "path" in archive.files else None


class PathCache(Protocol):
    name: str

    async def get(self, key: str) -> np.ndarray | None: ...

    async def put(self, key: str, path: np.ndarray) -> None: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


class InMemoryPathCache:
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
        return decode_path(value)

    async def put(self, key: str, path: np.ndarray) -> None:
        value = encode_path(path)
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


class RedisPathCache:
    """Shared mode. Every call is bounded by `timeout_s`; a slow or absent Redis
    degrades to misses instead of failing the request."""

    name = "redis"

    def __init__(self, url: str, ttl_s: int, timeout_s: float) -> None:
        self._redis = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s

    async def get(self, key: str) -> np.ndarray | None:
        try:
            value = await asyncio.wait_for(self._redis.get(key), self._timeout_s)
        except (aioredis.RedisError, OSError, TimeoutError) as error:
            metrics.CACHE_ERRORS.inc()
            logger.warning("cache read failed, treating as a miss: %s", error)
            return None
        if value is None:
            return None
        path = decode_path(value)
        if path is None:
            logger.warning("cache value for %s failed its integrity check; treating as a miss", key)
        return path

    async def put(self, key: str, path: np.ndarray) -> None:
        value = await asyncio.to_thread(encode_path, path)
        try:
            await asyncio.wait_for(self._redis.set(key, value, ex=self._ttl_s), self._timeout_s)
        except (aioredis.RedisError, OSError, TimeoutError) as error:
            metrics.CACHE_ERRORS.inc()
            logger.warning("cache write failed, path not cached: %s", error)
            return
        metrics.CACHE_BYTES_WRITTEN.inc(len(value))

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self._redis.ping(), self._timeout_s))
        except (aioredis.RedisError, OSError, TimeoutError):
            return False

    async def eviction_policy(self) -> str | None:
        """Redis's maxmemory-policy, or None when it cannot be read (managed Redis often
        forbids CONFIG)."""
        try:
            config = await asyncio.wait_for(
                self._redis.config_get("maxmemory-policy"), self._timeout_s
            )
        except (aioredis.RedisError, OSError, TimeoutError):
            return None
        value = config.get(b"maxmemory-policy") or config.get("maxmemory-policy")
        return value.decode() if isinstance(value, bytes) else value

    async def close(self) -> None:
        await self._redis.aclose()
