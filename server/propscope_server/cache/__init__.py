"""The artefact cache (edited paths, attribution maps): Redis when configured, else an
in-process LRU."""

from propscope_server.cache.artefacts import (
    ArtefactCache,
    InMemoryArtefactCache,
    RedisArtefactCache,
    artefact_key,
    decode_array,
    encode_array,
    path_key,
)

__all__ = [
    "ArtefactCache",
    "InMemoryArtefactCache",
    "RedisArtefactCache",
    "artefact_key",
    "decode_array",
    "encode_array",
    "path_key",
]
