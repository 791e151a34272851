"""REDIS_URL selects one Redis or a Redis Cluster; a malformed one is refused when the
settings load, naming REDIS_URL and the fix, and never echoing a password."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from redis.asyncio.cluster import RedisCluster

from propscope_server.cache.redis_cache import (
    CLUSTER_URL_AT_PLAIN,
    PLAIN_URL_AT_CLUSTER,
    RedisArtefactCache,
    connect,
)
from propscope_server.cache.redis_url import RedisTarget, parse_redis_url
from propscope_server.config import Settings


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://:pw@redis:6380/2", "unix:///run/redis.sock"]
)
def test_a_plain_url_is_one_redis_passed_as_it_is(url):
    assert parse_redis_url(url) == RedisTarget(url)
    assert not parse_redis_url(url).cluster


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis+cluster://127.0.0.1:7000",
            RedisTarget("redis://127.0.0.1:7000", (("127.0.0.1", 7000),)),
        ),
        (
            "REDIS+CLUSTER://redis-0.redis/0",
            RedisTarget("redis://redis-0.redis:6379", (("redis-0.redis", 6379),)),
        ),
        (
            "rediss+cluster://user:p%40ss@h1:7000,h2:7001,[::1]:7002/?ssl_cert_reqs=none",
            RedisTarget(
                "rediss://user:p%40ss@h1:7000?ssl_cert_reqs=none",
                (("h1", 7000), ("h2", 7001), ("::1", 7002)),
            ),
        ),
        (
            "redis+cluster://[fd00::1],h2",
            RedisTarget("redis://[fd00::1]:6379", (("fd00::1", 6379), ("h2", 6379))),
        ),
    ],
)
def test_a_cluster_url_lists_its_seed_nodes(url, expected):
    """The first seed carries the URL's credentials and options for redis-py to read."""
    target = parse_redis_url(url)
    assert target == expected
    assert target.cluster


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("127.0.0.1:6379", "not a URL"),
        ("http://127.0.0.1:6379", "scheme 'http' is not supported"),
        ("redis+sentinel://h:26379", "redis+cluster://"),
        ("redis+cluster://h:7000/1", "only database 0"),
        ("redis+cluster://h:port", "no valid port"),
        ("redis+cluster://h:0", "no valid port"),
        ("redis+cluster://h:65536", "no valid port"),
        ("redis+cluster://h1:7000,,h2:7001", "seed node '' is not host:port"),
        ("redis+cluster://::1:7000", "[addr]:port"),
        ("redis+cluster://[::1]7000", "[addr]:port"),
    ],
)
def test_a_malformed_url_names_redis_url_and_the_fix(url, names):
    with pytest.raises(ValueError, match="REDIS_URL") as refused:
        parse_redis_url(url)
    assert names in str(refused.value)


def test_a_refused_url_never_shows_its_password(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis+cluster://admin:s3cret@h1:7000/5")
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert "REDIS_URL" in message and "only database 0" in message
    assert "s3cret" not in message


def test_settings_accept_a_cluster_url(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis+cluster://h1:7000,h2:7000")
    assert Settings().redis_url == "redis+cluster://h1:7000,h2:7000"


async def test_a_cluster_url_makes_a_cluster_client_with_every_seed():
    """No connection is made until the first command (the nodes need not exist)."""
    client = connect(parse_redis_url("redis+cluster://:pw@h1:7000,h2:7001,h3:7002"), 0.5)
    assert isinstance(client, RedisCluster)
    assert {(node.host, node.port) for node in client.startup_nodes} == {
        ("h1", 7000),
        ("h2", 7001),
        ("h3", 7002),
    }
    assert client.get_connection_kwargs()["password"] == "pw"
    await client.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://:Zq9/Wx7@h1:7000",
        "redis+cluster://admin:Zq9/Wx7@h1:7000",
        "redis+cluster://:Zq9@Wx7@h1:7000/5",
        "redis+cluster://:Zq9?Wx7@h1:7000/3",
        "redis+cluster://Zq9/Wx7@h1:7000",
        ":Zq9/Wx7@h1:7000",
    ],
)
def test_a_password_with_unescaped_url_characters_never_shows_in_a_refusal(url, monkeypatch):
    """A / ? or @ left unescaped in a password splits the URL inside it: the refusal says
    so and shows no part of the password (generated secrets often hold a /)."""
    with pytest.raises(ValueError, match="REDIS_URL") as refused:
        parse_redis_url(url)
    message = str(refused.value)
    assert "Zq9" not in message and "Wx7" not in message
    monkeypatch.setenv("REDIS_URL", url)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "Zq9" not in str(refused.value) and "Wx7" not in str(refused.value)


async def test_a_wrong_kind_error_names_the_url_without_credentials_ipv6_in_brackets():
    cache = RedisArtefactCache("redis+cluster://u:secret@[::1]:7000,h2:7001", 60, 0.2, 0)
    cache._misconfigure(CLUSTER_URL_AT_PLAIN, "cluster_enabled:0")
    assert cache.misconfigured is not None
    assert cache.misconfigured.startswith(
        "REDIS_URL redis+cluster://[::1]:7000,h2:7001 is a Redis Cluster URL"
    )
    assert "secret" not in cache.misconfigured
    await cache.close()


async def test_a_wrong_kind_error_names_a_plain_url_without_credentials_or_options():
    cache = RedisArtefactCache("redis://u:secret@h:6379/0?password=hidden", 60, 0.2, 0)
    cache._misconfigure(PLAIN_URL_AT_CLUSTER, "cluster_enabled:1")
    assert cache.misconfigured is not None
    assert cache.misconfigured.startswith("REDIS_URL redis://h:6379/0 is a plain Redis URL")
    assert "secret" not in cache.misconfigured and "hidden" not in cache.misconfigured
    await cache.close()
