"""Fidelity and stability metrics of an attribution map: Deletion and Insertion
(Petsiuk et al. 2018), MuFidelity and AverageStability (Bhatt et al. 2020).

Reference: Xplique's `xplique/metrics/fidelity.py` and `stability.py`; the model
calls stay with the caller, these functions build the inputs and reduce the scores.

Deletion / Insertion (Xplique's `CausalFidelity`; defaults steps 10, baseline 0,
max_percentage_perturbed 1.0):
- a map with channels is averaged over them; pixels are ranked by decreasing value,
  all channels of a pixel move together;
- n_max = floor(H * W * max_percentage); the k-th image (k = 0 .. steps) has the
  first linspace(0, n_max, steps + 1) cast to int (i.e. floored) pixels moved from
  the start to the end state: image -> baseline for Deletion, baseline -> image for
  Insertion; steps = -1 means one step per pixel;
- the area is mean_k (s_k + s_{k+1}) / 2: the trapezoid rule on equally spaced
  steps over a unit width, whatever the fractions (also when max_percentage < 1).
- Ties in the map: Xplique ranks with `argsort(...)[::-1]` (numpy's default sort,
  not stable on large arrays); we use a stable sort reversed, so among equal values
  the later pixel goes first, which is Xplique's order whenever its sort is stable.

MuFidelity (Xplique's `MuFidelity`; defaults grid 9, subset_percent 0.2,
nb_samples 200, baseline 0): each grid cell is set to the baseline independently
with probability subset_percent (Bernoulli per cell, as Xplique's code: it does not
fix the subset size), cells are upsampled nearest (TF half-pixel), and the score is
the *Spearman* correlation over samples between the drop f(x) - f(x_S) and the sum
of the map over the baselined pixels (all channels), NaN (a constant input) -> 0.
The issue also says Spearman; Pearson (Bhatt et al.'s definition) is offered with
`correlation="pearson"`. Caveat of the Bernoulli subsets: a constant map's sums are
proportional to |S|, so its MuFidelity is the correlation of the drop with |S|, high
for a model whose score falls with the area removed; `exact_size=True` (fixed |S|)
removes that when the grid divides the image (equal cell areas; otherwise the sums
still vary with the areas of the chosen cells). Measured on a model that reads only
an 8 x 8 corner (like `calibration_probe`), 20 images, grid 9, 200 samples: constant
map 0.10-0.26 on average (|.| up to 0.45) with Bernoulli subsets, -0.11-0.08 (up to
0.23) with fixed |S| on 32/64/224 px; the oracle map 0.996-1.0 either way.

A baseline that is itself evidence for the class: MuFidelity assumes that setting
cells to the baseline removes evidence. When most subsets instead *raise* the target
score (median drop < 0; black for the synthetic world's "square", where blacking any
background cell raises its logit), the drops fall with the baselined area and a map of
non-negative importance (Sobol, RISE) correlates negatively however faithful it is;
`baseline_raises_score` detects it from the drops, at no extra forward pass. Measured
on docs/sample-patch.png, synth_patch, grid 9, 200 subsets, seeds 0-2: black raised the
logit on 200/200 subsets (median drop -8.4); the patch-mask oracle scored 0.23-0.38,
the Sobol map -0.25 to -0.41, a random map -0.60 to -0.71, while a signed occlusion
map made with black scored 0.86-0.90. With the image's mean colour: oracle 0.75-0.84, Sobol
0.31-0.47, random -0.03-0.20 (61/200 subsets raised it).
Deletion and Insertion assume the same: `curve_score_drops` gives the drops of the
curve's images with pixels at the baseline, for the same check with the mean drop
(an area is a mean; a faithful Insertion's plateau at f(x) sways a median). On the
same image under black every map's curve rises above f(x) (8-9 of 10 steps), though
the all-black image scores 3.15 < 3.33: the endpoint alone would miss it.

AverageStability (Xplique's `AverageStability`; defaults radius 0.1, nb_samples
200, distance "l2"): the mean over neighbours of the distance between the map of a
noisy input and the map of the input; Xplique's "l2" is the *squared* Euclidean
distance sum (a - b)^2 and "l1" is sum |a - b|, on the raw maps (no normalisation),
which we keep. Deliberate difference: Xplique adds uniform noise in
[0, 1 / n_variables) and never uses its `radius`; we sample Bhatt et al.'s
neighbourhood, uniform noise in [-radius * 255, radius * 255] per value, clipped to
valid pixels [0, 255]. `normalise=True` divides each map by its L1 mass first, so
that maps of different methods can be compared.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

from propscope_server.scoring.sobol import nearest_indices

# Xplique's defaults.
DEFAULT_STEPS = 10
DEFAULT_MAX_PERCENTAGE = 1.0
DEFAULT_BASELINE_VALUE = 0.0
DEFAULT_MUFIDELITY_GRID = 9
DEFAULT_SUBSET_PERCENT = 0.2
DEFAULT_MUFIDELITY_SAMPLES = 200
DEFAULT_STABILITY_RADIUS = 0.1
DEFAULT_STABILITY_SAMPLES = 200
DEFAULT_STABILITY_DISTANCE = "l2"

CORRELATIONS = ("spearman", "pearson")
DISTANCES = ("l2", "l1")
PIXEL_MAX = 255.0


def perturbation_order(explanation: np.ndarray) -> np.ndarray:
    """Flat pixel indices, most important first; ties: the later pixel first."""
    flat = _pixel_map(explanation).reshape(-1)
    return np.argsort(flat, kind="stable")[::-1].copy()


def perturbed_counts(nb_pixels: int, steps: int, max_percentage: float) -> np.ndarray:
    """How many pixels each of the steps + 1 images has moved (Xplique's int linspace)."""
    if not 0.0 < max_percentage <= 1.0:
        raise ValueError(f"max_percentage must be in (0, 1], got {max_percentage}")
    most = int(np.floor(nb_pixels * max_percentage))
    if steps == -1:
        steps = most
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (or -1 for every pixel), got {steps}")
    return np.linspace(0, most, steps + 1, dtype=np.int32).astype(np.int64)


def deletion_images(
    image: np.ndarray,
    explanation: np.ndarray,
    steps: int,
    max_percentage: float,
    baseline: np.ndarray,
    insertion: bool,
    only: slice = slice(None),
) -> tuple[np.ndarray, np.ndarray]:
    """(fractions [steps + 1] of pixels moved, images [steps + 1, H, W, 3] float32); `only`
    selects the steps whose images are made, so large images can be made in batches."""
    pixels = np.asarray(image, dtype=np.float32)
    reference = np.broadcast_to(np.asarray(baseline, dtype=np.float32), pixels.shape)
    if pixels.ndim != 3:
        raise ValueError(f"image must have shape [H, W, C], got {list(pixels.shape)}")
    _check_map(explanation, pixels.shape[:2])
    height, width = pixels.shape[:2]
    counts = perturbed_counts(height * width, steps, max_percentage)
    rank = np.empty(height * width, dtype=np.int64)
    rank[perturbation_order(explanation)] = np.arange(height * width)
    moved = (rank[None, :] < counts[only, None]).reshape(-1, height, width, 1)
    start, end = (reference, pixels) if insertion else (pixels, reference)
    images = np.where(moved, end[None], start[None]).astype(np.float32)
    return counts / (height * width), images


def curve_area(fractions: np.ndarray, scores: np.ndarray, exact_spacing: bool = False) -> float:
    """Xplique's area: mean_k (s_k + s_{k+1}) / 2, steps taken as equally spaced.

    `exact_spacing=True` integrates over the actual fractions instead, divided by
    their range (they differ from Xplique's when floor() makes the steps uneven)."""
    x = np.asarray(fractions, dtype=np.float64).reshape(-1)
    y = np.asarray(scores, dtype=np.float64).reshape(-1)
    if x.size != y.size or y.size < 2:
        raise ValueError(
            f"fractions and scores must have the same length >= 2, got {x.size} and {y.size}"
        )
    if exact_spacing:
        return float(np.sum((y[:-1] + y[1:]) * np.diff(x)) / (2.0 * (x[-1] - x[0])))
    return float(np.mean(y[:-1] + y[1:]) * 0.5)


def mufidelity_subsets(
    grid: int,
    subset_percent: float,
    nb_samples: int,
    rng: np.random.Generator,
    exact_size: bool = False,
) -> np.ndarray:
    """Subsets [nb, grid, grid] bool, True = the cell is set to the baseline.

    Default: each cell independently with probability subset_percent (Xplique's code).
    `exact_size=True`: exactly round(subset_percent * grid^2) cells per sample (Bhatt
    et al.'s |S| fixed, and what Xplique's comment promises); then, if the grid
    divides the image, a constant map has constant attribution sums and a MuFidelity
    of 0, whereas with Bernoulli subsets it measures how the score drops with |S|."""
    if not 0.0 <= subset_percent <= 1.0:
        raise ValueError(f"subset_percent must be in [0, 1], got {subset_percent}")
    if exact_size:
        size = int(round(subset_percent * grid * grid))
        ranks = np.argsort(rng.random((nb_samples, grid * grid)), axis=1)
        return (ranks < size).reshape(nb_samples, grid, grid)
    # Xplique keeps a cell when uniform > subset_percent.
    return rng.random((nb_samples, grid, grid)) <= subset_percent


def subset_pixel_masks(subsets: np.ndarray, height: int, width: int) -> np.ndarray:
    """Cells [b, gh, gw] -> pixels [b, H, W] bool, nearest (TF half-pixel), any aspect."""
    cells = np.asarray(subsets, dtype=bool)
    if cells.ndim != 3 or cells.shape[1] > height or cells.shape[2] > width:
        raise ValueError(
            f"subsets must have shape [b, gh, gw] with gh <= {height}, gw <= {width}, "
            f"got {list(cells.shape)}"
        )
    rows = nearest_indices(cells.shape[1], height)
    columns = nearest_indices(cells.shape[2], width)
    return cells[:, rows][:, :, columns]


def subset_attribution_sums(explanation: np.ndarray, pixel_masks: np.ndarray) -> np.ndarray:
    """[b] sums of the map (all its channels) over the pixels each mask baselines."""
    phi = np.asarray(explanation, dtype=np.float64)
    masks = np.asarray(pixel_masks, dtype=bool)
    _check_map(phi, masks.shape[1:3])
    per_pixel = phi.sum(axis=-1) if phi.ndim == 3 else phi
    return np.tensordot(masks.astype(np.float64), per_pixel, axes=([1, 2], [0, 1]))


def mu_fidelity(
    original_score: float,
    perturbed_scores: np.ndarray,
    attribution_sums: np.ndarray,
    correlation: str = "spearman",
) -> float:
    """Correlation between score drops and baselined attribution; 0 when undefined."""
    if correlation not in CORRELATIONS:
        raise ValueError(
            f"correlation must be one of {', '.join(CORRELATIONS)}, got {correlation!r}"
        )
    drops = float(original_score) - np.asarray(perturbed_scores, dtype=np.float64).reshape(-1)
    sums = np.asarray(attribution_sums, dtype=np.float64).reshape(-1)
    if drops.size != sums.size or drops.size < 2:
        raise ValueError(
            "perturbed_scores and attribution_sums must have the same length >= 2, "
            f"got {drops.size} and {sums.size}"
        )
    with warnings.catch_warnings():
        # A constant sample has no correlation; Xplique maps the NaN to 0, so do we.
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        if correlation == "spearman":
            value = stats.spearmanr(drops, sums).statistic
        else:
            value = stats.pearsonr(drops, sums).statistic
    return 0.0 if np.isnan(value) else float(value)


def typical_drop(score_drops: np.ndarray, average: str = "median") -> float:
    """The median drop (MuFidelity: a rank correlation, so the typical subset) or the mean
    drop (Deletion / Insertion: an area is a mean, and a curve that ends on a plateau
    at f(x) has half its drops near 0 either side, which sways a median)."""
    drops = np.asarray(score_drops, dtype=np.float64).reshape(-1)
    return float(np.mean(drops) if average == "mean" else np.median(drops))


def baseline_raises_score(score_drops: np.ndarray, average: str = "median") -> bool:
    """True when the inputs set partly to the baseline score above the original (typical
    drop f(x) - f(x_S) < 0): the baseline then reads as evidence for the class, and
    MuFidelity, Deletion and Insertion, which assume that it removes evidence, no longer
    mean what they say (MuFidelity's subsets; a curve's steps, `curve_score_drops`)."""
    drops = np.asarray(score_drops, dtype=np.float64).reshape(-1)
    return drops.size > 0 and typical_drop(drops, average) < 0.0


def curve_score_drops(
    original_score: float, fractions: np.ndarray, scores: np.ndarray, insertion: bool
) -> np.ndarray:
    """Drops f(x) - s_k at the steps of a Deletion / Insertion curve that have pixels at the
    baseline (all but Deletion's first and, up to every pixel, Insertion's last), for
    `baseline_raises_score`: no forward pass beyond the curve's."""
    moved = np.asarray(fractions, dtype=np.float64).reshape(-1)
    baselined = moved < 1.0 if insertion else moved > 0.0
    return float(original_score) - np.asarray(scores, dtype=np.float64).reshape(-1)[baselined]


def stability_noise(
    image: np.ndarray, radius: float, nb_samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Neighbours [nb, H, W, C] float32: uniform noise in +-radius * 255, clipped."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    pixels = np.asarray(image, dtype=np.float32)
    bound = radius * PIXEL_MAX
    noise = rng.uniform(-bound, bound, size=(nb_samples, *pixels.shape))
    return np.clip(pixels[None] + noise, 0.0, PIXEL_MAX).astype(np.float32)


def average_stability(
    base_map: np.ndarray,
    noisy_maps: np.ndarray,
    distance: str = "l2",
    normalise: bool = False,
) -> tuple[float, np.ndarray]:
    """(mean distance, distances [n]) between each noisy map and the base map."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    base = np.asarray(base_map, dtype=np.float64)
    noisy = np.asarray(noisy_maps, dtype=np.float64)
    if noisy.shape[1:] != base.shape or noisy.shape[0] < 1:
        raise ValueError(
            f"noisy maps must have shape [n, {', '.join(map(str, base.shape))}], "
            f"got {list(noisy.shape)}"
        )
    if normalise:
        base = _unit_mass(base)
        noisy = np.stack([_unit_mass(m) for m in noisy])
    difference = (noisy - base[None]).reshape(noisy.shape[0], -1)
    if distance == "l2":
        distances = np.sum(difference**2, axis=1)
    else:
        distances = np.sum(np.abs(difference), axis=1)
    return float(np.mean(distances)), distances


def _pixel_map(explanation: np.ndarray) -> np.ndarray:
    """[H, W] map; a map with channels is averaged over them, as Xplique does."""
    phi = np.asarray(explanation, dtype=np.float64)
    if phi.ndim == 3:
        phi = phi.mean(axis=-1)
    if phi.ndim != 2:
        raise ValueError(f"explanation must have shape [H, W] or [H, W, C], got {list(phi.shape)}")
    if not np.all(np.isfinite(phi)):
        raise ValueError("explanation must hold finite values (no NaN or infinity)")
    return phi


def _check_map(explanation: np.ndarray, shape: tuple[int, ...]) -> None:
    phi = np.asarray(explanation)
    if phi.ndim not in (2, 3) or tuple(phi.shape[:2]) != tuple(shape):
        raise ValueError(
            f"explanation must have shape [{shape[0]}, {shape[1]}] or "
            f"[{shape[0]}, {shape[1]}, C], got {list(phi.shape)}"
        )


def _unit_mass(values: np.ndarray) -> np.ndarray:
    mass = np.sum(np.abs(values))
    return values / mass if mass > 0 else values
