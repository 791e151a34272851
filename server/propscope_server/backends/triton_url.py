"""PROPSCOPE_TRITON_URL: one Triton, a list of them, or a DNS name whose every address is
one (a headless Service). Pure: the core's settings check it without a transport."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

SETTING = "PROPSCOPE_TRITON_URL"
DNS_PREFIX = "dns:///"
FORMS = (
    "one host:port, a comma-separated list host1:port1,host2:port2, or dns:///name:port "
    "(every address the name resolves to, e.g. a headless Service)"
)


@dataclass(frozen=True)
class TritonTarget:
    """What PROPSCOPE_TRITON_URL names: fixed addresses, or a DNS name and its port."""

    addresses: tuple[str, ...] = ()
    dns_host: str = ""
    dns_port: int = 0


def parse_triton_url(value: str) -> TritonTarget:
    """The target a PROPSCOPE_TRITON_URL value names; ValueError naming the setting, the
    wrong part and the forms it takes."""
    text = value.strip()
    if text.startswith(DNS_PREFIX):
        host, port = _host_port(text.removeprefix(DNS_PREFIX), value)
        return TritonTarget(dns_host=host, dns_port=port)
    if "://" in text or text.startswith("dns:"):
        raise ValueError(f"{SETTING} is {value!r}; it takes {FORMS}")
    entries = [entry.strip() for entry in text.split(",")]
    addresses = tuple(triton_address(*_host_port(entry, value)) for entry in entries)
    repeated = sorted({a for a in addresses if addresses.count(a) > 1})
    if repeated:
        raise ValueError(
            f"{SETTING} names {', '.join(repeated)} more than once; name each Triton once"
        )
    return TritonTarget(addresses=addresses)


def _host_port(entry: str, value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` split; ValueError naming the entry."""
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        separator, port_text = rest[:1], rest[1:]
        ok = bool(bracket) and separator == ":"
    else:
        host, separator, port_text = entry.rpartition(":")
        ok = bool(separator) and ":" not in host
    ok = ok and bool(host) and not any(c.isspace() or c in "/,[]" for c in host)
    if not ok or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(
            f"{SETTING} is {value!r}: {entry!r} is not host:port (an IPv6 address in "
            f"brackets, [::1]:8001; a port 1-65535); it takes {FORMS}"
        )
    return host, int(port_text)


def triton_address(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def endpoint_addresses(infos: Sequence[tuple], port: int) -> list[str]:
    """`host:port` of every address in getaddrinfo's answer, each once, in a stable order
    (so that every gateway's round robin walks them alike)."""
    hosts = {info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)}
    return sorted(triton_address(host, port) for host in hosts)
