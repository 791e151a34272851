"""Admission control: a stream over a concurrency limit is refused at once with
RESOURCE_EXHAUSTED, never queued. Explanations cost hundreds of edits; a queue
would only turn overload into timeouts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from propscope_server import metrics
from propscope_server.config import Limits
from propscope_server.errors import ResourceExhausted


class Admission:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._streams: Counter[str] = Counter()

    def tenant_limit(self, tenant: str) -> int:
        return self._limits.tenant_max_streams.get(tenant, self._limits.max_streams_per_tenant)

    @contextmanager
    def admit(self, tenant: str) -> Iterator[None]:
        """Holds one stream slot of `tenant` for the duration of the block. The tenant's
        own limit is checked first: it is the one the caller can act on."""
        limit = self.tenant_limit(tenant)
        if self._streams[tenant] >= limit:
            metrics.ADMISSION_REJECTIONS.labels(limit="max_streams_per_tenant").inc()
            raise ResourceExhausted(
                f"tenant {tenant!r} is at its limit max_streams_per_tenant of {limit} "
                "concurrent Explain streams; retry when one finishes"
            )
        total = sum(self._streams.values())
        if total >= self._limits.max_streams_total:
            metrics.ADMISSION_REJECTIONS.labels(limit="max_streams_total").inc()
            raise ResourceExhausted(
                f"the gateway is at its limit max_streams_total of {self._limits.max_streams_total} "
                "concurrent Explain streams; retry with backoff"
            )
        self._streams[tenant] += 1
        try:
            yield
        finally:
            self._streams[tenant] -= 1
            if not self._streams[tenant]:
                del self._streams[tenant]
