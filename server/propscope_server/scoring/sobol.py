"""Sobol attribution maths (Fel et al., NeurIPS 2021): the replicated QMC design,
the total-order estimators and the nearest upsampling of design rows to masks.

Reference: Xplique's `global_sensitivity_analysis/` (`replicated_designs.py`,
`sobol_estimators.py`, `sobol_attribution_method.py`). What we match:

- Design: `ScipySobolSequenceRS`: an unscrambled (`scramble=False`) scipy Sobol
  sequence of dimension 2D, N points; A is its first D columns, B the last D;
  C_i is A with column i taken from B; rows in the order A, B, C_1, ..., C_D.
  Xplique's *default* sampler is TensorFlow's `tf.math.sobol_sample`; its scipy
  sampler is the one we follow (TensorFlow is not a dependency), so our points are
  those of `ScipySobolSequenceRS`, not necessarily those of the TF default.
- Factor layout: factor k is grid cell (k // (g*c) , (k // c) % g), channel k % c,
  i.e. a row-major reshape to [g, g, c], as Xplique reshapes masks and indices.
- Estimators: the formulas of Xplique's current estimators, in float64 (Xplique
  computes in float32), with its guard var >= 1e-12 and ddof = 1 variances:
    jansen       sum_n (a - c_i)^2 / (2 N var(A))
    homma        1 - (mean(a c_i) - mean(a)^2) / var(A)
    saltelli     the same formula as homma (Xplique's two classes coincide)
    janon        1 - (mean(a c_i) - m_i^2) / v_i, m_i = (mean a + mean c_i) / 2,
                 v_i = (mean a^2 + mean c_i^2) / 2 - m_i^2
    glen_isaacs  1 - corr(a, c_i) (Pearson, ddof = 1)
  One deliberate difference, in janon: Xplique computes v_i with sums divided by
  2 (N - 1) instead of 2 N, which adds about mean(a^2) / N to the variance, so its
  indices depend on the mean of the scores (on f = sum_i w_i M_i, 16 factors, N 64
  the error reaches 0.33); we use Janon et al.'s (2014) 1/N, which is shift-invariant.
  Also worth knowing: a factor the model ignores (c_i == a) gets exactly 0 from
  jansen, janon and glen_isaacs, but 1/N from homma/saltelli (Xplique's formula mixes
  a ddof = 1 variance with plain means); we keep that. Jansen is the default, as in
  Xplique and the paper.
- Known weakness of this design at small N (measured, see the tests): an unscrambled
  Sobol sequence with fewer points than dimensions has some coordinate pairs
  (i, D + i) far from independent over its first N points: for D = 16, N = 64 the
  pair of factor 9 has mean (a_9 - b_9)^2 at 1/4 of its expected 1/6, so Jansen
  underestimates that factor's index about 4x; for D = 64, N = 32 (the defaults)
  factors 9 and 42 are hit. Doubling N removes it for D = 16. The same small-N
  structure inflates var(A) at D = 64, N = 32 (6.4x the true variance of an additive
  model, the origin being the first point), so Jansen's indices there sum to 0.15
  instead of 1: the map's shape is unaffected (var(A) is common to all cells), its
  absolute values are not. `scramble_seed` (Owen scrambling, deterministic for a
  seed) brings the sum to 0.67-1.42 over seeds 0-9 and moves the under-weighted cells
  to seed-dependent places (0-3 of 64 per seed) instead of fixed ones; it is not
  Xplique's design, so it is off by default.
- Upsampling: `tf.image.resize(..., method="nearest")` (half-pixel centres, float32
  index arithmetic, ties included), for any height and width (non-square images,
  xplique PR #141) and sizes the grid does not divide.
- The map is resized to the image with OpenCV's `INTER_CUBIC` (Keys kernel,
  a = -0.75, half-pixel centres, replicated border), as Xplique does with cv2.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import qmc

ESTIMATORS = ("jansen", "homma", "janon", "glen_isaacs", "saltelli")

# Xplique's and the paper's defaults: grid 8 x 8, 32 designs -> 32 * (64 + 2) = 2112 passes.
DEFAULT_GRID = 8
DEFAULT_NB_DESIGN = 32
# Xplique's guard against a zero variance (a constant model output).
VARIANCE_FLOOR = 1e-12
# OpenCV's bicubic kernel parameter.
CUBIC_A = -0.75


def forward_passes(nb_design: int, dimension: int) -> int:
    """N * (D + 2): the number of design rows, hence of forward passes per image."""
    return nb_design * (dimension + 2)


def sobol_design(nb_design: int, dimension: int, scramble_seed: int | None = None) -> np.ndarray:
    """The replicated design [N * (D + 2), D] float32 in [0, 1): A, B, C_1 .. C_D.

    `scramble_seed` None: Xplique's unscrambled sequence. An integer: scipy's Owen
    scrambling with that seed (still deterministic); see the module docstring."""
    a, b = design_points(nb_design, dimension, scramble_seed)
    return design_rows(a, b, 0, forward_passes(nb_design, dimension))


def design_points(
    nb_design: int, dimension: int, scramble_seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A and B [N, D] float32: the two halves of one 2D-dimensional Sobol sequence, all
    the design holds (`design_rows` builds any of its rows from them)."""
    _check_power_of_two(nb_design)
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1, got {dimension}")
    sampler = qmc.Sobol(2 * dimension, scramble=scramble_seed is not None, seed=scramble_seed)
    points = sampler.random(nb_design).astype(np.float32)
    return points[:, :dimension], points[:, dimension:]


def design_rows(a: np.ndarray, b: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of the replicated design of A and B, without building the whole
    [N (D + 2), D] design (N D^2 values: gigabytes at a per-channel grid of 32)."""
    nb_design = len(a)
    rows = np.arange(start, stop)
    block, point = rows // nb_design, rows % nb_design
    out = np.where((block == 1)[:, None], b[point], a[point])
    swapped = np.flatnonzero(block >= 2)
    factors = block[swapped] - 2
    out[swapped, factors] = b[point[swapped], factors]
    return out


def total_order(
    scores: np.ndarray, nb_design: int, dimension: int, estimator: str = "jansen"
) -> np.ndarray:
    """Total-order Sobol indices [D] (float64) from the scores of the design rows."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    expected = forward_passes(nb_design, dimension)
    if scores.size != expected:
        raise ValueError(
            f"scores must hold nb_design * (dimension + 2) = {expected} values, got {scores.size}"
        )
    a = scores[:nb_design]
    c = scores[2 * nb_design :].reshape(dimension, nb_design)
    if estimator == "jansen":
        return np.sum((a - c) ** 2, axis=-1) / (2.0 * nb_design * _variance(a))
    if estimator in ("homma", "saltelli"):
        return 1.0 - (np.mean(c * a, axis=-1) - np.mean(a) ** 2) / _variance(a)
    if estimator == "janon":
        mean = 0.5 * (np.mean(a) + np.mean(c, axis=-1))
        variance = (np.mean(a**2) + np.mean(c**2, axis=-1)) / 2.0 - mean**2
        variance = np.maximum(variance, VARIANCE_FLOOR)
        return 1.0 - (np.mean(c * a, axis=-1) - mean**2) / variance
    # glen_isaacs: the covariance uses the same centred sums as the variances, so that
    # an ignored factor (c_i == a) gives a correlation of exactly 1.
    denominator = max(nb_design - 1, 1)
    a_centred = a - np.mean(a)
    c_centred = c - np.mean(c, axis=-1, keepdims=True)
    covariance = np.sum(a_centred * c_centred, axis=-1) / denominator
    variance_c = np.maximum(np.sum(c_centred**2, axis=-1) / denominator, VARIANCE_FLOOR)
    return 1.0 - covariance / np.sqrt(_variance(a) * variance_c)


def upsample_masks(
    design_rows: np.ndarray, grid: int, height: int, width: int, channels: int = 1
) -> np.ndarray:
    """Design rows [b, g*g*c] -> masks [b, H, W, c] float32, nearest as in Xplique."""
    rows = np.asarray(design_rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[1] != grid * grid * channels:
        raise ValueError(
            f"design rows must have shape [b, grid*grid*channels = {grid * grid * channels}], "
            f"got {list(rows.shape)}"
        )
    _check_grid(grid, height, width)
    cells = rows.reshape(-1, grid, grid, channels)
    return cells[:, nearest_indices(grid, height)][:, :, nearest_indices(grid, width)]


def nearest_indices(cells: int, size: int) -> np.ndarray:
    """Source cell of each of `size` output pixels under TF's half-pixel nearest resize,
    in TF's float32 arithmetic: floor((x + 0.5) * (cells / size)), capped at cells - 1."""
    scale = np.float32(cells) / np.float32(size)
    source = np.floor((np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale)
    return np.minimum(source.astype(np.int64), cells - 1)


def resize_map(indices: np.ndarray, height: int, width: int) -> np.ndarray:
    """A [g, g] (or [g, g, c]) index map -> [H, W] (or [H, W, c]) float32, OpenCV bicubic."""
    values = np.asarray(indices, dtype=np.float64)
    if values.ndim not in (2, 3):
        raise ValueError(f"indices must have shape [g, g] or [g, g, c], got {list(values.shape)}")
    rows = _cubic_matrix(values.shape[0], height)
    columns = _cubic_matrix(values.shape[1], width)
    resized = np.einsum("hi,ij...,wj->hw...", rows, values, columns)
    return resized.astype(np.float32)


def _cubic_matrix(source: int, size: int) -> np.ndarray:
    """[size, source] weights of OpenCV's INTER_CUBIC along one axis."""
    position = (np.arange(size) + 0.5) * (source / size) - 0.5
    base = np.floor(position)
    t = position - base
    a = CUBIC_A
    weights = np.stack(
        [
            ((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
        ],
        axis=1,
    )
    weights = np.concatenate([weights, 1.0 - weights.sum(axis=1, keepdims=True)], axis=1)
    taps = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, source - 1)
    matrix = np.zeros((size, source))
    np.add.at(matrix, (np.repeat(np.arange(size), 4), taps.reshape(-1)), weights.reshape(-1))
    return matrix


def _variance(a: np.ndarray) -> float:
    """Xplique's var(A): ddof = 1 (ddof = 0 for one point), floored at 1e-12."""
    deviations = np.sum((a - np.mean(a)) ** 2)
    return max(deviations / max(a.size - 1, 1), VARIANCE_FLOOR)


def _check_power_of_two(nb_design: int) -> None:
    if nb_design < 1 or nb_design & (nb_design - 1):
        raise ValueError(f"nb_design must be a power of two (1, 2, 4, ... 32), got {nb_design}")


def _check_grid(grid: int, height: int, width: int) -> None:
    if grid < 1 or grid > min(height, width):
        raise ValueError(
            f"grid must be between 1 and the image's smaller side ({min(height, width)}), "
            f"got {grid}"
        )
