"""Path cache: integrity-checked values bound to their key, tenant-namespaced keys,
the in-memory LRU, Redis degrading to misses and coming back."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis.exceptions as redis_errors

from propscope_server.cache.artefacts import (
    DIGEST_BYTES,
    HEADER_LENGTH,
    KEY_PREFIX,
    MAGIC,
    InMemoryArtefactCache,
    decode_array,
    encode_array,
    path_key,
)
from propscope_server.cache.redis_cache import RedisArtefactCache

PATH = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)


def random_path(seed: int, size: int = 2000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def keyed_digest(key: str, payload: bytes) -> bytes:
    return hashlib.sha256(key.encode() + b"\0" + payload).digest()


def test_round_trip():
    decoded = decode_array("k", encode_array("k", PATH))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, PATH)


@pytest.mark.parametrize("where", [0, DIGEST_BYTES, DIGEST_BYTES + 40, -1])
def test_flipped_byte_is_a_miss(where):
    value = bytearray(encode_array("k", PATH))
    value[where] ^= 0x01
    assert decode_array("k", bytes(value)) is None


@pytest.mark.parametrize("keep", [0, 10, DIGEST_BYTES, DIGEST_BYTES + 10, -1])
def test_truncated_value_is_a_miss(keep):
    value = encode_array("k", PATH)
    assert decode_array("k", value[:keep]) is None


def test_digest_matching_garbage_is_a_miss():
    payload = b"not an npz archive"
    assert decode_array("k", keyed_digest("k", payload) + payload) is None


def test_a_value_copied_to_another_key_is_a_miss():
    """An intact value under the wrong key (another tenant's, a swapped entry)."""
    assert decode_array("other", encode_array("k", PATH)) is None


BASE = dict(
    namespace="team-a",
    image_digest="abc",
    editor="procedural",
    editor_version="1",
    parameters='{"operation":"hue"}',
    strengths=np.array([0.5, 1.0], np.float32),
    seed=7,
)


def test_key_is_stable_for_equal_inputs():
    key = path_key(**BASE)
    assert key.startswith(KEY_PREFIX + "team-a:") and len(key) == len(KEY_PREFIX) + 7 + 64
    assert path_key(**{**BASE, "strengths": [0.5, 1.0]}) == key


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("namespace", "team-b"),
        ("image_digest", "abd"),
        ("editor", "diffusion"),
        ("editor_version", "2"),
        ("parameters", '{"operation":"blur"}'),
        ("strengths", np.array([0.5, 0.75], np.float32)),
        ("strengths", np.array([0.5, 1.0, 1.0], np.float32)),
        ("seed", 8),
    ],
)
def test_key_changes_with_each_input(field, value):
    assert path_key(**{**BASE, field: value}) != path_key(**BASE)


def test_key_parts_do_not_run_together():
    assert path_key(**{**BASE, "editor": "ab", "editor_version": "c"}) != path_key(
        **{**BASE, "editor": "a", "editor_version": "bc"}
    )


def sizes(*paths: np.ndarray) -> list[int]:
    return [len(encode_array("k", p)) for p in paths]


async def test_memory_cache_get_put():
    cache = InMemoryArtefactCache(max_bytes=1 << 20)
    assert await cache.get("k") is None
    await cache.put("k", PATH)
    np.testing.assert_array_equal(await cache.get("k"), PATH)
    assert await cache.ping()
    await cache.close()
    assert await cache.get("k") is None


@pytest.fixture
def abc() -> tuple[InMemoryArtefactCache, list[np.ndarray]]:
    paths = [random_path(i) for i in range(3)]
    lengths = sizes(*paths)
    budget = 2 * max(lengths)
    assert budget < 3 * min(lengths)  # two fit, three do not
    return InMemoryArtefactCache(max_bytes=budget), paths


async def test_lru_evicts_the_oldest(abc):
    cache, (a, b, c) = abc
    for key, path in zip("abc", (a, b, c), strict=True):
        await cache.put(key, path)
    assert await cache.get("a") is None
    np.testing.assert_array_equal(await cache.get("b"), b)
    np.testing.assert_array_equal(await cache.get("c"), c)


async def test_get_refreshes_recency(abc):
    cache, (a, b, c) = abc
    await cache.put("a", a)
    await cache.put("b", b)
    assert await cache.get("a") is not None
    await cache.put("c", c)
    assert await cache.get("b") is None
    np.testing.assert_array_equal(await cache.get("a"), a)
    np.testing.assert_array_equal(await cache.get("c"), c)


async def test_replacing_a_key_is_not_counted_twice(abc):
    cache, (a, b, _) = abc
    await cache.put("a", a)
    await cache.put("a", a)
    await cache.put("b", b)
    np.testing.assert_array_equal(await cache.get("a"), a)
    np.testing.assert_array_equal(await cache.get("b"), b)


async def test_value_over_budget_is_not_stored():
    small = random_path(0, 100)
    cache = InMemoryArtefactCache(max_bytes=sizes(small)[0] + 50)
    await cache.put("small", small)
    await cache.put("big", random_path(1, 5000))
    assert await cache.get("big") is None
    np.testing.assert_array_equal(await cache.get("small"), small)


UNREACHABLE = "redis://127.0.0.1:1/0"


async def test_unreachable_redis_degrades_to_misses():
    cache = RedisArtefactCache(UNREACHABLE, ttl_s=60, timeout_s=0.2, retry_after_s=0)
    try:
        assert await cache.get("k") is None
        await cache.put("k", PATH)  # must not raise
        assert await cache.ping() is False
        assert await cache.eviction_policy() is None
    finally:
        await cache.close()


class FakeRedis:
    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}
        self.expiry: dict[str, int] = {}

    async def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    async def set(self, key: str, value: bytes, ex: int) -> None:
        self.store[key], self.expiry[key] = value, ex

    async def ping(self) -> bool:
        return True

    async def config_get(self, name: str) -> dict[bytes, bytes]:
        return {name.encode(): b"allkeys-lru"}


async def test_eviction_policy_is_read_from_redis():
    cache = RedisArtefactCache(UNREACHABLE, ttl_s=60, timeout_s=0.2, retry_after_s=0)
    cache._redis = FakeRedis()
    assert await cache.eviction_policy() == "allkeys-lru"


class HangingRedis:
    async def _hang(self, *args, **kwargs) -> None:
        await asyncio.sleep(30)

    get = set = ping = _hang


async def test_after_a_failure_redis_is_skipped_until_a_ping_answers():
    """An outage must not cost every lookup a timeout; the health poll's ping ends it."""
    cache = RedisArtefactCache(UNREACHABLE, ttl_s=60, timeout_s=0.05, retry_after_s=3600)
    hanging = HangingRedis()
    cache._redis = hanging
    assert await cache.get("k") is None
    assert not cache.available
    fake = FakeRedis()
    cache._redis = fake
    await cache.put("k", PATH)
    assert fake.store == {}  # skipped, not tried
    assert await cache.ping()
    assert cache.available
    await cache.put("k", PATH)
    np.testing.assert_array_equal(await cache.get("k"), PATH)


async def test_slow_redis_is_bounded_by_the_timeout():
    """Each call would hang for 30 s; the cache's own timeout must answer first."""
    cache = RedisArtefactCache(UNREACHABLE, ttl_s=60, timeout_s=0.05, retry_after_s=0)
    cache._redis = HangingRedis()

    async def calls() -> tuple:
        return await cache.get("k"), await cache.put("k", PATH), await cache.ping()

    assert await asyncio.wait_for(calls(), timeout=20) == (None, None, False)


async def test_redis_cache_checks_integrity_and_sets_ttl():
    cache = RedisArtefactCache(UNREACHABLE, ttl_s=60, timeout_s=0.2, retry_after_s=0)
    fake = FakeRedis()
    cache._redis = fake
    await cache.put("k", PATH)
    assert fake.expiry == {"k": 60}
    np.testing.assert_array_equal(await cache.get("k"), PATH)
    fake.store["k"] = fake.store["k"][:-1]
    assert await cache.get("k") is None
    assert await cache.get("absent") is None


def test_a_value_with_a_valid_digest_in_another_format_is_a_miss():
    """An npy array (as the v1 format held) is not read as one of ours."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    payload = buffer.getvalue()
    assert decode_array("k", keyed_digest("k", payload) + payload) is None


def payload_of(header: dict, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return MAGIC + HEADER_LENGTH.pack(len(encoded)) + encoded + zlib.compress(data)


@pytest.mark.parametrize(
    ("header", "data"),
    [
        ({"dtype": "|u1", "shape": [4]}, bytes(10**6)),  # inflates past its declared size
        ({"dtype": "|u1", "shape": [8]}, bytes(4)),  # shorter than declared
        ({"dtype": "|O", "shape": [1]}, bytes(8)),  # objects are never ours
        ({"dtype": "|u1", "shape": [-4]}, bytes(4)),
        ({"dtype": "not a dtype", "shape": [4]}, bytes(4)),
        ({"shape": [4]}, bytes(4)),
        ({"dtype": "|u1", "shape": [1e300]}, bytes(4)),  # not an integer
        ({"dtype": "|u1", "shape": [0, 2**70]}, bytes(0)),
        ({"dtype": "|u1", "shape": [10**300]}, bytes(4)),  # past any inflation of its data
        ({"dtype": "|u1", "shape": [1] * 40}, bytes(1)),  # more dimensions than numpy has
    ],
)
def test_a_value_whose_header_does_not_match_its_data_is_a_miss(header, data):
    payload = payload_of(header, data)
    assert decode_array("k", keyed_digest("k", payload) + payload) is None


@pytest.mark.parametrize(
    "array",
    [np.float32(2.5) * np.ones(()), np.zeros((0, 3), np.uint8), np.arange(6, dtype=">f4")],
    ids=["0-d", "empty", "big-endian"],
)
def test_every_shape_and_byte_order_round_trips(array):
    decoded = decode_array("k", encode_array("k", array))
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


def test_values_decode_in_many_threads_at_once():
    """The gateway decodes values in threads at once. npz values failed there in CI,
    rarely (numpy parses their header with ast.literal_eval, whose state CPython 3.11
    shares between threads); this format needs no parser but json's."""
    values = [encode_array(f"k{i}", random_path(i).reshape(10, 20, 10)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        decoded = list(pool.map(lambda i: decode_array(f"k{i % 8}", values[i % 8]), range(4000)))
    for i, array in enumerate(decoded):
        np.testing.assert_array_equal(array, random_path(i % 8).reshape(10, 20, 10))


class RefusingRedis(FakeRedis):
    async def set(self, key: str, value: bytes, ex: int) -> None:
        raise redis_errors.ResponseError("OOM command not allowed when used memory > 'maxmemory'")


async def test_a_refused_value_does_not_turn_the_cache_off():
    """One value Redis will not take (too big, out of memory) is not an outage."""
    cache = RedisArtefactCache(UNREACHABLE, ttl_s=60, timeout_s=0.2, retry_after_s=3600)
    cache._redis = RefusingRedis()
    await cache.put("k", PATH)
    assert cache.available
