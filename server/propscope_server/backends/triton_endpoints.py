"""The Triton endpoints one gateway spreads its calls over: one address, a list of them,
or every address a DNS name (a headless Service) resolves to, re-resolved. gRPC keeps one
long-lived connection per channel, so one Service address would pin a gateway to one
Triton; one channel per endpoint and a round robin per call spread the calls instead.
An endpoint that fails with UNAVAILABLE leaves the rotation, rests, and comes back once
a liveness probe answers (the gateway's health poll runs the probes: `check`)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from propscope_server import metrics
from propscope_server.backends.triton_url import SETTING, endpoint_addresses, parse_triton_url
from propscope_server.errors import Unavailable

# The longest an ejected endpoint rests between two liveness probes.
MAX_REST_S = 30.0
# Outcomes of one call to one endpoint (propscope_triton_endpoint_calls_total).
OK, ERROR, UNAVAILABLE = "ok", "error", "unavailable"
# A restarted Triton is reconnected to within about a second, not gRPC's default two
# minutes of reconnect backoff.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]

logger = logging.getLogger(__name__)

# tritonclient's aio InferenceServerClient, or a stand-in with its methods.
Client = Any
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (A and AAAA records), as endpoints on `port`."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return endpoint_addresses(infos, port)


def connect(address: str) -> Client:
    """One gRPC channel to one Triton."""
    return triton_aio.InferenceServerClient(address, channel_args=CHANNEL_OPTIONS)


@dataclass(eq=False)
class Endpoint:
    """One Triton: its client, and whether it is in the rotation; out of it, when the
    next liveness probe may put it back."""

    address: str
    client: Client
    up: bool = True
    rest_s: float = 0.0
    probe_at: float = 0.0
    # When it last left or joined the rotation: what a call or probe sent before then
    # found is older news, and moves it no more.
    moved_at: float = float("-inf")
    # Calls and probes on it now: a retired endpoint's channel is closed only once none
    # is left (closing it would cancel them).
    in_flight: int = 0


class TritonEndpoints:
    """The pool: round robin over the endpoints in rotation; an endpoint that answers
    UNAVAILABLE (or fails its liveness probe) leaves it and rests `retry_s`, doubling up
    to MAX_REST_S while its probes fail; a probe that answers, or a call that succeeds,
    puts it back. While no endpoint is in rotation calls still go to all of them in turn:
    one Triton behaves as it would without a pool. A dns:/// target is resolved again
    every `resolve_interval_s`, and when no endpoint is in rotation (at most every
    `retry_s`); a resolution that fails keeps the endpoints known."""

    def __init__(
        self,
        url: str,
        retry_s: float = 1.0,
        resolve_interval_s: float = 30.0,
        probe_timeout_s: float = 5.0,
        connect: Callable[[str], Client] = connect,
        resolver: Resolver = resolve,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.target = parse_triton_url(url)
        self._retry_s = retry_s
        self._resolve_interval_s = resolve_interval_s
        self._probe_timeout_s = probe_timeout_s
        self._connect = connect
        self._resolver = resolver
        self._clock = clock
        self._endpoints: dict[str, Endpoint] = {}
        self._retired: list[Endpoint] = []
        self._turn = 0
        self._resolved_at = float("-inf")
        self._resolving = asyncio.Lock()
        # A lookup that outlived its wait (getaddrinfo's thread cannot be stopped): the
        # next resolution waits on it rather than start another thread.
        self._lookup: asyncio.Future[list[str]] | None = None
        self._update(self.target.addresses)

    @property
    def addresses(self) -> list[str]:
        """The endpoints known now (those in and out of rotation), in the pool's order."""
        return list(self._endpoints)

    @property
    def several(self) -> bool:
        """More than one endpoint (or a DNS name, which may resolve to more): messages
        then name the endpoint."""
        return len(self._endpoints) > 1 or bool(self.target.dns_host)

    def describe_tried(self, tried: Sequence[str]) -> str:
        """The endpoints a failed call tried, in the pool's order, and the setting they
        come from."""
        if not self.several and list(tried) == list(self.target.addresses):
            return f"tried {SETTING}={self.url}"
        known = [a for a in self._endpoints if a in tried]
        ordered = known + [a for a in tried if a not in known]  # retired since: last
        return f"tried {', '.join(ordered)} of {SETTING}={self.url}"

    def client(self, address: str) -> Client:
        """The channel to one endpoint (tests reach a fake Triton through it)."""
        return self._endpoints[address].client

    def is_up(self, address: str) -> bool:
        """Whether `address` is in rotation."""
        return self._endpoints[address].up

    def holds(self, endpoint: Endpoint) -> bool:
        """Whether `endpoint` is still one of the pool's (not retired since)."""
        return self._endpoints.get(endpoint.address) is endpoint

    def in_rotation(self) -> list[Endpoint]:
        """The endpoints calls go to: those in rotation, or every one while none is."""
        endpoints = list(self._endpoints.values())
        return [e for e in endpoints if e.up] or endpoints

    def has_untried(self, tried: Collection[str]) -> bool:
        """Whether an endpoint in rotation is left that a call has not tried."""
        return any(e.up and e.address not in tried for e in self._endpoints.values())

    async def pick(self, tried: Collection[str] = ()) -> Endpoint:
        """The next endpoint in turn, preferring one in rotation that the call has not
        tried (a retry after UNAVAILABLE goes elsewhere)."""
        try:
            await self._refresh()
        except OSError as error:
            raise Unavailable(
                f"{SETTING} {self.url}: resolving {self.target.dns_host} failed ({error}); "
                "is the Triton Service's name right?"
            ) from None
        endpoints = list(self._endpoints.values())
        if not endpoints:
            raise Unavailable(
                f"{SETTING} {self.url}: {self.target.dns_host} resolves to no address; "
                "is the Triton Service's name right, and are its pods ready?"
            )
        up = [e for e in endpoints if e.up]
        untried = [e for e in endpoints if e.address not in tried]
        group = [e for e in up if e.address not in tried] or up or untried or endpoints
        self._turn += 1
        return group[self._turn % len(group)]

    @contextmanager
    def calling(self, endpoint: Endpoint) -> Iterator[float]:
        """Holds a call on `endpoint` (its channel stays open while it is out); yields
        when it was sent, for `finished`."""
        endpoint.in_flight += 1
        try:
            yield self._clock()
        finally:
            endpoint.in_flight -= 1

    def finished(self, endpoint: Endpoint, outcome: str, sent: float | None = None) -> None:
        """Counts one call; UNAVAILABLE takes the endpoint out of rotation, a success
        puts it back, unless the call was `sent` before the endpoint last moved (many
        calls in flight when a Triton fails or drains end in any order)."""
        metrics.TRITON_ENDPOINT_CALLS.labels(endpoint=endpoint.address, outcome=outcome).inc()
        if sent is not None and sent < endpoint.moved_at:
            return
        if outcome == UNAVAILABLE:
            self._eject(endpoint, "it answered UNAVAILABLE")
        elif outcome == OK and not endpoint.up:
            self._readmit(endpoint, "a call succeeded")

    async def check(self) -> bool:
        """Whether any endpoint is live: probes those in rotation (a failing one leaves
        it) and those whose rest is over (one that answers comes back); while none is in
        rotation, all of them."""
        try:
            await self._refresh()
        except OSError:
            return False
        now = self._clock()
        endpoints = list(self._endpoints.values())
        none_up = not any(e.up for e in endpoints)
        due = [e for e in endpoints if e.up or none_up or now >= e.probe_at]
        await asyncio.gather(*(self._probe(e) for e in due))
        return any(e.up for e in self._endpoints.values())

    async def close(self) -> None:
        """Closes every channel, retired ones included, and a DNS lookup still out."""
        if self._lookup is not None:
            self._lookup.cancel()
        endpoints = [*self._endpoints.values(), *self._retired]
        self._endpoints, self._retired = {}, []
        await asyncio.gather(*(endpoint.client.close() for endpoint in endpoints))

    async def _probe(self, endpoint: Endpoint) -> None:
        with self.calling(endpoint) as sent:
            failure = "it answered not live"
            try:
                live = bool(
                    await endpoint.client.is_server_live(client_timeout=self._probe_timeout_s)
                )
            except InferenceServerException as error:
                live, failure = False, error.message() or str(error)
        if sent < endpoint.moved_at:
            return  # a call's outcome moved it while the probe was out: newer news
        if live and not endpoint.up:
            self._readmit(endpoint, "its liveness probe answered")
        elif not live and endpoint.up:
            # The cause (refused, timed out, ...) tells a typo in the setting from a restart.
            self._eject(endpoint, f"its liveness probe failed: {failure}")
        elif not live:
            endpoint.rest_s = min(endpoint.rest_s * 2, MAX_REST_S)
            endpoint.probe_at = self._clock() + endpoint.rest_s

    def _eject(self, endpoint: Endpoint, why: str) -> None:
        if not endpoint.up or not self.holds(endpoint):
            return  # out already, or retired (a call in flight on it ended)
        endpoint.up = False
        endpoint.moved_at = self._clock()
        endpoint.rest_s = self._retry_s
        endpoint.probe_at = self._clock() + endpoint.rest_s
        metrics.TRITON_ENDPOINT_UP.labels(endpoint=endpoint.address).set(0)
        left = sum(e.up for e in self._endpoints.values())
        logger.warning(
            "Triton endpoint %s is out of rotation: %s (%d of %d left in rotation)",
            endpoint.address,
            why,
            left,
            len(self._endpoints),
        )

    def _readmit(self, endpoint: Endpoint, why: str) -> None:
        if not self.holds(endpoint):
            return
        endpoint.up = True
        endpoint.moved_at = self._clock()
        endpoint.rest_s = 0.0
        metrics.TRITON_ENDPOINT_UP.labels(endpoint=endpoint.address).set(1)
        logger.info("Triton endpoint %s is back in rotation: %s", endpoint.address, why)

    async def _refresh(self) -> None:
        """Resolves a dns:/// target when it is due; OSError only while no endpoint is
        known (a failure otherwise keeps the known ones)."""
        if not self.target.dns_host or not self._resolution_due():
            return
        if self._resolving.locked() and self._endpoints:
            return  # another call is resolving; this one goes on with the known endpoints
        async with self._resolving:
            if not self._resolution_due():
                return
            self._resolved_at = self._clock()
            await self._close_idle_retired()
            if self._lookup is None or self._lookup.done():
                lookup = self._resolver(self.target.dns_host, self.target.dns_port)
                self._lookup = asyncio.ensure_future(lookup)
            try:
                addresses = await asyncio.wait_for(
                    asyncio.shield(self._lookup), self._probe_timeout_s
                )
            except TimeoutError:
                error = OSError(f"no answer within {self._probe_timeout_s:g} s")
                if not self._endpoints:
                    raise error from None
                logger.warning("%s: resolving %s failed: %s", SETTING, self.url, error)
                return
            except OSError as error:
                if not self._endpoints:
                    raise
                logger.warning("%s: resolving %s failed: %s", SETTING, self.url, error)
                return
            if not addresses and self._endpoints:
                logger.warning("%s: %s resolved to no address", SETTING, self.url)
                return
            self._update(addresses)

    async def _close_idle_retired(self) -> None:
        """Closes the channels of retired endpoints no call is on any more, and drops
        their series (DNS churn must not grow the metrics without bound)."""
        idle = [e for e in self._retired if not e.in_flight]
        self._retired = [e for e in self._retired if e.in_flight]
        for endpoint in idle:
            if endpoint.address not in self._endpoints:
                for outcome in (OK, ERROR, UNAVAILABLE):
                    with suppress(KeyError):  # never counted
                        metrics.TRITON_ENDPOINT_CALLS.remove(endpoint.address, outcome)
        await asyncio.gather(*(endpoint.client.close() for endpoint in idle))

    def _resolution_due(self) -> bool:
        since = self._clock() - self._resolved_at
        if not any(e.up for e in self._endpoints.values()):
            return since >= self._retry_s
        return since >= self._resolve_interval_s

    def _update(self, addresses: Sequence[str]) -> None:
        """The endpoints become `addresses`: new ones join the rotation, the ones gone
        are retired (their clients closed at a later resolution, once no call is on
        them)."""
        gone = [a for a in self._endpoints if a not in addresses]
        new = [a for a in addresses if a not in self._endpoints]
        for address in gone:
            self._retired.append(self._endpoints.pop(address))
            metrics.TRITON_ENDPOINT_UP.remove(address)
        for address in new:
            self._endpoints[address] = Endpoint(address, self._connect(address))
            metrics.TRITON_ENDPOINT_UP.labels(endpoint=address).set(1)
        metrics.TRITON_ENDPOINTS.set(len(self._endpoints))
        if gone or (new and self.target.dns_host):
            logger.info("Triton endpoints (%s): %s", self.url, ", ".join(self._endpoints) or "none")
