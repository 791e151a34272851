"""The cache of edited paths: Redis when configured, else an in-process LRU."""

from propscope_server.cache.paths import (
    InMemoryPathCache,
    PathCache,
    RedisPathCache,
    decode_path,
    encode_path,
    path_key,
)

__all__ = [
    "InMemoryPathCache",
    "PathCache",
    "RedisPathCache",
    "decode_path",
    "encode_path",
    "path_key",
]
