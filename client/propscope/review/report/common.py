"""What every report writer shares: one model's means over the images, and number formats."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from propscope.review.results import ModelEntry, ReviewResult

__all__ = ["FILE_NAMES", "ModelSummary", "format_number", "format_percent", "summarize"]

# Report kind -> the file ``write_reports`` writes it to (the Markdown points reviewers to them).
FILE_NAMES = {
    "markdown": "review.md",
    "junit": "junit.xml",
    "json": "review.json",
    "html": "review.html",
}


@dataclass(frozen=True)
class ModelSummary:
    """One model's means over the images of one property: a row of the reports' tables."""

    model: ModelEntry
    images: int
    score: float
    score_per_unit_strength: float
    # Fractions of the images, in [0, 1].
    significant: float
    relevant: float
    # The mean over images of each image's fraction of paths whose prediction flips.
    flip_rate: float
    probability_change: float


def summarize(result: ReviewResult, model: ModelEntry, property_name: str) -> ModelSummary | None:
    """The means of ``model`` on ``property_name``, or None when it has no observation there."""
    count = len(result.select(model.label, property_name))
    if not count:
        return None

    def mean(name: str) -> float:
        return float(np.mean(result.values(model.label, property_name, name)))

    return ModelSummary(
        model=model,
        images=count,
        score=mean("score"),
        score_per_unit_strength=mean("score_per_unit_strength"),
        significant=mean("significant"),
        relevant=mean("relevant"),
        flip_rate=mean("flip_rate"),
        probability_change=mean("probability_change"),
    )


def format_number(value: float | None) -> str:
    """Four significant digits, as the CLI's table shows them; a dash for missing values."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.4g}"


def format_percent(fraction: float | None) -> str:
    """A fraction as a percentage with three significant digits (1 of 300 is 0.333%, not 0%)."""
    if fraction is None or not math.isfinite(fraction):
        return "–"
    return f"{100 * fraction:.3g}%"
