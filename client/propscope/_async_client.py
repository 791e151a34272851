"""The asyncio client: ``Client``'s calls (one definition, ``ClientBase``) on grpc.aio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from propscope._attribution import Attribution, Evaluation
from propscope._client import ClientBase, Collector, known_event
from propscope._concepts import ConceptBank, ConceptCalls, ConceptMaps
from propscope._consistency import ConsistencyCalls, ConsistencyResult
from propscope._errors import PropscopeError
from propscope._events import Event, ModelInfo
from propscope._graph import GraphResult
from propscope._interactions import InteractionCalls, InteractionDesign, InteractionsResult
from propscope._results import ExplainCollector, ExplainResult
from propscope._visualization import Visualization

__all__ = ["AsyncClient", "AsyncExplainStream"]


class AsyncExplainStream(AsyncIterator[Event]):
    """The events of a started Explain call for ``async for``, or all at once by
    ``await result()``. Leaving it early (``aclose()``, cancelling the task) cancels the call."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call
        self._events = _events(call)
        self._collector = ExplainCollector()
        self._closed = False

    async def __anext__(self) -> Event:
        try:
            event = await anext(self._events)
        except PropscopeError as error:
            self._collector.fail(error)
            raise
        self._collector.add(event)
        return event

    async def result(self) -> ExplainResult:
        """Reads the stream to its end into one result (events already read count too);
        ``PropscopeError`` when the call fails, also when it failed while iterated."""
        if self._closed:
            raise ValueError("the stream was closed before its end")
        async for _ in self:
            pass
        return self._collector.result()

    async def aclose(self) -> None:
        """Cancels the call if it is still running (also before the first event is read); a
        task reading the stream meanwhile gets ``PropscopeError`` CANCELLED."""
        self._closed = True
        self._call.cancel()
        if not self._events.ag_running:  # a task reading it: the cancel ends that read
            await self._events.aclose()


class AsyncClient(
    ClientBase[
        AsyncExplainStream,
        Awaitable[Attribution],
        Awaitable[Evaluation],
        Awaitable[list[ModelInfo]],
        Awaitable[GraphResult],
        Awaitable[Visualization],
    ],
    ConceptCalls[Awaitable[ConceptBank], Awaitable[ConceptMaps]],
    ConsistencyCalls[Awaitable[ConsistencyResult]],
    InteractionCalls[Awaitable[InteractionsResult], Awaitable[InteractionDesign]],
):
    """A connection to a propscope gateway for asyncio, with ``Client``'s arguments and calls
    (``ClientBase``): ``attribute``, ``evaluate_attribution``, ``graph``, ``visualize`` and ``list_models`` return
    awaitables, ``explain`` an ``AsyncExplainStream``. Create it inside a running event loop;
    use ``async with`` or ``await close()``.

    >>> async with AsyncClient("localhost:50051") as client:
    ...     found = client.explain("cat.png", "resnet50", {"hue": "procedural:operation=hue"})
    ...     print((await found.result())["hue"].p_value)
    """

    async def close(self) -> None:
        """Closes the channel, cancelling calls in flight; closing twice is harmless."""
        if not self._closed:
            self._closed = True
            await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def _open_channel(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: list[tuple[str, Any]],
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    def _explain_stream(self, call: grpc.aio.UnaryStreamCall) -> AsyncExplainStream:
        return AsyncExplainStream(call)

    async def _collect(self, call: grpc.aio.UnaryStreamCall, collector: Collector) -> Any:
        # Closed at once when a callback fails, not when the loop finalises the generator.
        async with aclosing(_messages(call)) as messages:
            async for message in messages:
                collector.add(message)
        return collector.result()

    async def _unary(
        self, method: Any, request: Any, options: dict[str, Any], convert: Callable[[Any], Any]
    ) -> Any:
        call = method(request, **options)
        async with _errors(call):
            response = await call
        return convert(response)


@asynccontextmanager
async def _errors(call: grpc.aio.Call) -> AsyncIterator[None]:
    """Raises a failed call's error as ``PropscopeError``.

    grpc.aio raises ``CancelledError`` in a call cancelled on this side (by ``close()`` of the
    client or of a stream): unless this task is being cancelled, that is the call's failure,
    ``PropscopeError`` CANCELLED as the sync client raises."""
    try:
        yield
    except grpc.RpcError as error:  # grpc.aio.AioRpcError
        raise PropscopeError.from_rpc_error(error) from error
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not call.cancelled() or task is None or task.cancelling():
            raise
        raise PropscopeError(grpc.StatusCode.CANCELLED, await call.details()) from None


async def _messages(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[Any]:
    """The messages of a started stream; ``PropscopeError`` when it fails, cancelled when left
    early (an exception in a progress callback or a cancelled task included)."""
    try:
        async with _errors(call):
            async for message in call:
                yield message
    finally:
        call.cancel()


async def _events(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[Event]:
    """The typed events of a started Explain call; cancels the call when closed early."""
    async for message in _messages(call):
        event = known_event(message)
        if event is not None:
            yield event
