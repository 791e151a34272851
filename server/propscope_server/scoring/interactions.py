"""Sobol indices over semantic interventions: the design over P edit strengths, the
first-, total- and second-order estimators with bootstrap intervals, and the plan
of edits that composes each design row's image (docs/interactions.md).

Choices, and why:

- Design: a scipy Sobol sequence of dimension 2P, Owen-scrambled with the request's
  seed. Unlike `scoring/sobol.py` (which follows Xplique's unscrambled sequence for
  parity), this method is ours, and unscrambled Sobol pairs some columns badly at
  small N (see that module's docstring). A = first P columns, B = last P; C_i = A
  with column i from B; the pair's C_ij = A with columns i and j from B. Rows in the
  order A, B, C_1 .. C_P, C_ij.
- Estimators, with V = var(f_A ++ f_B) (ddof 1) and m = mean(f_A ++ f_B): first
  order (Saltelli et al. 2010) S_i = mean((f_B - m) (f_Ci - f_A)) / V; total order
  (Jansen 1999) ST_i = mean((f_A - f_Ci)^2) / (2 V); closed second order (Saltelli
  2002) S_ij = mean((f_B - m) (f_Cij - f_A)) / V - S_i - S_j; interaction share
  sum ST_i - sum S_i. Using A and B for V (2N values) halves its noise compared
  with var(f_A) alone. Centring f_B by m makes the first-order estimate independent
  of the score's offset: uncentred, on f = x1 x2 + 5 at N = 32 (200 seeds) its RMSE
  is 0.45 against 0.08 centred, and a logit's mean is routinely that far from 0. The
  price is an O(1/N) bias, not an unbiased numerator: m includes row j's own f_A and
  f_B, so with independent rows E = V_i + (VT_i - V_i) / (2N) (the pair's likewise).
  It raises S_i only where i interacts, so it lowers the share a little (conservative);
  measured on (x1 - .5)(x2 - .5) (S = 0), 4000 seeds: +0.06 at N 4, +0.01 at N 8,
  +0.002 at N 32, against RMSEs of 0.74, 0.48 and 0.29.
- Intervals: percentile bootstrap over the N design rows: one resample draws N row
  indices and uses them for A, B and every C block alike (a row's A, B and C values
  are one joint draw), V recomputed per resample. The bootstrap treats the rows as
  independent, which overstates the spread of a scrambled QMC estimate: the intervals
  are conservative.
- V below 1e-12 (no property moves the score over A and B): every index is 0 with a
  warning, never NaN; a resample whose V falls below it contributes 0 likewise.
- A score whose sd over A and B is below 0.01 (in its units: a saturated probability's
  ninth decimal) keeps its indices but is flagged `negligible_variance`: they apportion
  a variance nobody acts on, and their bootstrap is the score's noise (share 2.92
  [0.48, 45.5] was seen at V 7e-11), so the share is never called significant then and
  the interval warnings (which advise a larger design) are left out.
- Interval warnings say what to do: the share's interval wider than 0.5 and reaching 0
  cannot decide whether the properties interact (a larger design narrows it); a wide
  interval of a decided share or of one index decides what it must and is not warned
  about. A point estimate on or outside its own percentile interval (at N 8 one row can
  carry the estimate: share 1.75 [0, 1.75]) means the resamples are too lopsided for
  the percentile interval to be trusted at that design size.
- Composition: row r's image is edit_P(...edit_1(image, s_1)..., s_P). Stage k calls
  editor k once per distinct prefix of strengths (s_1..s_{k-1}) with every distinct
  s_k under it as one strengths vector (ascending, the editors' path order). A
  strength of exactly 0 is the identity: the prefix's image passes on unchanged and
  the editor is not asked for it (procedural editors return the input at 0 anyway;
  a diffusion editor's round trip would not, and the design's strength-0 point is
  defined as the request's image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import qmc

DEFAULT_DESIGN_SIZE = 32
DEFAULT_BOOTSTRAP = 1000
DEFAULT_CONFIDENCE = 0.95
# Below this variance of the score over A and B the indices are reported as 0.
VARIANCE_FLOOR = 1e-12
# Below this standard deviation over A and B (in the score's units, probability or logit) the
# indices are kept but warned about: they apportion a negligible variance (a saturated
# probability's ninth decimal).
NEGLIGIBLE_SD = 0.01
# The interaction share's interval wider than this and reaching 0 cannot decide: warned about,
# with a design size that narrows it (4x the rows halves a bootstrap interval's width).
WIDE_INTERVAL = 0.5
WIDER_DESIGN_FACTOR = 4
UNRELIABLE_SHOWN = 3  # estimates the unreliable-bootstrap warning names
# Mixed into the request seed so the bootstrap's stream differs from the scrambling's.
_BOOTSTRAP_STREAM = 0x1B007
# Resample counts are built this many values (resamples x rows) at a time.
_BOOTSTRAP_CHUNK_VALUES = 1 << 21


@dataclass(frozen=True)
class Design:
    """The design rows [R, P] float32 in [0, 1) and what each row is."""

    rows: np.ndarray
    kinds: list[str]
    design_size: int
    pair: tuple[int, int] | None

    @property
    def properties(self) -> int:
        return int(self.rows.shape[1])


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap percentile interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class IndicesEstimate:
    """Indices per property (composition order), the pair's, the interaction share.
    ``negligible_variance``: the score's sd over A and B is below ``NEGLIGIBLE_SD``
    (``significant`` is then false whatever the share's interval)."""

    first: tuple[Interval, ...]
    total: tuple[Interval, ...]
    interaction: tuple[Interval, ...]
    second_order: Interval | None
    share: Interval
    significant: bool
    variance: float
    mean: float
    warnings: tuple[str, ...]
    negligible_variance: bool = False


@dataclass(frozen=True)
class EditCall:
    """One editor call: the strengths applied so far (the input image) and the
    strengths (ascending, none 0) to apply to it in one call."""

    prefix: tuple[float, ...]
    strengths: tuple[float, ...]


@dataclass(frozen=True)
class EditStage:
    """The calls of editor `property` (0-based, composition order)."""

    property: int
    calls: tuple[EditCall, ...]

    @property
    def editor_calls(self) -> int:
        return len(self.calls)

    @property
    def edits(self) -> int:
        """Edited images this stage produces."""
        return sum(len(call.strengths) for call in self.calls)


def design_row_count(properties: int, design_size: int, pair: bool) -> int:
    """N (P + 2) rows, N (P + 3) with a second-order pair: images per estimate."""
    return design_size * (properties + 2 + (1 if pair else 0))


def nearest_powers_of_two(value: int) -> tuple[int, int]:
    """The powers of two just below and above `value` (equal when it is one)."""
    value = max(int(value), 1)
    low = 1 << (value.bit_length() - 1)
    return low, low if low == value else low * 2


def interaction_design(
    properties: int, design_size: int, seed: int, pair: tuple[int, int] | None
) -> Design:
    """The replicated design over P strengths: A, B, C_1..C_P, then C_ij for `pair`
    (0-based property indices); deterministic for a seed."""
    if properties < 2:
        raise ValueError(
            f"properties must be at least 2 (interactions need two properties), got {properties}"
        )
    if design_size < 2 or design_size & (design_size - 1):
        low, high = nearest_powers_of_two(design_size)
        raise ValueError(
            f"design_size must be a power of two >= 2, got {design_size}; "
            f"use {max(low, 2)} or {max(high, 2)}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if pair is not None:
        pair = _check_pair(pair, properties)
    sampler = qmc.Sobol(2 * properties, scramble=True, seed=seed)
    points = sampler.random(design_size).astype(np.float32)
    a, b = points[:, :properties], points[:, properties:]
    blocks = [a, b]
    kinds = ["A"] * design_size + ["B"] * design_size
    for i in range(properties):
        block = a.copy()
        block[:, i] = b[:, i]
        blocks.append(block)
        kinds += [f"C{i + 1}"] * design_size
    if pair is not None:
        i, j = pair
        block = a.copy()
        block[:, [i, j]] = b[:, [i, j]]
        blocks.append(block)
        kinds += [_pair_kind(pair, properties)] * design_size
    return Design(
        rows=np.concatenate(blocks, axis=0), kinds=kinds, design_size=design_size, pair=pair
    )


def estimate_indices(
    design: Design,
    scores: np.ndarray,
    bootstrap: int,
    confidence: float,
    seed: int,
    names: Sequence[str] | None = None,
    max_design_size: int | None = None,
) -> IndicesEstimate:
    """First-, total-order indices, the pair's second-order index and the interaction
    share, each with its percentile bootstrap interval; deterministic for a seed.
    `names` (composition order) and `max_design_size` (the largest the caller may ask
    for) only word the warnings."""
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be >= 1 resample, got {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    expected = len(design.rows)
    if values.size != expected:
        raise ValueError(
            f"scores must hold one value per design row ({expected}), got {values.size}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError("scores must be finite; got NaN or infinity")
    n, p = design.design_size, design.properties
    blocks = values.reshape(-1, n)
    f_a, f_b, f_c = blocks[0], blocks[1], blocks[2 : 2 + p]
    f_pair = blocks[2 + p] if design.pair is not None else None
    pooled = np.concatenate([f_a, f_b])
    variance = float(np.var(pooled, ddof=1))
    mean = float(np.mean(pooled))
    if variance < VARIANCE_FLOOR:
        zero = Interval(0.0, 0.0, 0.0)
        return IndicesEstimate(
            first=(zero,) * p,
            total=(zero,) * p,
            interaction=(zero,) * p,
            second_order=zero if design.pair is not None else None,
            share=zero,
            significant=False,
            variance=variance,
            mean=mean,
            warnings=(
                f"the score's variance over the design is {variance:.3g} (below "
                f"{VARIANCE_FLOOR:g}): no property moves the prediction, indices reported as 0",
            ),
            negligible_variance=True,
        )
    features = _row_features(f_a, f_b, f_c, f_pair, mean)
    point = _statistics(np.ones((1, n)), features, p, design.pair)
    samples = _bootstrap(features, p, design.pair, bootstrap, seed)
    alpha = (1.0 - confidence) / 2.0
    bounds = {
        key: np.quantile(value, [alpha, 1.0 - alpha], axis=-1) for key, value in samples.items()
    }

    def interval(key: str, index: int | None = None) -> Interval:
        value, (low, high) = point[key], bounds[key]
        if index is not None:
            value, low, high = value[index], low[index], high[index]
        return Interval(float(np.squeeze(value)), float(low), float(high))

    labels = list(names) if names is not None else [f"property {i + 1}" for i in range(p)]
    share = interval("share")
    first = tuple(interval("first", i) for i in range(p))
    total = tuple(interval("total", i) for i in range(p))
    interaction = tuple(interval("interaction", i) for i in range(p))
    second = interval("second") if design.pair is not None else None
    named = [("interaction share", share)]
    named += [(f"{labels[i]} first order", first[i]) for i in range(p)]
    named += [(f"{labels[i]} total order", total[i]) for i in range(p)]
    named += [(f"{labels[i]} interaction", interaction[i]) for i in range(p)]
    if second is not None and design.pair is not None:
        i, j = design.pair
        named.append((f"{labels[i]} x {labels[j]} second order", second))
    negligible = variance < NEGLIGIBLE_SD**2
    warnings = []
    if negligible:
        # The score's noise, not the design size, spreads these intervals: no design advice.
        warnings.append(_negligible_warning(variance))
    else:
        if share.high - share.low > WIDE_INTERVAL and share.low <= 0.0 <= share.high:
            warnings.append(_wide_warning(share, n, max_design_size))
        lopsided = [(label, found) for label, found in named if _on_or_outside(found)]
        if lopsided:
            warnings.append(_unreliable_warning(lopsided, n, max_design_size))
    return IndicesEstimate(
        first=first,
        total=total,
        interaction=interaction,
        second_order=second,
        share=share,
        significant=share.low > 0.0 and not negligible,
        variance=variance,
        mean=mean,
        warnings=tuple(warnings),
        negligible_variance=negligible,
    )


def _negligible_warning(variance: float) -> str:
    return (
        f"the score barely moves: its standard deviation over the design is "
        f"{variance**0.5:.2g} (variance {variance:.3g}; below {NEGLIGIBLE_SD:g} in the score's "
        "units), so the indices apportion a negligible variance and the interaction share is "
        "not decided (interaction_significant is false): read `variance` first"
    )


def _on_or_outside(found: Interval) -> bool:
    """The point estimate outside its own percentile interval, or on an edge of one with
    width: (nearly) every resample falls on one side of it."""
    if found.high <= found.low:
        return found.value != found.low
    tolerance = 1e-9 * (found.high - found.low)
    return not found.low + tolerance < found.value < found.high - tolerance


def _larger_design(design_size: int, max_design_size: int | None) -> int:
    larger = design_size * WIDER_DESIGN_FACTOR
    return larger if max_design_size is None else min(larger, max_design_size)


def _wide_warning(share: Interval, design_size: int, max_design_size: int | None) -> str:
    larger = _larger_design(design_size, max_design_size)
    advice = (
        f"a design_size of {larger} (now {design_size}) narrows it"
        if larger > design_size
        else f"design_size {design_size} is the largest allowed: more scenes narrow it"
    )
    return (
        f"the interaction share's interval [{share.low:.3g}, {share.high:.3g}] is wider than "
        f"{WIDE_INTERVAL:g} and reaches 0: it cannot decide whether the properties interact; "
        f"{advice}"
    )


def _unreliable_warning(
    lopsided: list[tuple[str, Interval]], design_size: int, max_design_size: int | None
) -> str:
    listed = ", ".join(
        f"{label} {found.value:.3g} [{found.low:.3g}, {found.high:.3g}]"
        for label, found in lopsided[:UNRELIABLE_SHOWN]
    )
    extra = len(lopsided) - UNRELIABLE_SHOWN
    more = f" and {extra} more" if extra > 0 else ""
    larger = _larger_design(design_size, max_design_size)
    advice = (
        f"raise design_size (e.g. {larger})"
        if larger > design_size
        else f"design_size {design_size} is the largest allowed: read these intervals as rough"
    )
    return (
        f"point estimates on or outside their own interval: {listed}{more}; the bootstrap is "
        f"unreliable at this design_size ({design_size}); {advice}"
    )


def edit_schedule(rows: np.ndarray) -> list[EditStage]:
    """The editor calls that compose every row's image, sharing prefixes: stage k
    holds one call per distinct (s_1..s_{k-1}) with its distinct non-zero s_k values.
    A row's image after stage k is the call's output for (prefix, s_k), or the
    prefix's image when s_k is 0."""
    strengths = np.asarray(rows, dtype=np.float32)
    if strengths.ndim != 2 or strengths.shape[1] < 1:
        raise ValueError(f"rows must have shape [rows, properties], got {list(strengths.shape)}")
    if not np.all((strengths >= 0.0) & (strengths <= 1.0)):
        raise ValueError("rows must hold strengths in [0, 1]")
    stages = []
    for k in range(strengths.shape[1]):
        # Distinct (prefix, s_k), sorted lexicographically: each prefix's strengths are
        # contiguous and ascending.
        edits = np.unique(strengths[:, : k + 1], axis=0)
        edits = edits[edits[:, k] != 0.0]
        grouped: dict[tuple[float, ...], list[float]] = {}
        for values in edits.tolist():
            grouped.setdefault(tuple(values[:k]), []).append(values[k])
        calls = tuple(
            EditCall(prefix=prefix, strengths=tuple(values)) for prefix, values in grouped.items()
        )
        stages.append(EditStage(property=k, calls=calls))
    return stages


def _row_features(
    f_a: np.ndarray, f_b: np.ndarray, f_c: np.ndarray, f_pair: np.ndarray | None, mean: float
) -> np.ndarray:
    """[n, F] per-row terms whose (resample-weighted) means give every statistic, on
    scores centred by the pooled mean: a, b, a^2, b^2 (for the mean and V), then per
    property b (c_i - a), c_i - a and (a - c_i)^2, then b (c_ij - a) and c_ij - a."""
    a, b, c = f_a - mean, f_b - mean, f_c - mean
    columns = [a, b, a**2, b**2, *(b * (ci - a) for ci in c), *(ci - a for ci in c)]
    columns += [(a - ci) ** 2 for ci in c]
    if f_pair is not None:
        columns += [b * (f_pair - mean - a), f_pair - mean - a]
    return np.stack(columns, axis=1)


def _statistics(
    counts: np.ndarray, features: np.ndarray, properties: int, pair: tuple[int, int] | None
) -> dict[str, np.ndarray]:
    """The statistics of each resample (a row of `counts`: how often each design row is
    drawn): "first", "total", "interaction" [P, m], "share" and "second" [m]. First
    order and the pair's closed index centre f_B by the resample's own pooled mean, so
    they do not depend on the score's offset (a logit's mean far from 0)."""
    n, p = features.shape[0], properties
    means = counts @ features / n
    centre = (means[:, 0] + means[:, 1]) / 2.0
    squares = (means[:, 2] + means[:, 3]) / 2.0
    variance = (squares - centre**2) * (2 * n) / (2 * n - 1)
    moves = variance >= VARIANCE_FLOOR
    scale = np.where(moves, 1.0 / np.where(moves, variance, 1.0), 0.0)
    product, difference = means[:, 4 : 4 + p], means[:, 4 + p : 4 + 2 * p]
    first = ((product - centre[:, None] * difference) * scale[:, None]).T
    total = (means[:, 4 + 2 * p : 4 + 3 * p] * scale[:, None]).T / 2.0
    out = {
        "first": first,
        "total": total,
        "interaction": total - first,
        "share": np.sum(total, axis=0) - np.sum(first, axis=0),
    }
    if pair is not None:
        closed = (means[:, 4 + 3 * p] - centre * means[:, 5 + 3 * p]) * scale
        out["second"] = closed - first[pair[0]] - first[pair[1]]
    return out


def _bootstrap(
    features: np.ndarray, properties: int, pair: tuple[int, int] | None, bootstrap: int, seed: int
) -> dict[str, np.ndarray]:
    """The statistics of `bootstrap` resamples of the N design rows (drawn with
    replacement; one draw serves A, B and every C block), in chunks so memory stays
    bounded at large N."""
    n = features.shape[0]
    rng = np.random.default_rng([seed, _BOOTSTRAP_STREAM])
    chunk = max(1, _BOOTSTRAP_CHUNK_VALUES // n)
    parts = []
    for start in range(0, bootstrap, chunk):
        size = min(chunk, bootstrap - start)
        draws = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]
        counts = np.bincount(draws.reshape(-1), minlength=size * n).reshape(size, n)
        parts.append(_statistics(counts.astype(np.float64), features, properties, pair))
    return {key: np.concatenate([part[key] for part in parts], axis=-1) for key in parts[0]}


def _check_pair(pair: tuple[int, int], properties: int) -> tuple[int, int]:
    if len(pair) != 2:
        raise ValueError(f"pair must name two properties, got {len(pair)}")
    i, j = (int(x) for x in pair)
    if i == j:
        raise ValueError(f"pair must name two different properties, got {i} twice")
    for index in (i, j):
        if not 0 <= index < properties:
            raise ValueError(
                f"pair index {index} is out of range: properties are 0..{properties - 1}"
            )
    return (i, j) if i < j else (j, i)


def _pair_kind(pair: tuple[int, int], properties: int) -> str:
    """ "C12" for the pair (0, 1); with 10 or more properties "C1_12" (unambiguous)."""
    separator = "_" if properties >= 10 else ""
    return f"C{pair[0] + 1}{separator}{pair[1] + 1}"
