"""The paper code's other statistics of a prediction curve (PropGrad's
`Zollstock`): Pearson correlation and mutual information between the edit
strength t in [0, 1] and the target probability p along the path.

They answer different questions than E|dp|: the correlation says whether p
moves *linearly* with the strength, the mutual information whether p is a
function of the strength at all (also non-monotone). Both are undefined for
some curves, which is reported as None rather than as a number a caller could
mistake for "no effect" (the paper's code lets a flat curve's NaN correlation
pass as significant).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import special, stats
from scipy.spatial import cKDTree

# The paper's code uses KSG estimator 1 with k = 5 neighbours (bmi.KSGEnsembleFirstEstimator,
# Euclidean norm); we use the same k with Kraskov's original max-norm, as scikit-learn does.
KSG_NEIGHBOURS = 5
# Ties (flat stretches of a curve) are broken by a 1e-10 jitter, as scikit-learn does;
# a fixed seed keeps results reproducible.
KSG_JITTER_SEED = 0


def strengths_of(points: int) -> np.ndarray:
    """t_i = i / N for the N + 1 images of a path."""
    return np.linspace(0.0, 1.0, points)


def pearson_correlation(curve: np.ndarray) -> float | None:
    """Pearson's r between t and p; None when p is constant (r is undefined)."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.size < 2 or np.ptp(curve) == 0.0:
        return None
    # A curve that moves only by float rounding (p ~ 1 on every image) made scipy print a
    # NearConstantInputWarning to the gateway's stderr, a non-JSON line in its JSON log,
    # dozens per review; r is as defined as scipy computes it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        return float(stats.pearsonr(strengths_of(curve.size), curve).statistic)


def ksg_mutual_information(x: np.ndarray, y: np.ndarray, neighbours: int = KSG_NEIGHBOURS) -> float:
    """KSG estimate (Kraskov et al. 2004, estimator 1, max-norm) of I(x; y) in nats
    for two 1-D samples, clipped at 0.

    The estimator of scikit-learn's `mutual_info_regression` (checked against it
    in the tests) with one change: the samples are centred before scaling, so that
    its 1e-10 tie-breaking jitter stays at 1e-10 standard deviations even for a
    tiny curve near p = 1 (uncentred, the jitter swamps it). Also 3-7x faster
    (`bench/curve_statistics.py`).
    """
    rng = np.random.RandomState(KSG_JITTER_SEED)  # the legacy generator scikit-learn jitters with
    x, y = (_scaled(np.asarray(v, dtype=np.float64), rng) for v in (x, y))
    points = np.column_stack([x, y])
    # Distance to the k-th neighbour in the joint space (the first hit is the point itself),
    # nudged down so that the marginal counts below are strict.
    radius = cKDTree(points).query(points, k=neighbours + 1, p=np.inf)[0][:, -1]
    radius = np.nextafter(radius, 0)
    counts = [_within(v, radius) for v in (x, y)]
    estimate = (
        special.digamma(len(x))
        + special.digamma(neighbours)
        - sum(np.mean(special.digamma(c + 1)) for c in counts)
    )
    return float(max(0.0, estimate))


def _scaled(values: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    centred = values - values.mean()
    std = centred.std()
    scaled = centred / std if std > 0 else centred
    jitter = 1e-10 * max(1.0, float(np.mean(np.abs(scaled))))
    return scaled + jitter * rng.standard_normal(len(values))


def _within(values: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """How many other points lie within `radius` of each point, in one dimension.
    Pairwise, so that points exactly on the radius count as scikit-learn counts
    them (paths have at most a few hundred points)."""
    distances = np.abs(values[:, None] - values[None, :])
    return (distances <= radius[:, None]).sum(axis=1) - 1


def mutual_information(curve: np.ndarray, neighbours: int = KSG_NEIGHBOURS) -> float | None:
    """I(t; p) of one curve; None when the path has too few images for `neighbours`."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.size <= neighbours:
        return None
    if np.ptp(curve) == 0.0:
        return 0.0
    return ksg_mutual_information(strengths_of(curve.size), curve, neighbours)


def mean_defined(values: list[float | None]) -> float | None:
    """Mean over the samples where a statistic is defined; None if nowhere."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
