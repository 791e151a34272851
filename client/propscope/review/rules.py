"""The review rules: pure functions from the candidate's (and baseline's) per-image numbers to
one pass/fail outcome per rule and property.

``no_regression`` tests the paired differences d_i = c_i − ((1 + tolerance)·b_i + margin) over
images with a one-sided Wilcoxon signed-rank test: scores are skewed and bounded at zero, so a
t-test's normality would be a poor assumption, and pairing removes the spread between images
that the two models share. The rule fails only when the mean difference is positive *and*
significant at the rule's alpha: a candidate that is worse by noise alone passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from propscope._properties import Box
from propscope.review.results import ReviewResult, RuleOutcome
from propscope.review.spec import (
    MaxAttributionShareRule,
    MaxFlipRateRule,
    MaxScoreRule,
    NoRegressionRule,
    NotSignificantRule,
    Rule,
)

__all__ = ["attribution_share", "box_pixels", "evaluate_rules", "paired_regression_p_value"]


def evaluate_rules(rules: Sequence[Rule], result: ReviewResult) -> list[RuleOutcome]:
    """One outcome per rule and property, in spec order."""
    outcomes = []
    for rule in rules:
        if isinstance(rule, MaxAttributionShareRule):
            outcomes.append(_max_attribution_share(rule, result))
            continue
        for property_name in rule.properties or result.properties:
            outcomes.append(_evaluate(rule, result, property_name))
    return outcomes


def paired_regression_p_value(differences: np.ndarray) -> float:
    """One-sided p-value that the paired differences are centred above zero (1.0 when every
    difference is zero: no evidence either way)."""
    if differences.size == 0 or not np.any(differences):
        return 1.0
    return float(stats.wilcoxon(differences, alternative="greater").pvalue)


def box_pixels(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) rows and columns of ``box`` on a height x width map: every
    pixel the box touches, at least one, clipped to the map."""
    if box.pixels:
        left, top, right, bottom = box.left, box.top, box.right, box.bottom
    else:
        left, right = box.left * width, box.right * width
        top, bottom = box.top * height, box.bottom * height
    row0 = min(max(0, math.floor(top)), height - 1)
    col0 = min(max(0, math.floor(left)), width - 1)
    row1 = min(height, max(row0 + 1, math.ceil(bottom)))
    col1 = min(width, max(col0 + 1, math.ceil(right)))
    return row0, row1, col0, col1


def attribution_share(values: np.ndarray, box: Box) -> tuple[float, float]:
    """The share of the map's positive mass inside ``box``, and that mass: negative values
    (evidence against the class) are left out of both, so that they cannot cancel evidence
    for it. A map with no positive mass has share 0."""
    positive = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    total = float(positive.sum())
    if total <= 0:
        return 0.0, 0.0
    row0, row1, col0, col1 = box_pixels(box, *positive.shape)
    return float(positive[row0:row1, col0:col1].sum()) / total, total


def _max_attribution_share(rule: MaxAttributionShareRule, result: ReviewResult) -> RuleOutcome:
    observations = result.shares(rule.name)
    if not observations:
        raise ValueError(f"no attribution map to check max_attribution_share[{rule.name}] on")
    shares = np.array([obs.share for obs in observations], dtype=np.float64)
    over = int((shares > rule.max).sum())
    worst = observations[int(np.argmax(shares))]
    mean = float(shares.mean())
    if rule.over == "mean":
        passed = mean <= rule.max
        verdict = f"mean share {mean:.1%} of the attribution mass in {rule.name}"
    else:
        passed = over == 0
        verdict = f"{over} of {shares.size} images put more than {rule.max:.1%} in {rule.name}"
    settings = rule.attribution
    return RuleOutcome(
        rule=rule.rule,
        property_name=rule.name,
        passed=passed,
        message=(
            f"{verdict}; allowed at most {rule.max:.1%}"
            + (" on average" if rule.over == "mean" else " on every image")
            + f" (highest {worst.share:.1%} on {worst.image}; {worst.method} maps of "
            f"{shares.size} images)"
        ),
        details={
            "region": rule.name,
            "over": rule.over,
            "mean_share": mean,
            "max_share": float(shares.max()),
            "max": rule.max,
            "images_over_max": over,
            "images": int(shares.size),
            "worst_image": worst.image,
            "method": settings.method,
            "target_score": settings.target_score,
            "images_without_positive_mass": sum(obs.positive_mass == 0 for obs in observations),
        },
    )


def _evaluate(rule: Rule, result: ReviewResult, property_name: str) -> RuleOutcome:
    candidate = result.model("candidate")
    assert candidate is not None, "a review always has a candidate"
    if not result.select(candidate.label, property_name):
        raise ValueError(f"no observation of property {property_name!r} to check {rule.rule} on")
    if isinstance(rule, NotSignificantRule):
        return _not_significant(rule, result, candidate.label, property_name)
    if isinstance(rule, MaxScoreRule):
        return _max_score(rule, result, candidate.label, property_name)
    if isinstance(rule, NoRegressionRule):
        return _no_regression(rule, result, candidate.label, property_name)
    return _max_flip_rate(rule, result, candidate.label, property_name)


def _not_significant(
    rule: NotSignificantRule, result: ReviewResult, model: str, property_name: str
) -> RuleOutcome:
    flags = result.values(model, property_name, rule.decision)
    count = int(flags.sum())
    fraction = count / flags.size
    passed = fraction <= rule.max_fraction
    return RuleOutcome(
        rule=rule.rule,
        property_name=property_name,
        passed=passed,
        message=(
            f"{rule.decision} on {count} of {flags.size} images ({fraction:.0%}); "
            f"allowed at most {rule.max_fraction:.0%}"
        ),
        details={
            "decision": rule.decision,
            "count": count,
            "images": int(flags.size),
            "fraction": fraction,
            "max_fraction": rule.max_fraction,
        },
    )


def _max_score(
    rule: MaxScoreRule, result: ReviewResult, model: str, property_name: str
) -> RuleOutcome:
    mean = float(result.values(model, property_name, rule.metric).mean())
    return RuleOutcome(
        rule=rule.rule,
        property_name=property_name,
        passed=mean <= rule.max,
        message=f"mean {rule.metric} {mean:.4g}; allowed at most {rule.max:.4g}",
        details={"metric": rule.metric, "mean": mean, "max": rule.max},
    )


def _no_regression(
    rule: NoRegressionRule, result: ReviewResult, model: str, property_name: str
) -> RuleOutcome:
    baseline = result.model("baseline")
    assert baseline is not None, "the spec checks that no_regression has a baseline"
    candidate_values = result.values(model, property_name, rule.metric)
    baseline_values = result.values(baseline.label, property_name, rule.metric)
    allowed = (1 + rule.tolerance) * baseline_values + rule.margin
    differences = candidate_values - allowed
    if not np.all(np.isfinite(differences)):
        raise ValueError(
            f"{property_name}: non-finite {rule.metric} values; the test needs numbers"
        )
    p_value = paired_regression_p_value(differences)
    regressed = bool(differences.mean() > 0 and p_value < rule.alpha)
    candidate_mean, baseline_mean = float(candidate_values.mean()), float(baseline_values.mean())
    allowed_mean = float(allowed.mean())
    verdict = "regressed" if regressed else "no significant regression"
    return RuleOutcome(
        rule=rule.rule,
        property_name=property_name,
        passed=not regressed,
        message=(
            f"{verdict}: mean {rule.metric} {candidate_mean:.4g} vs allowed {allowed_mean:.4g} "
            f"(baseline {baseline_mean:.4g} × {1 + rule.tolerance:g}"
            + (f" + {rule.margin:g}" if rule.margin else "")
            + f"); paired Wilcoxon p = {p_value:.3g}, alpha {rule.alpha:g}, "
            f"{candidate_values.size} images"
        ),
        details={
            "metric": rule.metric,
            "candidate_mean": candidate_mean,
            "baseline_mean": baseline_mean,
            "allowed_mean": allowed_mean,
            "tolerance": rule.tolerance,
            "margin": rule.margin,
            "p_value": p_value,
            "alpha": rule.alpha,
            "images": int(candidate_values.size),
            "test": "one-sided Wilcoxon signed-rank on candidate - allowed",
        },
    )


def _max_flip_rate(
    rule: MaxFlipRateRule, result: ReviewResult, model: str, property_name: str
) -> RuleOutcome:
    flip_rate = float(result.values(model, property_name, "flip_rate").mean())
    return RuleOutcome(
        rule=rule.rule,
        property_name=property_name,
        passed=flip_rate <= rule.max,
        message=f"prediction flips on {flip_rate:.0%} of paths; allowed at most {rule.max:.0%}",
        details={"flip_rate": flip_rate, "max": rule.max},
    )
