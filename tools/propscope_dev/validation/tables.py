"""Shared pieces of the result tables: summaries, pass/fail checks and output files."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from propscope_dev.channel_means import config_parameters
from propscope_dev.stack import DEFAULT_MODEL_REPOSITORY
from propscope_server.scoring.property_gradient import bootstrap_interval
from propscope_server.triton_models.classifiers.cnn import SmallCNN, load_classifier


@dataclass(frozen=True)
class Check:
    """One expectation of the paper's pattern, and whether the measurement met it."""

    name: str
    requirement: str
    measured: str
    passed: bool
    # A target recorded against the measurement but not gating the run (its section says why).
    informational: bool = False


def mean_interval(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean over images and its 95% percentile bootstrap interval."""
    low, high = bootstrap_interval(np.asarray(values), np.random.default_rng(seed))
    return float(np.mean(values)), low, high


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, rows)])


def checks_markdown(checks: Sequence[Check], informational: bool = False) -> str:
    """The checks as a table; informational checks say "met" / "not met" instead of pass/FAIL."""
    rows = [
        (
            c.name,
            c.requirement,
            c.measured,
            (("met", "not met") if informational or c.informational else ("pass", "**FAIL**"))[
                not c.passed
            ],
        )
        for c in checks
    ]
    return markdown_table(("check", "requirement", "measured", "result"), rows)


def write_results(out: Path, stem: str, markdown: str, data: dict) -> None:
    """docs/results/<stem>.md and .json (JSON with every number)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown.rstrip() + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=_plain) + "\n")


def _plain(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def result_row(
    part: str, criterion: str, target: str, measured: str, met: bool, informational: bool = False
) -> dict:
    """A row of a table written by bench/validate_concepts.py; `informational`: recorded,
    not gating (the row's text says why)."""
    return {
        "part": part,
        "criterion": criterion,
        "target": target,
        "measured": measured,
        "met": bool(met),
        "informational": informational,
    }


def row_check(row: dict) -> Check:
    """The Check a result_row stands for (its part and criterion as the name)."""
    return Check(
        f"{row['part']}: {row['criterion']}",
        str(row["target"]),
        str(row["measured"]),
        bool(row["met"]),
        informational=bool(row.get("informational", False)),
    )


def served_classifier(model: str, repository: Path = DEFAULT_MODEL_REPOSITORY) -> SmallCNN:
    """The synthetic classifier `model` serves, in-process: the weights its config names."""
    config = repository / model / "config.pbtxt"
    return load_classifier(config.parent / config_parameters(config.read_text())["weights"])


def percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"
