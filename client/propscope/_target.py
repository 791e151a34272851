"""Gateway targets: one address, a list of addresses, or a name a gRPC resolver expands.

A ClusterIP Service or a single address balances connections, not calls: gRPC keeps one
HTTP/2 connection per channel. Over several gateways the channel must hold one connection to
each and pick one per call, gRPC's ``round_robin`` policy, which needs a resolver that returns
every address: ``dns:///NAME:PORT`` (every A/AAAA record, re-resolved as it changes, e.g. a
headless Service) or ``ipv4:``/``ipv6:`` lists. The Node client follows the same rules
(client/node/src/target.ts; both test client/node/test/target-cases.json).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ROUND_ROBIN_SERVICE_CONFIG",
    "Target",
    "balancing_options",
    "loopback_only",
    "parse_target",
]

# gRPC's load-balancing config: a connection to every address, each call to the next ready one.
ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

# Schemes gRPC resolves itself; a target starting with one is passed on unchanged. Of these,
# dns: and the address lists can name several gateways and are balanced.
_BALANCED_SCHEMES = ("dns", "ipv4", "ipv6")
_OTHER_SCHEMES = ("unix", "unix-abstract", "vsock", "xds", "google-c2p")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_FORMS = "HOST:PORT, a list IP:PORT,IP:PORT or dns:///NAME:PORT"


@dataclass(frozen=True)
class Target:
    """``address`` is what the channel is opened with; ``hosts`` the host of each gateway it
    names (IPv6 without brackets; to tell whether a token would leave loopback in plaintext);
    ``balanced`` whether calls round-robin over the addresses it resolves to."""

    address: str
    hosts: tuple[str, ...]
    balanced: bool


def parse_target(target: str) -> Target:
    """``target`` as the channel takes it. A single ``HOST:PORT`` is kept exactly as given (and
    gRPC's default policy, pick_first); a comma-separated list of IP addresses becomes gRPC's
    ``ipv4:``/``ipv6:`` list; ``dns:``, ``ipv4:`` and ``ipv6:`` targets are gRPC's own syntax.
    A host name in a list is refused: a name resolved once would pin addresses that change,
    and ``dns:///NAME:PORT`` already balances over every address of a name."""
    text = target.strip()
    if not text:
        raise ValueError(f"target is empty; give {_FORMS}")
    scheme = text.split(":", 1)[0].lower()
    if scheme in _BALANCED_SCHEMES or scheme in _OTHER_SCHEMES:
        return _scheme_target(text, scheme)
    if "," not in text:
        return Target(text, (_host_of(text).strip("[]"),), balanced=False)
    endpoints = [_list_endpoint(text, item.strip()) for item in text.split(",")]
    seen: set[tuple[str, int]] = set()
    for endpoint in endpoints:
        if endpoint in seen:
            raise ValueError(
                f"target {text!r}: {_join(*endpoint)} is given twice; name each gateway once"
            )
        seen.add(endpoint)
    families = {":" in host for host, _ in endpoints}
    if len(families) > 1:
        raise ValueError(
            f"target {text!r} mixes IPv4 and IPv6 addresses, which one gRPC target cannot "
            "hold; list addresses of one family, or use dns:///NAME:PORT"
        )
    scheme = "ipv6" if families == {True} else "ipv4"
    address = f"{scheme}:" + ",".join(_join(host, port) for host, port in endpoints)
    return Target(address, tuple(host for host, _ in endpoints), balanced=True)


def balancing_options(target: Target) -> list[tuple[str, Any]]:
    """The channel options that spread calls over ``target``'s gateways; none for a single
    address, whose channel stays as it always was."""
    if not target.balanced:
        return []
    return [("grpc.service_config", ROUND_ROBIN_SERVICE_CONFIG)]


def loopback_only(target: Target) -> bool:
    """Whether every gateway ``target`` names is on this machine (a token may then travel in
    plaintext without a warning)."""
    return bool(target.hosts) and all(host in _LOOPBACK for host in target.hosts)


def _scheme_target(text: str, scheme: str) -> Target:
    """A target in gRPC's URI syntax, checked where a mistake would only show as UNAVAILABLE."""
    rest = text.split(":", 1)[1]
    if scheme == "dns":
        # dns:NAME:PORT, dns:///NAME:PORT or dns://AUTHORITY/NAME:PORT (a DNS server).
        name = rest[2:].split("/", 1)[1] if rest.startswith("//") and "/" in rest[2:] else rest
        if not name or name.startswith("/"):
            raise ValueError(f"target {text!r} names no host; write dns:///NAME:PORT")
        return Target(text, (_host_of(name),), balanced=True)
    if scheme in ("ipv4", "ipv6"):
        hosts = []
        for item in rest.split(","):
            host = _host_of(item.strip())
            try:
                parsed = ipaddress.ip_address(host.strip("[]"))
            except ValueError:
                parsed = None
            if parsed is None or parsed.version != int(scheme[-1]):
                raise ValueError(
                    f"target {text!r}: {item.strip()!r} is not an IPv{scheme[-1]} address "
                    f"with a port; {scheme}: takes IP literals only (for a name, dns:///NAME:PORT)"
                )
            hosts.append(host.strip("[]"))
        return Target(text, tuple(hosts), balanced=True)
    return Target(text, (), balanced=False)


def _list_endpoint(text: str, item: str) -> tuple[str, int]:
    """One ``IP:PORT`` of a comma-separated list (IPv6 in brackets: ``[::1]:50051``)."""
    host, _, port_text = item.rpartition(":")
    if not item or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(
            f"target {text!r}: {item!r} is not HOST:PORT (a port 1-65535); each gateway of a "
            "list is IP:PORT, separated by commas"
        )
    port = int(port_text)
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        raise ValueError(
            f"target {text!r}: {host!r} is a host name, and a list takes IP addresses "
            f"(e.g. 127.0.0.1:{port} for localhost). For a name with several addresses use "
            f"dns:///{host}:{port} (every address a gateway, re-resolved as it changes: a "
            "headless Service), or put a load balancer or mesh at one address"
        ) from None
    if address.version == 6 and bare == host:
        raise ValueError(f"target {text!r}: write the IPv6 address in brackets, [{host}]:{port}")
    return (bare, port)


def _host_of(endpoint: str) -> str:
    """The host of ``HOST[:PORT]`` (IPv6 in brackets)."""
    if endpoint.startswith("["):
        return endpoint[: endpoint.find("]") + 1] if "]" in endpoint else endpoint
    return endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 else endpoint


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
