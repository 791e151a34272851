"""in_thread: a cancelled caller waits for its thread to end."""

from __future__ import annotations

import asyncio
import threading

import pytest

from propscope_server.threads import in_thread


async def test_returns_the_result():
    assert await in_thread(sum, [1, 2, 3]) == 6


async def test_a_cancelled_caller_ends_only_after_its_thread():
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        started.set()
        release.wait(10)
        finished.set()

    task = asyncio.create_task(in_thread(work))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    await asyncio.sleep(0.1)
    assert not task.done()  # still waiting for the thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()
