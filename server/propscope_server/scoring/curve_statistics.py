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

import numpy as np
from scipy import stats
from sklearn.feature_selection import mutual_info_regression

# The paper's code uses the KSG estimator with k = 5 neighbours (bmi.KSGEnsembleFirstEstimator).
KSG_NEIGHBOURS = 5
# sklearn jitters the data by 1e-10 to break ties; a fixed seed keeps results reproducible.
KSG_JITTER_SEED = 0


def strengths_of(points: int) -> np.ndarray:
    """t_i = i / N for the N + 1 images of a path."""
    return np.linspace(0.0, 1.0, points)


def pearson_correlation(curve: np.ndarray) -> float | None:
    """Pearson's r between t and p; None when p is constant (r is undefined)."""
    curve = np.asarray(curve, dtype=np.float64)
    if curve.size < 2 or np.ptp(curve) == 0.0:
        return None
    return float(stats.pearsonr(strengths_of(curve.size), curve).statistic)


def ksg_mutual_information(x: np.ndarray, y: np.ndarray, neighbours: int = KSG_NEIGHBOURS) -> float:
    """KSG estimate (Kraskov et al. 2004, estimator 1) of I(x; y) in nats for
    two 1-D samples, clipped at 0 (sklearn's implementation standardises both)."""
    estimate = mutual_info_regression(
        np.asarray(x, dtype=np.float64)[:, None],
        np.asarray(y, dtype=np.float64),
        n_neighbors=neighbours,
        random_state=KSG_JITTER_SEED,
    )
    return float(estimate[0])


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
