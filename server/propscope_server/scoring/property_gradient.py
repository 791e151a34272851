"""The expected property gradient magnitude E|dp| and its permutation test
(arXiv 2503.05424, official code: `np.mean(np.abs(np.gradient(p)))`).

`p` is the target class's probability along the path [x_0, x_1, ..., x_N].
Deliberate deviation from the paper: p-values are (b + 1) / (K + 1), so a
p-value is never exactly 0 with finitely many permutations.

Significance says that p changes in an *orderly* way along the path, not that
it changes *much*: a background edit that moves p by 1e-5 in small steps is
significant too. `relevant` adds an effect size, the change of p along the
path (max - min), so that a caller can act on the decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy import stats

from propscope_server.scoring.curve_statistics import (
    mean_defined,
    mutual_information,
    pearson_correlation,
)

# Elements per permutation chunk: bounds memory for large K x S x (N + 1).
CHUNK_ELEMENTS = 4_000_000
BOOTSTRAP_RESAMPLES = 2_000
TIE_TOLERANCE = 1e-12
# The default minimal relevant change of the target probability along the path;
# docs/results/bias_table.md shows how it separates shortcut from untouched properties.
DEFAULT_MIN_PROBABILITY_CHANGE = 0.05


class Decision(Enum):
    """Why a property is or is not relevant."""

    RELEVANT = "relevant"
    NOT_SIGNIFICANT = "not significant"
    CHANGE_TOO_SMALL = "change too small"
    CANNOT_REACH_ALPHA = "cannot reach alpha"


@dataclass(frozen=True)
class PropertyScore:
    score: float
    score_per_unit_strength: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool
    prediction_flipped: bool
    flip_rate: float
    mean_signed_gradient: float
    probability_change: float
    relevant: bool
    pearson_correlation: float | None
    mutual_information: float | None
    sample_scores: tuple[float, ...]
    sample_p_values: tuple[float, ...]
    decision: Decision
    decision_detail: str
    # The p-value of the curves' values in their most ordered arrangement (each
    # curve sorted): the best this test could give these values at this N.
    best_p_value: float | None = None


def gradient_magnitude(curves: np.ndarray) -> np.ndarray:
    """E|dp| with unit spacing along the last axis, the paper's score."""
    return np.mean(np.abs(np.gradient(curves, axis=-1)), axis=-1)


def permutation_p_values(
    curves: np.ndarray, permutations: int, rng: np.random.Generator
) -> tuple[np.ndarray, float]:
    """Two-sided permutation test of each curve's score and of their mean.

    Each permutation shuffles every curve independently; the statistic's
    distance from the null mean is compared, as in the paper. Returns
    (p-value per curve, p-value of the mean score).
    """
    curves = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    observed = gradient_magnitude(curves)
    per_chunk = max(1, CHUNK_ELEMENTS // curves.size)
    null_scores = []
    remaining = permutations
    while remaining > 0:
        count = min(per_chunk, remaining)
        shuffled = rng.permuted(np.broadcast_to(curves, (count, *curves.shape)), axis=-1)
        null_scores.append(gradient_magnitude(shuffled))
        remaining -= count
    null = np.concatenate(null_scores)  # [K, S]
    per_curve = _two_sided(observed, null)
    of_mean = _two_sided(observed.mean(keepdims=True), null.mean(axis=1, keepdims=True))[0]
    return per_curve, float(of_mean)


def _two_sided(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    center = null.mean(axis=0)
    # Scores are at most 1: an absolute tolerance keeps float noise from splitting ties.
    extreme = np.abs(null - center) >= np.abs(observed - center) - TIE_TOLERANCE
    return (extreme.sum(axis=0) + 1.0) / (null.shape[0] + 1.0)


def bootstrap_interval(
    values: np.ndarray, rng: np.random.Generator, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; a single value is its own interval."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or np.ptp(values) == 0.0:
        mean = float(values.mean())
        return mean, mean
    result = stats.bootstrap(
        (values,),
        np.mean,
        confidence_level=confidence,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        rng=rng,
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def score_property(
    curves: np.ndarray,
    predicted_classes: np.ndarray,
    permutations: int,
    alpha: float,
    seed: int | Sequence[int],
    min_probability_change: float = DEFAULT_MIN_PROBABILITY_CHANGE,
) -> PropertyScore:
    """Score one property from its S sampled paths.

    curves: [S, N + 1] target-class probability along each path.
    predicted_classes: [S, N + 1] argmax class along each path.
    The pooled p-value tests the distinct curves only: identical samples (a
    deterministic editor) must not narrow the null distribution. The property
    is relevant when it is significant and p changes along the paths by at
    least `min_probability_change` on average.
    """
    curves = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    predicted_classes = np.atleast_2d(predicted_classes)
    if curves.shape[-1] < 2:
        raise ValueError("a path needs at least two points (the original and one edit)")
    rng = np.random.default_rng(seed)
    sample_scores = gradient_magnitude(curves)
    distinct, which = np.unique(curves, axis=0, return_inverse=True)
    distinct_p_values, p_value = permutation_p_values(distinct, permutations, rng)
    sample_p_values = distinct_p_values[which.reshape(-1)]
    ci_low, ci_high = bootstrap_interval(sample_scores, rng)
    flipped = np.any(predicted_classes != predicted_classes[:, :1], axis=1)
    steps = curves.shape[-1] - 1
    score = float(sample_scores.mean())
    significant = p_value < alpha
    probability_change = float(np.ptp(curves, axis=-1).mean())
    decision, detail, best_p_value = decide(
        distinct, p_value, probability_change, permutations, alpha, min_probability_change, rng
    )
    return PropertyScore(
        score=score,
        score_per_unit_strength=score * steps,
        ci_low=ci_low,
        ci_high=ci_high,
        p_value=p_value,
        significant=significant,
        prediction_flipped=bool(flipped.any()),
        flip_rate=float(flipped.mean()),
        mean_signed_gradient=float(np.gradient(curves, axis=-1).mean()),
        probability_change=probability_change,
        relevant=significant and probability_change >= min_probability_change,
        pearson_correlation=mean_defined([pearson_correlation(c) for c in curves]),
        mutual_information=mean_defined([mutual_information(c) for c in curves]),
        sample_scores=tuple(float(s) for s in sample_scores),
        sample_p_values=tuple(float(p) for p in sample_p_values),
        decision=decision,
        decision_detail=detail,
        best_p_value=best_p_value,
    )


def best_p_value(curves: np.ndarray, permutations: int, rng: np.random.Generator) -> float:
    """The pooled p-value of the curves' values in their most ordered arrangement.

    A function of each curve's multiset of values only, never of their order: under
    an exchangeable null it carries no information about the observed p-value, so a
    path length chosen from it (adaptive paths) leaves the final test calibrated.
    """
    return permutation_p_values(np.sort(curves, axis=-1), permutations, rng)[1]


def decide(
    distinct_curves: np.ndarray,
    p_value: float,
    probability_change: float,
    permutations: int,
    alpha: float,
    min_probability_change: float,
    rng: np.random.Generator,
) -> tuple[Decision, str, float | None]:
    """The decision, its reason in words, and the best achievable p-value when it
    was needed (a large change that is not significant)."""
    steps = distinct_curves.shape[-1] - 1
    change = f"p changes by {probability_change:.3g}"
    if probability_change == 0.0 or probability_change < min_probability_change:
        return (
            Decision.CHANGE_TOO_SMALL,
            f"{change}, less than min_probability_change {min_probability_change:g}",
            None,
        )
    if p_value < alpha:
        return (
            Decision.RELEVANT,
            f"significant (p = {p_value:.3g} < alpha {alpha:g}) and {change} "
            f"(>= {min_probability_change:g})",
            None,
        )
    best = best_p_value(distinct_curves, permutations, rng)
    if best < alpha:
        return (
            Decision.NOT_SIGNIFICANT,
            f"{change}, but not in an orderly way along the path (p = {p_value:.3g} >= alpha "
            f"{alpha:g}; sorted, these values would give p = {best:.3g})",
            best,
        )
    return (
        Decision.CANNOT_REACH_ALPHA,
        f"{change}, but the test cannot reach alpha {alpha:g} at N = {steps} for this "
        f"curve: even sorted into a monotone path its values give p = {best:.3g} (e.g. a "
        "single jump in the last steps); a longer path (adaptive paths, max_steps) can decide",
        best,
    )
