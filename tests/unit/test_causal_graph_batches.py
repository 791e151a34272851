"""The causal graph's batches in flight at once (graph_concurrency): the graph is the same
whatever the setting and whichever batch Triton answers first, and no more than the
setting's batches are ever outstanding."""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import aclosing

import numpy as np
import pytest

from propscope_server.config import Settings
from propscope_server.methods.causal_graph import CausalGraph
from propscope_server.orchestration.runner import run_method
from tests.unit.test_causal_graph import FakeOpenModel, image, spec


class OutOfOrder(FakeOpenModel):
    """Answers later batches first (each call waits less than the one before it) and
    records the most calls outstanding at once."""

    def __init__(self) -> None:
        super().__init__()
        self.outstanding = 0
        self.most = 0
        self.calls = 0

    async def infer(self, model, inputs, outputs, deadline):
        self.calls += 1
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)
        try:
            await asyncio.sleep(0.002 * (self.calls % 3))
            return await super().infer(model, inputs, outputs, deadline)
        finally:
            self.outstanding -= 1


def events_of(concurrency: int) -> tuple[list, OutOfOrder]:
    fake = OutOfOrder()
    settings = Settings(graph_concurrency=concurrency)
    graph_spec = dataclasses.replace(spec(), images=(image(128), image(40)))

    async def collect() -> list:
        method = CausalGraph(fake, settings)
        async with aclosing(run_method(method, "causal_graph", graph_spec, None)) as events:
            return [event async for event in events]

    return asyncio.run(collect()), fake


def comparable(events: list) -> list:
    """The events without their timings (GraphDone's total_s) and progress (counted as
    batches finish, in whatever order they do)."""
    kept = []
    for event in events:
        name = type(event).__name__
        if name == "GraphProgress":
            continue
        if name == "GraphDone":
            event = dataclasses.replace(event, total_s=0.0)
        kept.append(event)
    return kept


@pytest.mark.parametrize("concurrency", [2, 5])
def test_overlapped_batches_give_the_serial_graph_and_stay_bounded(concurrency):
    serial, one = events_of(1)
    overlapped, many = events_of(concurrency)
    assert one.most == 1
    assert 1 < many.most <= concurrency
    assert one.passes == many.passes
    assert comparable(overlapped) == comparable(serial)
    progress = [e for e in overlapped if type(e).__name__ == "GraphProgress"]
    assert progress[-1].done == many.passes
    assert np.all(np.diff([p.done for p in progress]) > 0)
