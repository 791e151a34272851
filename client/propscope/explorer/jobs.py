"""Background jobs with progress, cached by what they compute.

A panel of the page starts a job and polls it: the gateway's calls take seconds to minutes
(fitting concepts, drawing a MACO picture), longer than a browser should wait on one request.
A job is keyed by everything its result depends on (kind, model, version, class, image,
settings), so asking again returns the running or finished job instead of computing twice; a
failed job is forgotten, so asking again retries it.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from propscope._errors import PropscopeError

__all__ = ["Job", "JobFailed", "Jobs"]

logger = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job's own refusal (not the gateway's): shown on the page with ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Job:
    """One computation: its progress while it runs, then its JSON-ready result or its error."""

    id: str
    kind: str
    state: str = "running"  # running | done | failed
    stage: str = "queued"
    done: int = 0
    total: int = 0
    result: Any = None
    error: dict[str, str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def progress(self, done: int, total: int, stage: str) -> None:
        """Called from the job's thread as the gateway reports progress."""
        with self._lock:
            self.done, self.total, self.stage = done, total, stage

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "id": self.id,
                "kind": self.kind,
                "state": self.state,
                "stage": self.stage,
                "done": self.done,
                "total": self.total,
                "result": self.result,
                "error": self.error,
            }

    def _finish(self, result: Any = None, error: dict[str, str] | None = None) -> None:
        with self._lock:
            self.result, self.error = result, error
            self.state = "failed" if error is not None else "done"


class Jobs:
    """Runs jobs on ``workers`` threads and keeps the last ``capacity`` of them by key."""

    def __init__(self, workers: int, capacity: int) -> None:
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="explorer-job")
        self._capacity = capacity
        self._by_key: OrderedDict[Hashable, Job] = OrderedDict()
        self._by_id: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, key: Hashable, kind: str, work: Callable[[Job], Any]) -> Job:
        """The job of ``key``: the cached one unless it failed, else ``work(job)`` started."""
        with self._lock:
            job = self._by_key.get(key)
            if job is not None and job.state != "failed":
                self._by_key.move_to_end(key)
                return job
            job = Job(id=uuid.uuid4().hex, kind=kind)
            self._by_key[key] = job
            self._by_id[job.id] = job
            while len(self._by_key) > self._capacity:
                _, evicted = self._by_key.popitem(last=False)
                self._by_id.pop(evicted.id, None)
        self._executor.submit(self._run, job, work)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._by_id.get(job_id)

    def find(self, key: Hashable) -> Job | None:
        """The job of ``key`` if one was started and has not failed (nothing is started)."""
        with self._lock:
            job = self._by_key.get(key)
        return job if job is not None and job.state != "failed" else None

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _run(job: Job, work: Callable[[Job], Any]) -> None:
        job.progress(0, 0, "running")
        try:
            result = work(job)
        except PropscopeError as error:
            job._finish(error=_error(error.code, error.message))
        except JobFailed as error:
            job._finish(error={"code": error.code, "message": error.message})
        except (ValueError, TypeError, OSError) as error:
            # The SDK checks arguments before sending anything (an unreadable image, say).
            job._finish(error=_error(grpc.StatusCode.INVALID_ARGUMENT, str(error)))
        except Exception as error:  # a bug of the explorer: shown, not a blank panel
            logger.exception("explorer job %s (%s) failed", job.id, job.kind)
            job._finish(error={"code": "INTERNAL", "message": f"{type(error).__name__}: {error}"})
        else:
            job._finish(result=result)


def _error(code: grpc.StatusCode, message: str) -> dict[str, str]:
    return {"code": code.name, "message": message}
