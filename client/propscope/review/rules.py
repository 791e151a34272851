"""The review rules: pure functions from the candidate's (and baseline's) per-image numbers to
one verdict per rule and property: passed, failed, or inconclusive when the set cannot decide.

``no_regression`` tests the paired differences d_i = c_i − ((1 + tolerance)·b_i + margin) over
images with one-sided Wilcoxon signed-rank tests: scores are skewed and bounded at zero, so a
t-test's normality would be a poor assumption, and pairing removes the spread between images
that the two models share. The rule fails when the mean difference is positive *and* the
candidate is significantly above the allowance at the rule's alpha, passes when the mean is
within it and the reverse test says so at alpha, and is inconclusive otherwise: a candidate
that is worse by noise alone, or on too few images to tell, is not reported as passed.

The accuracy rules decide by confidence intervals at 1 − 2·alpha (a one-sided test at alpha on
either side): passed when the interval lies on the allowed side of the threshold, failed when
it lies on the other, inconclusive when it straddles it. ``not_significant`` is inconclusive
when the images whose test could not reach alpha at their path length could tip it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import stats

from propscope._properties import Box
from propscope.review.results import ReviewResult, RuleOutcome, Verdict
from propscope.review.spec import (
    MaxAttributionShareRule,
    MaxFlipRateRule,
    MaxInteractionShareRule,
    MaxScoreRule,
    MinAccuracyRule,
    NoAccuracyRegressionRule,
    NoRegressionRule,
    NotSignificantRule,
    Rule,
)

__all__ = [
    "accuracy_interval",
    "attribution_share",
    "box_pixels",
    "evaluate_rules",
    "paired_accuracy_interval",
    "paired_regression_p_value",
]

# The decision of an image whose test could not reach alpha at its path length.
UNDECIDED = "cannot_reach_alpha"


def evaluate_rules(rules: Sequence[Rule], result: ReviewResult) -> list[RuleOutcome]:
    """One outcome per rule and property, in spec order."""
    outcomes = []
    for rule in rules:
        if isinstance(rule, MaxAttributionShareRule):
            outcomes.append(_max_attribution_share(rule, result))
        elif isinstance(rule, MaxInteractionShareRule):
            outcomes.append(_max_interaction_share(rule, result))
        elif isinstance(rule, MinAccuracyRule):
            outcomes.append(_min_accuracy(rule, result))
        elif isinstance(rule, NoAccuracyRegressionRule):
            outcomes.append(_no_accuracy_regression(rule, result))
        else:
            outcomes += [
                _evaluate(rule, result, name) for name in rule.properties or result.properties
            ]
    return outcomes


def paired_regression_p_value(differences: np.ndarray, alternative: str = "greater") -> float:
    """One-sided p-value that the paired differences are centred above zero (``alternative``
    "less": below zero); 1.0 when every difference is zero: no evidence either way."""
    if differences.size == 0 or not np.any(differences):
        return 1.0
    return float(stats.wilcoxon(differences, alternative=alternative).pvalue)


def accuracy_interval(correct: int, images: int, confidence: float) -> tuple[float, float]:
    """The Clopper-Pearson (exact binomial) interval of an accuracy of ``correct`` of
    ``images``."""
    return _proportion_interval(correct, images, confidence, "exact")


def paired_accuracy_interval(
    candidate: Sequence[bool], baseline: Sequence[bool], confidence: float
) -> tuple[float, float, float]:
    """The candidate's accuracy minus the baseline's on the same images, with Newcombe's hybrid
    score interval for paired proportions (Newcombe 1998, method 10): each accuracy's Wilson
    interval, combined with the correlation of the two models' hits."""
    hits = np.array(candidate, dtype=bool), np.array(baseline, dtype=bool)
    n = hits[0].size
    both = int(np.sum(hits[0] & hits[1]))
    only_candidate = int(np.sum(hits[0] & ~hits[1]))
    only_baseline = int(np.sum(~hits[0] & hits[1]))
    neither = n - both - only_candidate - only_baseline
    p1, p2 = (both + only_candidate) / n, (both + only_baseline) / n
    (l1, u1), (l2, u2) = (
        _proportion_interval(int(k), n, confidence, "wilson")
        for k in (both + only_candidate, both + only_baseline)
    )
    margins = (
        (both + only_candidate) * (only_baseline + neither)
        * (both + only_baseline) * (only_candidate + neither)
    )  # fmt: skip
    agreement = both * neither - only_candidate * only_baseline
    # Newcombe's continuity-corrected phi: positive agreement shrinks by n / 2, never below 0.
    if margins == 0 or 0 <= agreement <= n / 2:
        phi = 0.0
    else:
        phi = (agreement - n / 2 if agreement > 0 else agreement) / math.sqrt(margins)
    difference = p1 - p2
    low = difference - math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    high = difference + math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return difference, max(-1.0, low), min(1.0, high)


def _proportion_interval(
    successes: int, trials: int, confidence: float, method: Literal["exact", "wilson"]
) -> tuple[float, float]:
    """SciPy's binomial proportion interval of ``successes`` of ``trials`` by ``method``."""
    interval = stats.binomtest(successes, trials).proportion_ci(confidence, method=method)
    return float(interval.low), float(interval.high)


def _interval_verdict(low: float, high: float, threshold: float) -> Verdict:
    """Passed when the interval lies at or above ``threshold``, failed when below it."""
    if low >= threshold:
        return "passed"
    return "failed" if high < threshold else "inconclusive"


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
    # an EVA gate says whether its maps rest on guaranteed bounds (a hybrid's do not)
    kind = f"{worst.method} ({worst.guarantee})" if worst.guarantee else worst.method
    return RuleOutcome(
        rule=rule.rule,
        property_name=rule.name,
        verdict=_verdict(passed),
        message=(
            f"{verdict}; allowed at most {rule.max:.1%}"
            + (" on average" if rule.over == "mean" else " on every image")
            + f" (highest {worst.share:.1%} on {worst.image}; {kind} maps of "
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
            "guarantee": worst.guarantee or None,
            "target_score": settings.target_score,
            "images_without_positive_mass": sum(obs.positive_mass == 0 for obs in observations),
        },
    )


def _max_interaction_share(rule: MaxInteractionShareRule, result: ReviewResult) -> RuleOutcome:
    """Each image's share comes with its bootstrap interval at the rule's confidence. Over
    ``mean``: the means of the images' lower and upper bounds bound the mean share (wider than
    the mean's own interval: conservative both ways). Over ``every_image``: failed when some
    image's interval lies above ``max``, passed when every image's lies at or below it.

    An image whose score barely moves (``negligible_variance``: sd below 0.01 over the design)
    counts as share 0 with interval [0, 0]: the properties do not move the prediction there,
    so they cannot interact in a way that matters, and its indices only apportion noise."""
    observations = result.interaction_indices(rule.name)
    if not observations:
        raise ValueError(f"no interaction indices to check max_interaction_share[{rule.name}] on")
    flat = np.array([obs.negligible_variance for obs in observations], dtype=bool)

    def counted(values: list[float]) -> np.ndarray:
        return np.where(flat, 0.0, np.array(values, dtype=np.float64))

    shares = counted([obs.share for obs in observations])
    lows = counted([obs.share_low for obs in observations])
    highs = counted([obs.share_high for obs in observations])
    above = int((lows > rule.max).sum())
    straddling = int(((lows <= rule.max) & (highs > rule.max)).sum())
    worst = observations[int(np.argmax(shares))]
    level = f"{observations[0].confidence:.0%}"
    if rule.over == "mean":
        low, high = float(lows.mean()), float(highs.mean())
        verdict: Verdict = (
            "failed" if low > rule.max else "passed" if high <= rule.max else "inconclusive"
        )
        measured = (
            f"mean interaction share {shares.mean():.3f} (images' {level} bounds averaged: "
            f"{low:.3f}–{high:.3f})"
        )
    else:
        verdict = "failed" if above else "inconclusive" if straddling else "passed"
        measured = (
            f"{above} of {shares.size} images' interaction share lies above it, "
            f"{straddling} straddle it ({level} intervals)"
        )
    significant = sum(obs.significant for obs in observations)
    flat_images = int(flat.sum())
    warned = sum(bool(obs.warnings) for obs in observations)
    warnings = sum(len(obs.warnings) for obs in observations)
    message = (
        f"{measured}; allowed at most {rule.max:.3f}"
        + (" on average" if rule.over == "mean" else " on every image")
        + f" (highest {float(shares.max()):.3f} on {worst.image}; significant interactions on "
        f"{significant} of {shares.size} images; {', '.join(worst.properties)})"
    )
    if flat_images:
        message += (
            f"; {flat_images} of {shares.size} images flat (the score barely moves: "
            "counted as share 0)"
        )
    if warned:
        message += f"; {warned} image{'s' if warned != 1 else ''} with warnings ({warnings} in all)"
    if verdict == "inconclusive":
        message += "; the intervals straddle it: a larger design_size or more images needed"
    return RuleOutcome(
        rule=rule.rule,
        property_name=rule.name,
        verdict=verdict,
        message=message,
        details={
            "over": rule.over,
            "properties": ", ".join(worst.properties),
            "mean_share": float(shares.mean()),
            "mean_share_low": float(lows.mean()),
            "mean_share_high": float(highs.mean()),
            "max_share": float(shares.max()),
            "max": rule.max,
            "images_above_max": above,
            "images_straddling_max": straddling,
            "images_significant": int(significant),
            "images_flat": flat_images,
            "images_with_warnings": warned,
            "warnings": warnings,
            "images": int(shares.size),
            "worst_image": worst.image,
            "confidence": observations[0].confidence,
            "design_size": worst.design_size,
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
    flags = result.values(model, property_name, rule.decision).astype(bool)
    observations = result.select(model, property_name)
    undecided = int(
        sum(
            obs.decision == UNDECIDED and not flag
            for obs, flag in zip(observations, flags, strict=True)
        )
    )
    count = int(flags.sum())
    fraction = count / flags.size
    at_most = (count + undecided) / flags.size
    if fraction > rule.max_fraction:
        verdict: Verdict = "failed"
    else:
        verdict = "passed" if at_most <= rule.max_fraction else "inconclusive"
    message = (
        f"{rule.decision} on {count} of {flags.size} images ({fraction:.0%}); "
        f"allowed at most {rule.max_fraction:.0%}"
    )
    if undecided:
        message += (
            f"; {undecided} image{'s' if undecided != 1 else ''} undecidable at their path length "
            f"(the test could not reach alpha) {'could tip it' if verdict == 'inconclusive' else 'cannot tip it'}"
        )
    return RuleOutcome(
        rule=rule.rule,
        property_name=property_name,
        verdict=verdict,
        message=message,
        details={
            "decision": rule.decision,
            "count": count,
            "undecided": undecided,
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
        verdict=_verdict(mean <= rule.max),
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
    p_within = paired_regression_p_value(differences, "less")
    mean_difference = float(differences.mean())
    if mean_difference > 0 and p_value < rule.alpha:
        verdict: Verdict = "failed"
        words = "regressed"
    elif mean_difference <= 0 and p_within < rule.alpha:
        verdict, words = "passed", "within the allowance"
    else:
        verdict, words = "inconclusive", "neither a regression nor its absence is significant"
    candidate_mean, baseline_mean = float(candidate_values.mean()), float(baseline_values.mean())
    allowed_mean = float(allowed.mean())
    return RuleOutcome(
        rule=rule.rule,
        property_name=property_name,
        verdict=verdict,
        message=(
            f"{words}: mean {rule.metric} {candidate_mean:.4g} vs allowed {allowed_mean:.4g} "
            f"(baseline {baseline_mean:.4g} × {1 + rule.tolerance:g}"
            + (f" + {rule.margin:g}" if rule.margin else "")
            + f"); paired Wilcoxon p = {p_value:.3g} above, {p_within:.3g} within; "
            f"alpha {rule.alpha:g}, {candidate_values.size} images"
        ),
        details={
            "metric": rule.metric,
            "candidate_mean": candidate_mean,
            "baseline_mean": baseline_mean,
            "allowed_mean": allowed_mean,
            "tolerance": rule.tolerance,
            "margin": rule.margin,
            "p_value": p_value,
            "p_value_within": p_within,
            "alpha": rule.alpha,
            "images": int(candidate_values.size),
            "test": "one-sided Wilcoxon signed-rank tests on candidate - allowed",
        },
    )


def _max_flip_rate(
    rule: MaxFlipRateRule, result: ReviewResult, model: str, property_name: str
) -> RuleOutcome:
    flip_rate = float(result.values(model, property_name, "flip_rate").mean())
    return RuleOutcome(
        rule=rule.rule,
        property_name=property_name,
        verdict=_verdict(flip_rate <= rule.max),
        message=f"prediction flips on {flip_rate:.0%} of paths; allowed at most {rule.max:.0%}",
        details={"flip_rate": flip_rate, "max": rule.max},
    )


def _min_accuracy(rule: MinAccuracyRule, result: ReviewResult) -> RuleOutcome:
    candidate = result.model("candidate")
    assert candidate is not None, "a review always has a candidate"
    hits = list(result.correct(candidate.label).values())
    if not hits:
        raise ValueError("min_accuracy needs labelled images; the set has none")
    low, high = accuracy_interval(sum(hits), len(hits), 1 - 2 * rule.alpha)
    verdict = _interval_verdict(low, high, rule.min)
    accuracy = sum(hits) / len(hits)
    return RuleOutcome(
        rule=rule.rule,
        property_name=candidate.label,
        verdict=verdict,
        message=(
            f"accuracy {accuracy:.1%} ({sum(hits)} of {len(hits)} labelled images), "
            + _interval_tail(
                rule.alpha, f"{low:.1%}–{high:.1%}", f"required at least {rule.min:.1%}", verdict
            )
        ),
        details={
            "accuracy": accuracy,
            "correct": sum(hits),
            "images": len(hits),
            "interval_low": low,
            "interval_high": high,
            "min": rule.min,
            "alpha": rule.alpha,
            "interval": "Clopper-Pearson (exact binomial)",
        },
    )


def _no_accuracy_regression(rule: NoAccuracyRegressionRule, result: ReviewResult) -> RuleOutcome:
    candidate, baseline = result.model("candidate"), result.model("baseline")
    assert candidate is not None and baseline is not None, "the spec checks there is a baseline"
    candidate_hits, baseline_hits = result.correct(candidate.label), result.correct(baseline.label)
    images = [image for image in candidate_hits if image in baseline_hits]
    if not images:
        raise ValueError("no_accuracy_regression needs labelled images; the set has none")
    difference, low, high = paired_accuracy_interval(
        [candidate_hits[i] for i in images], [baseline_hits[i] for i in images], 1 - 2 * rule.alpha
    )
    verdict = _interval_verdict(low, high, -rule.max_drop)
    candidate_accuracy = sum(candidate_hits[i] for i in images) / len(images)
    baseline_accuracy = sum(baseline_hits[i] for i in images) / len(images)
    return RuleOutcome(
        rule=rule.rule,
        property_name=candidate.label,
        verdict=verdict,
        message=(
            f"accuracy {candidate_accuracy:.1%} vs baseline {baseline_accuracy:.1%} on "
            f"{len(images)} labelled images: difference {difference:+.1%}, "
            + _interval_tail(
                rule.alpha,
                f"{low:+.1%} to {high:+.1%}",
                f"allowed drop at most {rule.max_drop:.1%}",
                verdict,
            )
        ),
        details={
            "candidate_accuracy": candidate_accuracy,
            "baseline_accuracy": baseline_accuracy,
            "difference": difference,
            "interval_low": low,
            "interval_high": high,
            "max_drop": rule.max_drop,
            "alpha": rule.alpha,
            "images": len(images),
            "interval": "Newcombe hybrid score, paired (method 10)",
        },
    )


def _verdict(passed: bool) -> Verdict:
    return "passed" if passed else "failed"


def _interval_tail(alpha: float, interval: str, required: str, verdict: Verdict) -> str:
    """How an interval rule's message ends: the (1 - 2 alpha) interval, what is required and,
    when the interval straddles it, that more images are needed."""
    straddles = " (the interval straddles it: more images needed)"
    return (
        f"{1 - 2 * alpha:.0%} interval {interval}; {required}"
        f"{straddles if verdict == 'inconclusive' else ''}"
    )
