"""What REDIS_URL selects: one Redis (redis://, rediss://, unix://, as redis-py reads
them) or a Redis Cluster (redis+cluster://, rediss+cluster://). Pure parsing, so that a
malformed URL is refused when the settings load, naming REDIS_URL and the fix."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlunsplit

PLAIN_SCHEMES = ("redis", "rediss", "unix")
# What a refusal says instead of a part it would show from inside the credentials.
SPLIT_CREDENTIALS = (
    "the URL splits inside its credentials: percent-encode / ? # and @ in a user name or "
    "password (%2F %3F %23 %40)"
)
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
DEFAULT_PORT = 6379


@dataclass(frozen=True)
class RedisTarget:
    """`url` is what redis-py reads (for a cluster: the first seed with the URL's
    credentials and options); `seeds` are every seed node of a cluster, empty for one
    Redis."""

    url: str
    seeds: tuple[tuple[str, int], ...] = ()

    @property
    def cluster(self) -> bool:
        return bool(self.seeds)


def parse_redis_url(url: str) -> RedisTarget:
    """`redis+cluster://[user:password@]host:port[,host:port...][/0][?options]` is a
    cluster with those seed nodes (one is enough: the client discovers the rest);
    rediss+cluster:// is the same over TLS. Any other accepted scheme is one Redis."""
    scheme, _, rest = url.partition("://")
    if not rest:
        raise ValueError(
            f"REDIS_URL {_redacted(url)!r} is not a URL; use redis://host:port/0 for one Redis "
            "or redis+cluster://host:port for a Redis Cluster"
        )
    scheme = scheme.lower()
    if scheme in PLAIN_SCHEMES:
        return RedisTarget(url)
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError(
            f"REDIS_URL scheme {scheme!r} is not supported; use redis://, rediss:// or "
            "unix:// for one Redis, redis+cluster:// or rediss+cluster:// for a Redis Cluster"
        )
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    seeds = tuple(_seed(entry, url) for entry in hosts.split(","))
    if path not in ("", "0"):
        if not _shows(path, url):
            raise ValueError(f"REDIS_URL {_redacted(url)!r}: {SPLIT_CREDENTIALS}")
        raise ValueError(
            f"REDIS_URL {_redacted(url)!r} names database {path!r}; a Redis Cluster has only "
            "database 0: drop the path or write /0"
        )
    host, port = seeds[0]
    first = f"{userinfo}@{host_port(host, port)}" if userinfo else host_port(host, port)
    return RedisTarget(urlunsplit((CLUSTER_SCHEMES[scheme], first, "", query, "")), seeds)


def _seed(entry: str, url: str) -> tuple[str, int]:
    if entry.startswith("["):
        host, _, tail = entry[1:].partition("]")
        port_text = tail.removeprefix(":")
        malformed = not host or (tail and not tail.startswith(":"))
    else:
        host, _, port_text = entry.partition(":")
        malformed = not host or ":" in port_text
    port_ok = not port_text or (port_text.isdigit() and 0 < int(port_text) < 65536)
    if (malformed or not port_ok) and not _shows(entry, url):
        raise ValueError(f"REDIS_URL {_redacted(url)!r}: {SPLIT_CREDENTIALS}")
    if malformed:
        raise ValueError(
            f"REDIS_URL {_redacted(url)!r}: seed node {entry!r} is not host:port "
            "(write an IPv6 address as [addr]:port; separate seeds with commas)"
        )
    if not port_ok:
        raise ValueError(
            f"REDIS_URL {_redacted(url)!r}: seed node {entry!r} has no valid port (1 to 65535)"
        )
    return host, int(port_text) if port_text else DEFAULT_PORT


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redacted(url: str) -> str:
    """The URL without its credentials, for error messages: all before its last `@` but
    the user name goes (a password may hold / ? or @ unescaped)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    userinfo, at, hosts = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon and not any(c in user for c in "/?#") else "***"
    return f"{scheme}{separator}{shown}@{hosts}"


def _shows(part: str, url: str) -> bool:
    """Whether a refusal may quote `part` of `url`: only what the redacted URL shows (a
    part split from inside a password holds some of it)."""
    return part in _redacted(url)
