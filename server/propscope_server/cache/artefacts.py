"""Artefacts that are deterministic given their inputs (edited paths, attribution
maps) keyed by everything that determines them, in one namespace per tenant so that
no tenant can learn whether another sent the same image.

A value is the array's dtype and shape (JSON) and its zlib-compressed bytes, prefixed
with the SHA-256 of its key and that payload: a value that fails the check (corrupted,
truncated, or copied from another key) is a miss. Not npz: numpy parses an npy header
with ast.literal_eval, which CPython 3.11 cannot run in several threads at once
("SystemError: AST constructor recursion depth mismatch", cpython gh-106905), and values
are decoded in threads. Cache failures never fail a request: they count as misses and
are logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import struct
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from propscope_server import metrics

# Every key is "propscope:<kind>:<version>:<namespace>:<sha256>"; the version names the
# value format (v1 held npz archives), so that a new format never reads an old value.
FORMAT_VERSION = "v2"
KEY_PREFIX = f"propscope:path:{FORMAT_VERSION}:"
DIGEST_BYTES = 32
# The payload: magic, the header's length (uint32, little-endian), the JSON header, the data.
MAGIC = b"PSAR"
HEADER_LENGTH = struct.Struct("<I")
MAX_HEADER_BYTES = 1024
NUMERIC_KINDS = "biuf"
MAX_DIMENSIONS = 32  # numpy's
MAX_DEFLATE_RATIO = 1032  # deflate's best case: 258 bytes from 2 bits

logger = logging.getLogger(__name__)


def artefact_key(kind: str, namespace: str, parts: Sequence[str | bytes]) -> str:
    """The key of one artefact of `kind` determined by `parts` (in order)."""
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode() if isinstance(part, str) else part)
        hasher.update(b"\0")
    return f"propscope:{kind}:{FORMAT_VERSION}:{namespace}:{hasher.hexdigest()}"


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
    header = json.dumps({"dtype": array.dtype.str, "shape": list(array.shape)}).encode()
    data = array.tobytes()  # C order, whatever the array's own layout
    payload = MAGIC + HEADER_LENGTH.pack(len(header)) + header + zlib.compress(data, 6)
    return _value_digest(key, payload) + payload


def decode_array(key: str, value: bytes) -> np.ndarray | None:
    """The array, or None when the value is not one we wrote intact under `key`."""
    digest, payload = value[:DIGEST_BYTES], value[DIGEST_BYTES:]
    if _value_digest(key, payload) != digest or not payload.startswith(MAGIC):
        return None
    start = len(MAGIC) + HEADER_LENGTH.size
    if len(payload) < start:
        return None
    (header_bytes,) = HEADER_LENGTH.unpack_from(payload, len(MAGIC))
    if header_bytes > MAX_HEADER_BYTES:
        return None
    try:
        header = json.loads(payload[start : start + header_bytes])
        dtype, shape = np.dtype(header["dtype"]), tuple(header["shape"])
    except (ValueError, TypeError, KeyError):
        return None
    if dtype.kind not in NUMERIC_KINDS or len(shape) > MAX_DIMENSIONS:
        return None
    if not all(type(n) is int and n >= 0 for n in shape):
        return None
    expected = math.prod(shape) * dtype.itemsize
    if expected > MAX_DEFLATE_RATIO * len(payload):  # more than its data could inflate to
        return None
    inflater = zlib.decompressobj()
    try:  # bounded: a value never inflates past the size its header declares
        data = inflater.decompress(payload[start + header_bytes :], expected + 1)
    except zlib.error:
        return None
    if len(data) != expected or not inflater.eof or inflater.unused_data:
        return None
    try:
        return np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    except ValueError:  # a dimension numpy cannot index (of an empty array)
        return None


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
        return await asyncio.to_thread(decode_checked, key, value)

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


def decode_checked(key: str, value: bytes) -> np.ndarray | None:
    metrics.CACHE_BYTES_READ.inc(len(value))
    path = decode_array(key, value)
    if path is None:
        metrics.CACHE_REJECTED_VALUES.inc()
        logger.warning("cache value for %s failed its integrity check; treating as a miss", key)
    return path
