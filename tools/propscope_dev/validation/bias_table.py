"""The paper's Table 1 on the synthetic world: for each classifier and property,
the mean score with a 95% interval, how often the property is significant,
relevant, and flips the prediction; and the checks of the expected pattern."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from propscope_dev.validation.runner import (
    PROPERTIES,
    SHORTCUTS,
    UNTOUCHED,
    PropertyRun,
    select,
)
from propscope_dev.validation.tables import Check, markdown_table, mean_interval, percent
from propscope_server.scoring.curve_statistics import mean_defined

# What "the biased property is significant with a large score and frequent
# flips" means in numbers, fixed before the first run.
MIN_SHORTCUT_SIGNIFICANT = 0.8
MIN_SHORTCUT_RELEVANT = 0.8
MIN_SHORTCUT_FLIPPED = 0.5
# "An order of magnitude smaller."
MAX_UNTOUCHED_RATIO = 0.1
# The decision must not call the untouched property relevant.
MAX_UNTOUCHED_RELEVANT = 0.05


@dataclass(frozen=True)
class Cell:
    model: str
    property_name: str
    images: int
    mean_score: float
    score_ci_low: float
    score_ci_high: float
    mean_score_per_unit_strength: float
    significant: float  # fractions of images
    relevant: float
    flipped: float
    mean_probability_change: float
    mean_pearson_correlation: float | None
    mean_mutual_information: float | None


def cells(runs: Sequence[PropertyRun], models: Sequence[str]) -> list[Cell]:
    table = []
    for model in models:
        for name in PROPERTIES:
            found = select(runs, model, name)
            if not found:
                continue
            mean, low, high = mean_interval([r.score for r in found])
            table.append(
                Cell(
                    model=model,
                    property_name=name,
                    images=len(found),
                    mean_score=mean,
                    score_ci_low=low,
                    score_ci_high=high,
                    mean_score_per_unit_strength=float(
                        np.mean([r.score_per_unit_strength for r in found])
                    ),
                    significant=float(np.mean([r.significant for r in found])),
                    relevant=float(np.mean([r.relevant for r in found])),
                    flipped=float(np.mean([r.flipped for r in found])),
                    mean_probability_change=float(np.mean([r.probability_change for r in found])),
                    mean_pearson_correlation=mean_defined([r.pearson_correlation for r in found]),
                    mean_mutual_information=mean_defined([r.mutual_information for r in found]),
                )
            )
    return table


def expected_pattern(table: Sequence[Cell]) -> list[Check]:
    by_key = {(c.model, c.property_name): c for c in table}
    shortcut_cells = [
        by_key[(model, prop)]
        for model, prop in SHORTCUTS.items()
        if prop is not None and (model, prop) in by_key
    ]
    checks = []
    for cell in shortcut_cells:
        where = f"{cell.model} / {cell.property_name}"
        checks += [
            Check(
                f"{where}: significant",
                f">= {percent(MIN_SHORTCUT_SIGNIFICANT)} of images",
                percent(cell.significant),
                cell.significant >= MIN_SHORTCUT_SIGNIFICANT,
            ),
            Check(
                f"{where}: flips",
                f">= {percent(MIN_SHORTCUT_FLIPPED)} of images",
                percent(cell.flipped),
                cell.flipped >= MIN_SHORTCUT_FLIPPED,
            ),
            Check(
                f"{where}: relevant",
                f">= {percent(MIN_SHORTCUT_RELEVANT)} of images",
                percent(cell.relevant),
                cell.relevant >= MIN_SHORTCUT_RELEVANT,
            ),
        ]
    smallest_shortcut = min((c.mean_score for c in shortcut_cells), default=float("nan"))
    for model in SHORTCUTS:
        cell = by_key.get((model, UNTOUCHED))
        if cell is None:
            continue
        ratio = cell.mean_score / smallest_shortcut
        checks += [
            Check(
                f"{model} / {UNTOUCHED}: score",
                f"<= {MAX_UNTOUCHED_RATIO} x the smallest shortcut score ({smallest_shortcut:.3g})",
                f"{cell.mean_score:.3g} ({ratio:.2g} x)",
                bool(ratio <= MAX_UNTOUCHED_RATIO),
            ),
            Check(
                f"{model} / {UNTOUCHED}: relevant",
                f"<= {percent(MAX_UNTOUCHED_RELEVANT)} of images",
                f"{percent(cell.relevant)} (significant: {percent(cell.significant)})",
                cell.relevant <= MAX_UNTOUCHED_RELEVANT,
            ),
        ]
    return checks


def markdown(table: Sequence[Cell]) -> str:
    rows = [
        (
            c.model,
            c.property_name,
            c.images,
            f"{c.mean_score:.3g} [{c.score_ci_low:.3g}, {c.score_ci_high:.3g}]",
            f"{c.mean_score_per_unit_strength:.3g}",
            percent(c.significant),
            percent(c.relevant),
            percent(c.flipped),
            f"{c.mean_probability_change:.3g}",
            "n/a" if c.mean_pearson_correlation is None else f"{c.mean_pearson_correlation:.2f}",
            "n/a" if c.mean_mutual_information is None else f"{c.mean_mutual_information:.2f}",
        )
        for c in table
    ]
    headers = (
        "model",
        "property",
        "images",
        "E|∇X| [95% CI]",
        "E|dp/dt|",
        "significant",
        "relevant",
        "flipped",
        "Δp (max−min)",
        "Pearson r",
        "MI (nats)",
    )
    return markdown_table(headers, rows)


@dataclass(frozen=True)
class Agreement:
    """One model x property: how often an adaptive path's decision matches the fixed
    reference path's on the same image, and what each cost."""

    model: str
    property_name: str
    images: int
    relevant_agreement: float  # fractions of images
    decision_agreement: float
    mean_edits_reference: float
    mean_edits_adaptive: float
    steps_used: dict[int, int]  # adaptive N -> images decided there


@dataclass(frozen=True)
class Disagreement:
    """One image whose adaptive decision differs from the reference's."""

    model: str
    property_name: str
    image_index: int
    reference_decision: str
    adaptive_decision: str
    reference_p_value: float
    adaptive_p_value: float
    adaptive_steps: int
    reference_probability_change: float
    adaptive_probability_change: float


def _paired(
    reference: Sequence[PropertyRun], adaptive: Sequence[PropertyRun]
) -> list[tuple[PropertyRun, PropertyRun]]:
    by_key = {(r.model, r.property_name, r.image_index): r for r in adaptive}
    keys = [(r.model, r.property_name, r.image_index) for r in reference]
    if sorted(keys) != sorted(by_key) or len(by_key) != len(adaptive):
        raise ValueError("the adaptive runs are not the reference's images and properties")
    return [(r, by_key[key]) for r, key in zip(reference, keys, strict=True)]


def agreement(
    reference: Sequence[PropertyRun], adaptive: Sequence[PropertyRun], models: Sequence[str]
) -> list[Agreement]:
    """Per model x property, the adaptive runs against the reference runs of the same
    images (both must cover the same images and properties)."""
    pairs = _paired(reference, adaptive)
    table = []
    for model in models:
        for name in PROPERTIES:
            found = [(r, a) for r, a in pairs if r.model == model and r.property_name == name]
            if not found:
                continue
            steps: dict[int, int] = {}
            for _, a in found:
                steps[a.steps] = steps.get(a.steps, 0) + 1
            table.append(
                Agreement(
                    model=model,
                    property_name=name,
                    images=len(found),
                    relevant_agreement=float(np.mean([r.relevant == a.relevant for r, a in found])),
                    decision_agreement=float(np.mean([r.decision == a.decision for r, a in found])),
                    mean_edits_reference=float(np.mean([r.edits for r, _ in found])),
                    mean_edits_adaptive=float(np.mean([a.edits for _, a in found])),
                    steps_used=dict(sorted(steps.items())),
                )
            )
    return table


def disagreements(
    reference: Sequence[PropertyRun], adaptive: Sequence[PropertyRun]
) -> list[Disagreement]:
    """Every image whose adaptive decision differs from the reference's."""
    return [
        Disagreement(
            model=r.model,
            property_name=r.property_name,
            image_index=r.image_index,
            reference_decision=r.decision,
            adaptive_decision=a.decision,
            reference_p_value=r.p_value,
            adaptive_p_value=a.p_value,
            adaptive_steps=a.steps,
            reference_probability_change=r.probability_change,
            adaptive_probability_change=a.probability_change,
        )
        for r, a in _paired(reference, adaptive)
        if r.decision != a.decision
    ]


@dataclass(frozen=True)
class AgreementSummary:
    """Over every image and property: the share of matching decisions and the edits saved."""

    images: int
    relevant_agreement: float
    decision_agreement: float
    mean_edits_reference: float
    mean_edits_adaptive: float
    edit_ratio: float  # reference edits / adaptive edits


def summarise(
    reference: Sequence[PropertyRun], adaptive: Sequence[PropertyRun]
) -> AgreementSummary:
    pairs = _paired(reference, adaptive)
    reference_edits = float(np.mean([r.edits for r, _ in pairs]))
    adaptive_edits = float(np.mean([a.edits for _, a in pairs]))
    return AgreementSummary(
        images=len(pairs),
        relevant_agreement=float(np.mean([r.relevant == a.relevant for r, a in pairs])),
        decision_agreement=float(np.mean([r.decision == a.decision for r, a in pairs])),
        mean_edits_reference=reference_edits,
        mean_edits_adaptive=adaptive_edits,
        edit_ratio=reference_edits / adaptive_edits if adaptive_edits else float("inf"),
    )


def agreement_markdown(table: Sequence[Agreement]) -> str:
    rows = [
        (
            a.model,
            a.property_name,
            a.images,
            percent(a.relevant_agreement),
            percent(a.decision_agreement),
            f"{a.mean_edits_reference:.0f}",
            f"{a.mean_edits_adaptive:.1f}",
            ", ".join(f"{n}: {count}" for n, count in a.steps_used.items()),
        )
        for a in table
    ]
    headers = (
        "model",
        "property",
        "images",
        "relevant agrees",
        "decision agrees",
        "edits (fixed)",
        "edits (adaptive)",
        "adaptive N: images",
    )
    return markdown_table(headers, rows)
