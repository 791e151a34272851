"""CPU work off the event loop that stays counted against its caller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def in_thread(func: Callable[..., T], /, *args: object) -> T:
    """`asyncio.to_thread`, except that a cancelled caller still waits for the thread.
    A thread cannot be stopped; waiting keeps its work inside the caller's admission
    slot, so a client that sends and cancels in a loop cannot pile up threads."""
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise
