"""MeGe and ReCo (Fel, Vigouroux et al., "How Good is your Explanation? Algorithmic
Stability Measures to Assess the Quality of Explanations for Deep Neural Networks",
WACV 2022): how much an explainer's maps of one image agree across models trained on
different folds of the same data. Pure numpy and scipy.

Reference: Xplique's `metrics/representativity.py` (class MeGe). What we match and
where we differ:

- Distance between two maps: sqrt(1 - |Spearman rho|) of the flattened maps; a map with
  a channel axis is first averaged over it, NaNs read as 0 (Xplique's sanitising).
- Pairs: every pair of models (i < j) on every image. With labels, Xplique's rule: a
  pair where both models are right goes to S= (they agree), a pair where exactly one is
  right to S!= (they disagree), a pair where both are wrong is left out. Without labels
  the predictions alone decide: equal -> S=, different -> S!=. Xplique also keeps only
  the images one of the two models held out in training; the service does not know
  which images a caller's models saw, so every image counts (the fold recipe's
  validation evaluates on held-out images, seen by no fold).
- A pair whose Spearman is undefined (a constant map) is left out, as Xplique does,
  and counted so the result can say so.
- MeGe = 1 / (1 + mean(S=)).
- ReCo = max over thresholds g of TPR(g) + TNR(g) - 1 with TPR = share of S= below g and
  TNR = share of S!= above g. Xplique scans every (n // 20 + 1)-th sorted distance to
  save time; we scan every distinct distance (and a threshold above them all), which
  gives the exact maximum: ours is >= Xplique's, equal when its scan hits the best one.
  ReCo needs both sets non-empty; otherwise it is undefined (None), never a number.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr

# |rho| this close to 1 is 1: the rounding error of Spearman's formula.
RHO_ROUNDING = 1e-12


def flatten_map(attribution: np.ndarray) -> np.ndarray:
    """A map as Xplique compares it: channels averaged (3-d maps), NaN -> 0, flat."""
    values = np.asarray(attribution, dtype=np.float64)
    if values.ndim > 2:
        values = values.mean(axis=-1)
    return np.nan_to_num(values, nan=0.0).ravel()


def spearman_distance(first: np.ndarray, second: np.ndarray) -> float:
    """sqrt(1 - |Spearman rho|) of two maps; NaN when either map is constant."""
    a, b = flatten_map(first), flatten_map(second)
    if a.shape != b.shape:
        raise ValueError(f"maps of different sizes: {a.size} and {b.size} values")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    rho = abs(float(spearmanr(a, b).statistic))
    # Rounding leaves rho = 1 - 2e-16 for equal rankings, whose square root (1.5e-8)
    # would keep identical models from MeGe = 1.
    if rho > 1.0 - RHO_ROUNDING:
        return 0.0
    return float(np.sqrt(1.0 - rho))


@dataclass(frozen=True)
class PairDistances:
    """The distances of model pairs on images, split by whether the pair agreed."""

    agreeing: np.ndarray  # S=
    disagreeing: np.ndarray  # S!=
    both_wrong: int  # pairs left out: both models wrong (labels given)
    undefined: int  # pairs left out: a constant map, Spearman undefined


def pair_distances(
    maps: np.ndarray, predictions: np.ndarray, labels: np.ndarray | None = None
) -> PairDistances:
    """maps [models, images, ...] (one map per model and image), predictions
    [models, images] (predicted classes), labels [images] or None -> the distances of
    every pair of models on every image, sorted into S= and S!= (module docstring)."""
    maps = np.asarray(maps)
    predictions = np.asarray(predictions)
    models, images = predictions.shape
    if maps.shape[:2] != (models, images):
        raise ValueError(
            f"maps are {maps.shape[:2]} (models, images), predictions {(models, images)}"
        )
    if labels is not None and np.asarray(labels).shape != (images,):
        raise ValueError(f"labels must hold one class per image ({images}), got {np.shape(labels)}")
    agreeing: list[float] = []
    disagreeing: list[float] = []
    both_wrong = undefined = 0
    for i in range(models):
        for j in range(i + 1, models):
            for n in range(images):
                pred_i, pred_j = predictions[i, n], predictions[j, n]
                if labels is not None:
                    right = (pred_i == labels[n], pred_j == labels[n])
                    if not any(right):
                        both_wrong += 1
                        continue
                    agree = all(right)
                else:
                    agree = pred_i == pred_j
                distance = spearman_distance(maps[i, n], maps[j, n])
                if np.isnan(distance):
                    undefined += 1
                    continue
                (agreeing if agree else disagreeing).append(distance)
    return PairDistances(np.asarray(agreeing), np.asarray(disagreeing), both_wrong, undefined)


def mege(agreeing: np.ndarray) -> float | None:
    """1 / (1 + mean distance of agreeing pairs); None without such pairs."""
    if len(agreeing) == 0:
        return None
    return float(1.0 / (1.0 + np.mean(agreeing)))


def reco(agreeing: np.ndarray, disagreeing: np.ndarray) -> float | None:
    """max over thresholds g of TPR + TNR - 1 (TPR: agreeing pairs closer than g, TNR:
    disagreeing pairs farther than g); None unless both sets hold pairs. 0 when no
    threshold separates them better than chance (the threshold below every distance
    gives TPR 0, TNR 1)."""
    if len(agreeing) == 0 or len(disagreeing) == 0:
        return None
    agreeing = np.sort(np.asarray(agreeing, dtype=np.float64))
    disagreeing = np.sort(np.asarray(disagreeing, dtype=np.float64))
    distinct = np.unique(np.concatenate([agreeing, disagreeing]))
    # Strict comparisons on both sides: a threshold just above each distinct distance
    # (the midpoint to the next) puts the distance itself among the "closer" ones.
    thresholds = np.append((distinct[:-1] + distinct[1:]) / 2.0, distinct[-1] + 1.0)
    tpr = np.searchsorted(agreeing, thresholds, side="left") / len(agreeing)
    tnr = 1.0 - np.searchsorted(disagreeing, thresholds, side="right") / len(disagreeing)
    return float(max(0.0, np.max(tpr + tnr - 1.0)))
