"""Admission control: a stream over a concurrency limit is refused at once with
RESOURCE_EXHAUSTED, never queued. Explanations cost hundreds of edits; a queue
would only turn overload into timeouts.

A stream is counted against its connection, its tenant and the gateway. The narrower
limits keep room for everyone else: one connection or one tenant that fills its share
leaves the rest of the gateway to other callers. With auth off every caller is the same
tenant, so the peer (the client's address) takes the tenant's place; with auth on the
address says nothing about who calls (tenants behind one proxy share it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from propscope_server import metrics
from propscope_server.config import Limits
from propscope_server.errors import ResourceExhausted


@dataclass(frozen=True)
class Caller:
    """Who holds a stream. `connection` is the peer with its port (one HTTP/2
    connection), `peer` its address alone: None for a caller without an address
    (gRPC names every Unix-socket caller "unix:"). `tenant` is None when auth is off."""

    connection: str | None
    peer: str | None
    tenant: str | None

    @classmethod
    def of(cls, grpc_peer: str, tenant: str | None) -> Caller:
        """From gRPC's peer string: "ipv4:10.0.0.7:51234", "ipv6:%5B::1%5D:51234"."""
        kind, _, address = grpc_peer.partition(":")
        host, _, port = address.rpartition(":")
        if kind not in ("ipv4", "ipv6") or not host or not port:
            return cls(connection=None, peer=None, tenant=tenant)
        return cls(connection=grpc_peer, peer=f"{kind}:{host}", tenant=tenant)


class Admission:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._connections: Counter[str] = Counter()
        self._peers: Counter[str] = Counter()
        self._tenants: Counter[str] = Counter()
        self._total = 0

    def tenant_limit(self, tenant: str) -> int:
        return self._limits.tenant_max_streams.get(tenant, self._limits.max_streams_per_tenant)

    @contextmanager
    def admit(self, caller: Caller) -> Iterator[None]:
        """Holds one stream slot of `caller` for the duration of the block. The
        narrowest limit is checked first: it is the one the caller can act on."""
        checks = [
            (
                self._connections,
                caller.connection,
                self._limits.max_streams_per_connection,
                "max_streams_per_connection",
                "this connection",
                "open another connection or wait for a stream to finish",
            ),
            (
                self._peers,
                caller.peer if caller.tenant is None else None,  # the tenant's stand-in
                self._limits.max_streams_per_peer,
                "max_streams_per_peer",
                f"peer {caller.peer}",
                "retry when one finishes",
            ),
            (
                self._tenants,
                caller.tenant,
                self.tenant_limit(caller.tenant or ""),
                "max_streams_per_tenant",
                f"tenant {caller.tenant!r}",
                "retry when one finishes",
            ),
        ]
        checks = [check for check in checks if check[1] is not None]  # shares that apply
        for counter, key, limit, name, who, advice in checks:
            if counter[key] >= limit:
                metrics.ADMISSION_REJECTIONS.labels(limit=name).inc()
                raise ResourceExhausted(
                    f"{who} is at its limit {name} of {limit} concurrent streams; {advice}"
                )
        if self._total >= self._limits.max_streams_total:
            metrics.ADMISSION_REJECTIONS.labels(limit="max_streams_total").inc()
            raise ResourceExhausted(
                f"the gateway is at its limit max_streams_total of {self._limits.max_streams_total} "
                "concurrent streams; retry with backoff"
            )
        with ExitStack() as held:
            for counter, key, *_ in checks:
                held.enter_context(_counted(counter, key))
            self._total += 1
            try:
                yield
            finally:
                self._total -= 1


@contextmanager
def _counted(counter: Counter[str], key: str) -> Iterator[None]:
    counter[key] += 1
    try:
        yield
    finally:
        counter[key] -= 1
        if not counter[key]:
            del counter[key]
