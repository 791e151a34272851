"""What every report writer shares: one model's means over the images, and number formats."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from propscope.review.results import ModelEntry, ReviewResult

__all__ = [
    "FILE_NAMES",
    "ModelSummary",
    "decisions_text",
    "format_number",
    "format_percent",
    "strip_probability",
    "strip_steps",
    "summarize",
]

# The words for each decision in the reports, in the order they are listed.
DECISION_WORDS = {
    "relevant": "relevant",
    "not_significant": "not significant",
    "change_too_small": "Δp too small",
    "cannot_reach_alpha": "undecidable at N",
    "not relevant": "not relevant",
}
# A path strip shows at most this many images (evenly spaced, both ends included).
STRIP_IMAGES = 21

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


def decisions_text(counts: dict[str, int]) -> str:
    """E.g. ``relevant 3, Δp too small 9``: how many images got each decision."""
    order = list(DECISION_WORDS)
    ranked = sorted(
        counts.items(), key=lambda item: order.index(item[0]) if item[0] in order else 99
    )
    return ", ".join(f"{DECISION_WORDS.get(key, key)} {count}" for key, count in ranked) or "–"


def strip_steps(images: int) -> list[int]:
    """The indices of the path images a strip shows: all up to ``STRIP_IMAGES``, else evenly
    spaced ones with both ends."""
    if images <= STRIP_IMAGES:
        return list(range(images))
    return sorted({round(k * (images - 1) / (STRIP_IMAGES - 1)) for k in range(STRIP_IMAGES)})


def strip_probability(curve: tuple[float, ...], step: int, images: int) -> float | None:
    """The curve's value at image ``step`` of a strip of ``images`` images, when the curve was
    measured at that strength (a model's adaptive path may be shorter or longer); else None."""
    if len(curve) == images:
        return curve[step]
    if len(curve) < 2 or images < 2:
        return None
    position = step * (len(curve) - 1) / (images - 1)
    return curve[round(position)] if abs(position - round(position)) < 1e-9 else None
