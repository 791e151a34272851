"""The one runner every explanation method goes through: plan (every refusal before
any work), then the method's events, with the same cancellation, metrics and logs.
The API layer adds the same admission and deadlines around it (api/servicer.py)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from propscope_server import metrics
from propscope_server.errors import PropscopeError
from propscope_server.methods.base import ExplanationMethod

T = TypeVar("T")
logger = logging.getLogger(__name__)


async def run_method(
    method: ExplanationMethod, name: str, spec: Any, deadline: float | None
) -> AsyncIterator[Any]:
    """The method's events. Closing the iterator cancels the method's work (its
    Triton calls are cancelled with it)."""
    started = time.perf_counter()
    outcome = "error"
    try:
        plan = await method.plan(spec, deadline)
        logger.info("method %s planned", name)
        async with aclosing(method.run(plan)) as events:
            async for event in events:
                yield event
        outcome = "ok"
    except PropscopeError:
        outcome = "refused"
        raise
    except (asyncio.CancelledError, GeneratorExit):
        outcome = "cancelled"
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.METHOD_RUNS.labels(method=name, outcome=outcome).inc()
        metrics.METHOD_SECONDS.labels(method=name).observe(elapsed)
        logger.info("method %s %s in %.3f s", name, outcome, elapsed)


@dataclass(frozen=True)
class Finished(Generic[T]):
    value: T


async def with_progress(
    work: Callable[[Callable[[Any], None]], Awaitable[T]],
) -> AsyncIterator[Any]:
    """Runs `work(emit)`, yielding what it emits as it emits it, then Finished(its
    result). Closing the iterator cancels the work."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    task = asyncio.create_task(work(queue.put_nowait))
    getter: asyncio.Future[Any] | None = None
    try:
        while True:
            getter = asyncio.ensure_future(queue.get())
            finished, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                yield getter.result()
                continue
            getter.cancel()
            while not queue.empty():
                yield queue.get_nowait()
            yield Finished(task.result())
            return
    finally:
        if getter is not None:
            getter.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
