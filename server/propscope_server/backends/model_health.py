"""Sick models. When a Python-backend model's worker process (its stub) dies, Triton
still calls the model READY but answers every request for it with "Stub process
'<instance>' is not healthy." until the model is reloaded. The gateway marks such a
model sick: its requests are refused at once with UNAVAILABLE, the sickness is reported
(one ERROR line, the propscope_model_healthy gauge, the model's own health service) and
the model is restored (probed, else reloaded and probed) with back-off. A model that
falls sick again soon after its restore carries its back-off over: one whose worker is
killed by every real request is reloaded ever more rarely, not every few seconds."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from propscope_server import metrics
from propscope_server.errors import Unavailable

# Triton 2.51's Python backend: "Stub process 'procedural_0_1' is not healthy." A model's
# own exception comes back as its bare message, so nothing else means a dead worker.
WORKER_FAILURE = re.compile(r"\bStub process\b.*\bis not healthy\b")
# The gRPC health service of one model: NOT_SERVING while it is sick.
HEALTH_SERVICE_PREFIX = "propscope.model."

# Told of every change of a model's health: (model, healthy).
Listener = Callable[[str, bool], Awaitable[None]]

logger = logging.getLogger(__name__)


def is_worker_failure(message: str) -> bool:
    """Whether a Triton error message says the model's worker process is dead."""
    return WORKER_FAILURE.search(message) is not None


def health_service(model: str) -> str:
    return f"{HEALTH_SERVICE_PREFIX}{model}"


@dataclass
class Sickness:
    reason: str  # Triton's message
    since: float  # time.monotonic()
    # Sicknesses in a row, each within backoff_max_s of the last one's restore.
    episode: int = 1
    # The wait before the next reload: 0 for the first of a first episode.
    delay: float = 0.0
    healing: asyncio.Task | None = None


class ModelHealth:
    """Which served models are healthy, and the healing of the sick ones: `probe(model)`
    raises unless the model answers a real inference; `restore(model)` reloads it. Each
    round a sick model is probed first (another gateway, or a restarted Triton, may have
    restored it), then restored and probed; rounds repeat after `backoff_s`, doubling up
    to `backoff_max_s`, until it answers. A model sick again within `backoff_max_s` of its
    restore waits before its first reload, twice as long as the last episode's wait."""

    def __init__(
        self,
        restore: Callable[[str], Awaitable[None]],
        probe: Callable[[str], Awaitable[None]],
        backoff_s: float,
        backoff_max_s: float,
    ) -> None:
        self._restore = restore
        self._probe = probe
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._listeners: list[Listener] = []
        self._sick: dict[str, Sickness] = {}
        # When each model was last restored: a failure of a call sent before then is old news.
        self._restored_at: dict[str, float] = {}
        # Each model's last sickness, once restored: where a relapse's back-off starts.
        self._last_sickness: dict[str, Sickness] = {}

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def is_sick(self, model: str) -> bool:
        return model in self._sick

    async def track(self, model: str) -> None:
        """A model the gateway serves: reported healthy from its first use on."""
        if model not in self._restored_at and model not in self._sick:
            self._restored_at[model] = float("-inf")
            metrics.MODEL_HEALTHY.labels(model=model).set(1)
            await self._tell_listeners(model, True)

    def refuse_if_sick(self, model: str) -> None:
        sickness = self._sick.get(model)
        if sickness is not None:
            raise self._refusal(model, sickness)

    async def worker_failed(self, model: str, reason: str, call_started: float) -> Unavailable:
        """The error for a call that found the model's worker dead. The model turns sick
        and its healing starts, unless it was restored after the call was sent."""
        if call_started < self._restored_at.get(model, float("-inf")):
            return Unavailable(
                f"model {model!r}'s worker failed during this call ({reason}); the model "
                "has been restored since: retry"
            )
        if model not in self._sick:
            # Nothing awaited before the healing starts: a caller cancelled here, or a
            # listener that fails, must not leave a sick model that nothing heals.
            sickness = self._sickness(model, reason)
            self._sick[model] = sickness
            metrics.MODEL_HEALTHY.labels(model=model).set(0)
            logger.error(
                "model %s is sick: its worker process died (%s); refusing its requests with "
                "UNAVAILABLE and reloading it (episode %d, first reload in %g s)",
                model,
                reason,
                sickness.episode,
                sickness.delay,
            )
            # Its own context: the healing's log lines belong to no one request.
            healing = self._heal(model, sickness)
            sickness.healing = asyncio.create_task(healing, context=contextvars.Context())
        return self._refusal(model, self._sick[model])

    async def close(self) -> None:
        tasks = [s.healing for s in self._sick.values() if s.healing is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    def _refusal(model: str, sickness: Sickness) -> Unavailable:
        return Unavailable(
            f"model {model!r} is being restored: its worker process failed "
            f"{time.monotonic() - sickness.since:.0f} s ago ({sickness.reason}); "
            "retry with backoff"
        )

    def _sickness(self, model: str, reason: str) -> Sickness:
        """A new sickness; a relapse soon after the last restore continues its back-off."""
        now = time.monotonic()
        last = self._last_sickness.get(model)
        if last is None or now - self._restored_at[model] >= self._backoff_max_s:
            return Sickness(reason, now)
        return Sickness(reason, now, last.episode + 1, self._next_delay(last.delay))

    def _next_delay(self, delay: float) -> float:
        return min(max(delay * 2, self._backoff_s), self._backoff_max_s)

    async def _heal(self, model: str, sickness: Sickness) -> None:
        await self._tell_listeners(model, False)
        reloads = 0
        while True:
            await asyncio.sleep(sickness.delay)
            if await self._answers(model):  # restored elsewhere, or Triton restarted
                break
            reloads += 1
            if await self._reloaded(model, reloads):
                break
            sickness.delay = self._next_delay(sickness.delay)
            logger.warning("model %s: still sick; next reload in %g s", model, sickness.delay)
        del self._sick[model]
        self._restored_at[model] = time.monotonic()
        self._last_sickness[model] = sickness
        metrics.MODEL_HEALTHY.labels(model=model).set(1)
        logger.info(
            "model %s restored %.1f s after its worker failed (%d reloads, episode %d)",
            model,
            time.monotonic() - sickness.since,
            reloads,
            sickness.episode,
        )
        await self._tell_listeners(model, True)

    async def _reloaded(self, model: str, reloads: int) -> bool:
        try:
            await self._restore(model)
            await self._probe(model)
        except Exception as error:  # noqa: BLE001 - retried: Triton may be restarting
            logger.warning("model %s: reload %d failed: %s", model, reloads, error)
            return False
        return True

    async def _answers(self, model: str) -> bool:
        try:
            await self._probe(model)
        except Exception:  # noqa: BLE001 - a probe that fails in any way is no answer
            return False
        return True

    async def _tell_listeners(self, model: str, healthy: bool) -> None:
        for listener in self._listeners:
            try:
                await listener(model, healthy)
            except Exception:  # one listener's failure is no reason to stop the others
                logger.exception("model %s: a health listener failed (healthy=%s)", model, healthy)
