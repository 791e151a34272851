"""One result per call: the collectors that fold a stream's messages or events into it.

The sync and the async client feed the same collectors, one message at a time, so a stream
means the same thing to both; a stream that ends OK without what the contract promises is a
server fault (``PropscopeError`` INTERNAL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from propscope._attribution import Attribution, AttributionProgress, Evaluation, MetricResult
from propscope._errors import PropscopeError
from propscope._events import Accepted, Done, Event, PropertyResult
from propscope._json import dataclass_dict

__all__ = [
    "AttributeCollector",
    "EvaluateCollector",
    "ExplainCollector",
    "ExplainResult",
    "MetricCallback",
    "ProgressCallback",
]

ProgressCallback = Callable[[AttributionProgress], None]
MetricCallback = Callable[[MetricResult], None]


@dataclass(frozen=True)
class ExplainResult:
    """A finished Explain call: the accepted plan, every property's result in the plan's order
    (failed ones included: ``ok`` is False and ``error`` says why) and the done timings."""

    request_id: str
    accepted: Accepted
    properties: tuple[PropertyResult, ...]
    done: Done

    @property
    def ok(self) -> bool:
        """Every property has a result (none failed)."""
        return all(result.ok for result in self.properties)

    @property
    def failed(self) -> tuple[PropertyResult, ...]:
        return tuple(result for result in self.properties if not result.ok)

    def __getitem__(self, name: str) -> PropertyResult:
        """The result of the property ``name``; ``KeyError`` naming the properties there are."""
        for result in self.properties:
            if result.property_name == name:
                return result
        raise KeyError(
            f"no property {name!r}; explained: {', '.join(self.accepted.property_names)}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


def incomplete(rpc: str, what: str) -> PropscopeError:
    """A stream that ended OK without what the contract promises: a server fault."""
    return PropscopeError(
        grpc.StatusCode.INTERNAL, f"the {rpc} stream ended without {what} (a server fault)"
    )


class ExplainCollector:
    """Keeps the events of an Explain stream as they are read; ``result()`` once it has ended."""

    def __init__(self) -> None:
        self._accepted: Accepted | None = None
        self._results: dict[str, PropertyResult] = {}
        self._done: Done | None = None
        self._error: PropscopeError | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, Accepted):
            self._accepted = event
        elif isinstance(event, PropertyResult):
            self._results[event.property_name] = event
        elif isinstance(event, Done):
            self._done = event

    def fail(self, error: PropscopeError) -> None:
        """The call failed: ``result()`` raises ``error`` again."""
        self._error = error

    def result(self) -> ExplainResult:
        if self._error is not None:
            raise self._error
        if self._accepted is None or self._done is None:
            raise incomplete("Explain", "the plan and its end (Accepted and Done)")
        names = self._accepted.property_names
        missing = [name for name in names if name not in self._results]
        if missing:
            raise incomplete("Explain", f"the results of {', '.join(missing)}")
        return ExplainResult(
            request_id=self._accepted.request_id,
            accepted=self._accepted,
            properties=tuple(self._results[name] for name in names),
            done=self._done,
        )


class _AttributionCollector:
    """What the Attribute and EvaluateAttribution streams share: the request id (the server's
    when the caller gave none), the plan, and progress sent to ``on_progress`` as it comes; a
    subclass keeps the rest (``_add``)."""

    def __init__(self, request_id: str, on_progress: ProgressCallback | None) -> None:
        self._request_id = request_id
        self._on_progress = on_progress
        self._accepted: Any = None

    def add(self, message: Any) -> None:  # an AttributeEvent or EvaluateAttributionEvent
        self._request_id = message.request_id or self._request_id
        kind = message.WhichOneof("event")
        if kind == "accepted":
            self._accepted = message.accepted
        elif kind == "progress":
            if self._on_progress is not None:
                progress = AttributionProgress.from_proto(message.progress, self._request_id)
                self._on_progress(progress)
        else:
            self._add(kind, message)

    def _add(self, kind: str | None, message: Any) -> None:
        raise NotImplementedError


class AttributeCollector(_AttributionCollector):
    """Folds an Attribute stream's messages into one ``Attribution``."""

    def __init__(self, request_id: str, on_progress: ProgressCallback | None = None) -> None:
        super().__init__(request_id, on_progress)
        self._result: Any = None

    def _add(self, kind: str | None, message: Any) -> None:
        if kind == "result":
            self._result = message.result

    def result(self) -> Attribution:
        if self._accepted is None or self._result is None:
            raise incomplete("Attribute", "the plan and the map")
        try:
            return Attribution.from_events(self._request_id, self._accepted, self._result)
        except ValueError as error:
            raise PropscopeError(grpc.StatusCode.INTERNAL, str(error)) from None


class EvaluateCollector(_AttributionCollector):
    """Folds an EvaluateAttribution stream's messages into one ``Evaluation``; each metric goes
    to ``on_metric`` as it comes."""

    def __init__(
        self,
        request_id: str,
        on_progress: ProgressCallback | None = None,
        on_metric: MetricCallback | None = None,
    ) -> None:
        super().__init__(request_id, on_progress)
        self._on_metric = on_metric
        self._results: list[MetricResult] = []

    def _add(self, kind: str | None, message: Any) -> None:
        if kind == "metric":
            self._results.append(MetricResult.from_proto(message.metric))
            if self._on_metric is not None:
                self._on_metric(self._results[-1])

    def result(self) -> Evaluation:
        if self._accepted is None:
            raise incomplete("EvaluateAttribution", "the plan")
        computed = {result.metric for result in self._results}
        missing = [name for name in self._accepted.metrics if name not in computed]
        if missing:
            raise incomplete("EvaluateAttribution", f"the results of {', '.join(missing)}")
        return Evaluation.from_events(self._request_id, self._accepted, self._results)
