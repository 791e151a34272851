"""The artefact cache (edited paths, attribution maps): the interface and keys the
core uses, and the in-process LRU; the Redis adapter is `cache.redis_cache`."""

from propscope_server.cache.artefacts import (
    ArtefactCache,
    InMemoryArtefactCache,
    artefact_key,
    decode_array,
    encode_array,
    path_key,
)

__all__ = [
    "ArtefactCache",
    "InMemoryArtefactCache",
    "artefact_key",
    "decode_array",
    "encode_array",
    "path_key",
]
