"""PNG plots of a review, one pair per property: the prediction along the path, and the scores.

Each plot is its own ``Figure`` (no pyplot state), so reports can be rendered from several
threads at once.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from propscope.review.results import ModelEntry, Observation, ReviewResult

__all__ = [
    "BASELINE_COLOR",
    "CANDIDATE_COLOR",
    "OTHER_COLORS",
    "curves_png",
    "distributions_png",
    "interaction_bars_png",
    "model_colors",
]

CANDIDATE_COLOR = "#d62728"
BASELINE_COLOR = "#1f77b4"
# The rest of matplotlib's tab10, for models without a candidate or baseline role.
OTHER_COLORS = (
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_ROLE_COLORS = {"candidate": CANDIDATE_COLOR, "baseline": BASELINE_COLOR}
_DPI = 100
_WIDTH_IN = 6.5
_TITLE_SIZE = 11
_LABEL_SIZE = 10
_TICK_SIZE = 9
_LEGEND_SIZE = 8


def model_colors(models: Sequence[ModelEntry]) -> dict[str, str]:
    """Model label -> color: fixed per role, so candidate and baseline read alike everywhere."""
    others = itertools.cycle(OTHER_COLORS)
    return {model.label: _ROLE_COLORS.get(model.role) or next(others) for model in models}


def curves_png(result: ReviewResult, property_name: str) -> bytes:
    """Per model, against strength t = k/N: the target probability (each image thin, the mean
    thick) and how far it has moved from the original, |p_t - p_0|. With several images, bands
    show the 10th-90th percentile across images. The second panel is the one to read when
    images move in opposite directions (a flip up and a flip down average to a flat mean)."""
    figure = Figure(figsize=(_WIDTH_IN * 1.45, 3.8), dpi=_DPI, layout="constrained")
    probability, moved = figure.subplots(1, 2)
    colors = model_colors(result.models)
    several = len(result.images) > 1
    for model in result.models:
        curves = result.curves(model.label, property_name)
        if not curves.size:
            continue
        strength = np.linspace(0.0, 1.0, curves.shape[1])
        color = colors[model.label]
        label = f"{model.label} ({model.role})"
        if several:
            label += f", mean of {curves.shape[0]} images"
            probability.plot(strength, curves.T, color=color, linewidth=0.6, alpha=0.25)
        for axes, values in ((probability, curves), (moved, np.abs(curves - curves[:, :1]))):
            if several:
                low, high = np.percentile(values, [10, 90], axis=0)
                axes.fill_between(strength, low, high, color=color, alpha=0.2, linewidth=0)
            axes.plot(strength, values.mean(axis=0), color=color, linewidth=2.5, label=label)
    for axes in (probability, moved):
        axes.set_xlim(0.0, 1.0)
        axes.set_ylim(-0.02, 1.02)
    _label(
        probability, f"{property_name}: prediction along the path", "strength t = k/N", "target p"
    )
    _label(moved, "change from the original", "strength t = k/N", "|p_t − p_0|")
    handles, labels = moved.get_legend_handles_labels()
    if several:
        handles.append(Patch(color="gray", alpha=0.3))
        labels.append("band: 10th–90th percentile across images; thin lines: single images")
    if handles:
        figure.legend(handles, labels, fontsize=_LEGEND_SIZE, loc="outside lower center", ncols=2)
    return _png(figure)


def distributions_png(result: ReviewResult, property_name: str) -> bytes | None:
    """Per-image scores of every model and, with a candidate and a baseline, the two paired per
    image. None for a single image, where a distribution says nothing."""
    if len(result.images) < 2:
        return None
    candidate, baseline = result.model("candidate"), result.model("baseline")
    paired = candidate is not None and baseline is not None
    figure = Figure(figsize=(_WIDTH_IN, 4.0), dpi=_DPI, layout="constrained")
    _score_boxes(figure.add_subplot(1, 2 if paired else 1, 1), result, property_name)
    if paired:
        _paired_scores(figure.add_subplot(1, 2, 2), result, property_name, candidate, baseline)
    return _png(figure)


def _score_boxes(axes: Axes, result: ReviewResult, property_name: str) -> None:
    _label(axes, "score per image", "", "score E|∇p|")
    colors = model_colors(result.models)
    models = [model for model in result.models if result.select(model.label, property_name)]
    if not models:
        return
    scores = [result.values(model.label, property_name, "score") for model in models]
    boxes = axes.boxplot(
        scores, showfliers=False, patch_artist=True, widths=0.5, medianprops={"color": "k"}
    )["boxes"]
    # Jittered so that equal scores stay visible; seeded so that reports are reproducible.
    jitter = np.random.default_rng(0)
    for position, (model, values, box) in enumerate(zip(models, scores, boxes, strict=True), 1):
        color = colors[model.label]
        box.set(facecolor=color, alpha=0.25, edgecolor=color)
        offsets = jitter.uniform(-0.12, 0.12, values.size)
        axes.scatter(position + offsets, values, s=16, color=color, zorder=3)
    axes.set_xticks(range(1, len(models) + 1), [model.label for model in models])


def _paired_scores(
    axes: Axes,
    result: ReviewResult,
    property_name: str,
    candidate: ModelEntry,
    baseline: ModelEntry,
) -> None:
    """The candidate's metric against the baseline's per image, with the no_regression
    allowance when a rule checks this property (the paired test's view of the data)."""
    rule = _regression_rule(result, property_name)
    metric = str(rule.get("metric", "score"))

    def value(obs: Observation) -> float:
        return result.score_at_n(obs) if metric == "score" else float(getattr(obs, metric))

    candidate_values = {o.image: value(o) for o in result.select(candidate.label, property_name)}
    baseline_values = {o.image: value(o) for o in result.select(baseline.label, property_name)}
    images = [image for image in baseline_values if image in candidate_values]
    x = np.array([baseline_values[image] for image in images], dtype=np.float64)
    y = np.array([candidate_values[image] for image in images], dtype=np.float64)
    limit = 1.05 * max(x.max(initial=0.0), y.max(initial=0.0)) or 1.0
    diagonal = np.array([0.0, limit])
    axes.plot(diagonal, diagonal, color="gray", linewidth=1, label="y = x")
    if rule:
        tolerance = float(rule.get("tolerance") or 0)
        margin = float(rule.get("margin") or 0)
        axes.plot(
            diagonal,
            (1 + tolerance) * diagonal + margin,
            color="black",
            linewidth=1,
            linestyle="--",
            label=f"no_regression allows y = {1 + tolerance:g}·x"
            + (f" + {margin:g}" if margin else ""),
        )
    axes.scatter(x, y, s=18, color=CANDIDATE_COLOR, zorder=3, label="one image")
    axes.set_xlim(0.0, limit)
    axes.set_ylim(0.0, limit)
    _label(
        axes,
        f"{metric} per image, paired",
        f"{baseline.label} (baseline)",
        f"{candidate.label} (candidate)",
    )
    # Below the plot: the points of a regression gather in the upper left, where a legend would go.
    axes.figure.legend(fontsize=_LEGEND_SIZE, loc="outside lower right", ncols=3)


def _regression_rule(
    result: ReviewResult, property_name: str
) -> dict[str, float | int | str | None]:
    """The details of the no_regression outcome of this property; empty when there is none."""
    for outcome in result.outcomes:
        if outcome.rule == "no_regression" and outcome.property_name == property_name:
            return outcome.details
    return {}


FIRST_ORDER_COLOR = "#1f77b4"
TOTAL_ORDER_COLOR = "#d62728"


def interaction_bars_png(
    title: str,
    names: Sequence[str],
    first: Sequence[tuple[float, float, float]],
    total: Sequence[tuple[float, float, float]],
) -> bytes:
    """Per property, its first-order index (alone) beside its total-order index (with its
    interactions), each ``(value, low, high)`` drawn as a bar with its interval: a total bar
    well above its first bar is a property the model uses together with others."""
    height = 1.2 + 0.55 * len(names)
    figure = Figure(figsize=(_WIDTH_IN, height), dpi=_DPI, layout="constrained")
    axes = figure.add_subplot()
    rows = np.arange(len(names), dtype=np.float64)
    for offset, estimates, color, label in (
        (-0.2, first, FIRST_ORDER_COLOR, "first order (alone)"),
        (0.2, total, TOTAL_ORDER_COLOR, "total order (with interactions)"),
    ):
        values = np.array([e[0] for e in estimates], dtype=np.float64)
        low = np.array([e[1] for e in estimates], dtype=np.float64)
        high = np.array([e[2] for e in estimates], dtype=np.float64)
        # An interval may miss its estimate (percentile bootstrap of a biased estimator): the
        # error bar then starts at the estimate.
        errors = np.stack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])
        axes.barh(
            rows + offset, values, height=0.38, color=color, alpha=0.75, label=label,
            xerr=errors, error_kw={"ecolor": "black", "capsize": 3, "linewidth": 1},
        )  # fmt: skip
    axes.set_yticks(rows, list(names))
    axes.invert_yaxis()  # the first property on top, as the tables list them
    axes.axvline(0.0, color="gray", linewidth=0.8)
    # The axis spans the estimates, not their intervals: a bootstrap resample with almost no
    # variance can put an interval's end at 1e6, which would flatten every bar; such a
    # whisker runs off the plot, uncapped.
    estimates = [e[0] for e in (*first, *total) if np.isfinite(e[0])]
    axes.set_xlim(min([0.0, *estimates]) - 0.1, max([1.0, *estimates]) + 0.1)
    _label(axes, title, "Sobol index (share of the score's variance)", "")
    figure.legend(fontsize=_LEGEND_SIZE, loc="outside lower center", ncols=2)
    return _png(figure)


def _label(axes: Axes, title: str, x_label: str, y_label: str) -> None:
    axes.set_title(title, fontsize=_TITLE_SIZE)
    axes.set_xlabel(x_label, fontsize=_LABEL_SIZE)
    axes.set_ylabel(y_label, fontsize=_LABEL_SIZE)
    axes.tick_params(labelsize=_TICK_SIZE)


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
