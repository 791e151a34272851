"""Progress of ``propscope explain``, from the stream's Progress events: a rich bar per property
(edits done / total, elapsed, ETA) on a terminal, else a few log lines on stderr.

A gateway sends ``Progress(stage="edit", completed, total)`` several times per property (total =
samples x steps edits; an adaptive path that lengthens raises it) and ``stage="classify"`` once;
an older one sends a single edit event per property. Both drive the same bar.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as ProgressBar
from rich.table import Column
from rich.text import Text

from propscope._events import Accepted, Event, Progress, PropertyResult

__all__ = ["ExplainProgress", "eta", "explain_progress"]

ProgressMode = Literal["bar", "log", "off"]


class ExplainProgress(Protocol):
    def update(self, model: str, event: Event) -> None: ...


@contextmanager
def explain_progress(mode: ProgressMode, several_models: bool) -> Iterator[ExplainProgress]:
    """Shows the progress of the events given to ``update``: ``bar``, ``log`` lines or ``off``."""
    if mode == "bar":
        with ProgressBar(*_bar_columns(), console=Console(stderr=True)) as bar:
            yield _Bars(bar, several_models)
        return
    if mode == "log":
        yield _LogLines(several_models)
        return
    yield _Silent()


def eta(elapsed: float, done: int, total: int) -> str:
    """``", ETA N s"`` at the pace so far, once some but not all of the work is done, else ``""``
    (no pace yet, or nothing left)."""
    if 0 < done < total:
        return f", ETA {elapsed * (total - done) / done:.0f} s"
    return ""


def _bar_columns() -> tuple[ProgressColumn, ...]:
    """A row per property: its name, its state, the bar, edits done / total, elapsed and ETA.
    Only the name (cut with an ellipsis) and the bar give way when the row is wider than the
    console (rich shrinks the widest of them first); the state, counts and times are never cut."""
    whole = Column(no_wrap=True)
    return (
        _NameColumn(),
        TextColumn("{task.fields[state]}", table_column=whole),
        BarColumn(bar_width=20, table_column=Column(no_wrap=False)),
        MofNCompleteColumn(table_column=whole),
        TextColumn("edits", table_column=whole),
        TimeElapsedColumn(table_column=whole),
        TextColumn("ETA", table_column=whole),
        TimeRemainingColumn(table_column=whole),
    )


class _NameColumn(ProgressColumn):
    """The task's description on one line, ending in an ellipsis where its column is narrower."""

    def render(self, task: Task) -> Text:
        return Text(task.description, no_wrap=True, overflow="ellipsis")


class _Silent:
    def update(self, model: str, event: Event) -> None:
        pass


class _Bars:
    """A bar per (model, property), added when the model's plan arrives (elapsed time counts
    from there: the first Progress event comes after the first edits) and stopped, its elapsed
    time frozen, at its result. With several models, a line naming the model comes before its
    bars (the CLI explains one model at a time), so that a row needs only the property's name."""

    def __init__(self, bar: ProgressBar, several_models: bool) -> None:
        self._bar = bar
        self._several_models = several_models
        self._tasks: dict[tuple[str, str], TaskID] = {}

    def update(self, model: str, event: Event) -> None:
        if isinstance(event, Accepted):
            if self._several_models:
                self._bar.console.print(Text(f"{model}:", style="bold"))
            for name in event.property_names:
                self._task(model, name)
        elif isinstance(event, Progress):
            task = self._task(model, event.property_name)
            if event.stage == "edit":
                self._bar.update(task, completed=event.completed, total=event.total or None)
            else:
                self._bar.update(task, state="classifying")
        elif isinstance(event, PropertyResult):
            task = self._task(model, event.property_name)
            total = self._bar.tasks[task].total or 1
            state = "done" if event.ok else "failed"
            self._bar.update(task, completed=total, total=total, state=state)
            self._bar.stop_task(task)

    def _task(self, model: str, name: str) -> TaskID:
        key = (model, name)
        if key not in self._tasks:
            self._tasks[key] = self._bar.add_task(name, total=None, state="")
        return self._tasks[key]


@dataclass
class _PropertyLog:
    started: float = field(default_factory=time.monotonic)
    quarter: int = 0


class _LogLines:
    """A line on stderr when a property's edits pass a quarter of their total (with elapsed
    time and ETA) and when its result arrives: at most five lines per property, for CI logs."""

    def __init__(self, several_models: bool) -> None:
        self._several_models = several_models
        self._properties: dict[tuple[str, str], _PropertyLog] = {}

    def update(self, model: str, event: Event) -> None:
        if isinstance(event, Accepted):
            # Time counts from the plan: the first Progress event comes after the first edits.
            for name in event.property_names:
                self._log(model, name)
        elif isinstance(event, Progress) and event.stage == "edit" and event.total > 0:
            log = self._log(model, event.property_name)
            quarter = 4 * min(event.completed, event.total) // event.total
            if quarter <= log.quarter:
                return
            log.quarter = quarter
            elapsed = time.monotonic() - log.started
            self._echo(
                model,
                event.property_name,
                f"{event.completed}/{event.total} edits ({event.completed / event.total:.0%}, "
                f"{elapsed:.1f} s{eta(elapsed, event.completed, event.total)})",
            )
        elif isinstance(event, PropertyResult):
            log = self._log(model, event.property_name)
            elapsed = time.monotonic() - log.started
            outcome = "done" if event.ok else f"failed ({event.status_code.name})"
            self._echo(model, event.property_name, f"{outcome} in {elapsed:.1f} s")

    def _log(self, model: str, name: str) -> _PropertyLog:
        return self._properties.setdefault((model, name), _PropertyLog())

    def _echo(self, model: str, name: str, message: str) -> None:
        where = f"{model} {name}" if self._several_models else name
        typer.echo(f"propscope: {where}: {message}", err=True)
