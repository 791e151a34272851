"""The attribution table's pieces: which grid cells a region covers, how much of a map's
mass lies there, the images each section uses, the maps and metrics from the service,
and the paired comparisons of maps.

The validation is a client of the running service (the SDK); bench/validate_attribution.py
writes the table, tests/integration/test_validation.py runs a few images of it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import stats

import propscope
from propscope_server.synthetic.world import IMAGE_SIZE, PATCH_BOX, make_split, render

# calibration_probe reads only this many bottom-right pixels (per side) of its 64 x 64 input.
PROBE_CORNER = 8
# A cell belongs to a region when at least this share of its pixels lies in the region:
# the patch (14 x 14 pixels at (3, 3)) then owns the top-left 2 x 2 cells of an 8 x 8 grid
# (39% to 100% covered) and not the cells its last pixel row or column grazes (12.5%).
MIN_CELL_COVER = 0.25
# Seeds of the attribution table's images, apart from the other tables' (50_000 + small).
ATTRIBUTION_SEED = 70_000


def cell_cover(region: np.ndarray, grid: int) -> np.ndarray:
    """[grid, grid] share of each cell's pixels inside `region` (a boolean [H, W] mask,
    H and W multiples of `grid`)."""
    height, width = region.shape
    if height % grid or width % grid:
        raise ValueError(f"a {height} x {width} region does not split into {grid} x {grid} cells")
    cells = region.reshape(grid, height // grid, grid, width // grid)
    return cells.mean(axis=(1, 3))


def patch_region(size: int = IMAGE_SIZE) -> np.ndarray:
    """Where the synthetic world pastes its colourful patch, as a boolean [size, size] mask."""
    x, y, side = PATCH_BOX
    region = np.zeros((size, size), bool)
    region[y : y + side, x : x + side] = True
    return region


def probe_region(size: int = IMAGE_SIZE) -> np.ndarray:
    """The pixels calibration_probe reads."""
    region = np.zeros((size, size), bool)
    region[-PROBE_CORNER:, -PROBE_CORNER:] = True
    return region


def region_cells(region: np.ndarray, grid: int, min_cover: float = MIN_CELL_COVER) -> np.ndarray:
    """Boolean [grid, grid]: the cells at least `min_cover` inside `region`."""
    return cell_cover(region, grid) >= min_cover


def unseen_cells(region: np.ndarray, grid: int) -> np.ndarray:
    """Boolean [grid, grid]: the cells with no pixel in `region` (a model reading only
    `region` cannot see them)."""
    return cell_cover(region, grid) == 0.0


def positive_share(values: np.ndarray, cells: np.ndarray) -> float:
    """The share of the map's positive mass in `cells`; 0 for a map with no positive mass
    (a constant model output: nothing to localise)."""
    positive = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    total = positive.sum()
    return float(positive[cells].sum() / total) if total > 0 else 0.0


def patch_images(count: int, seed: int = ATTRIBUTION_SEED, patch: bool = True) -> np.ndarray:
    """`count` scenes of the unbiased world (balanced shapes, any hue), each with the patch
    (or the same scenes without it): [count, 64, 64, 3] uint8."""
    _, _, scenes = make_split("none", count, seed)
    return np.stack([render(replace(scene, patch=patch)) for scene in scenes])


def probe_images(count: int, seed: int = ATTRIBUTION_SEED + 1) -> np.ndarray:
    """Scenes without the patch whose background (and so the probe's corner) is bright
    (0.55 to 0.75 of full scale): the probe's logit of class 1 is 10x the corner's
    normalised mean, 2 to 10, so class 1 is predicted with p 0.88 to 1 and deleting the
    corner has something to remove."""
    _, _, scenes = make_split("none", count, seed)
    rng = np.random.default_rng([seed, 1])
    return np.stack(
        [
            render(replace(scene, patch=False, background=float(rng.uniform(0.55, 0.75))))
            for scene in scenes
        ]
    )


def oracle_map(size: int = IMAGE_SIZE) -> np.ndarray:
    """The probe's true attribution: 1 on the pixels it reads, 0 elsewhere."""
    return probe_region(size).astype(np.float32)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of one metric between two methods on the same images."""

    metric: str
    first: str
    second: str
    first_mean: float
    second_mean: float
    better: str  # "lower" or "higher": which direction is better for the metric
    wins: int  # images where `first` is better
    images: int
    statistic: float
    p_value: float

    @property
    def winner(self) -> str:
        """The method with the better mean, or "neither" when the means are equal."""
        if self.first_mean == self.second_mean:
            return "neither"
        first_better = (self.first_mean < self.second_mean) == (self.better == "lower")
        return self.first if first_better else self.second


def paired(
    metric: str,
    first: str,
    first_values: Sequence[float],
    second: str,
    second_values: Sequence[float],
    better: str,
) -> Paired:
    """Two-sided paired Wilcoxon signed-rank test of `first` against `second`."""
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    a = np.asarray(first_values, dtype=np.float64)
    b = np.asarray(second_values, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values need one equal, non-zero length, got {a.shape}, {b.shape}")
    wins = int(np.sum(a < b) if better == "lower" else np.sum(a > b))
    if np.all(a == b):
        statistic, p_value = 0.0, 1.0
    else:
        result = stats.wilcoxon(a, b)
        statistic, p_value = float(result.statistic), float(result.pvalue)
    return Paired(
        metric,
        first,
        second,
        float(a.mean()),
        float(b.mean()),
        better,
        wins,
        a.size,
        statistic,
        p_value,
    )


def one_sided_less(first: Sequence[float], second: Sequence[float]) -> float:
    """p-value of the paired Wilcoxon test that `first` is lower than `second`."""
    return float(stats.wilcoxon(first, second, alternative="less").pvalue)


def attribute_all(
    client: propscope.Client, images: np.ndarray, model: str, workers: int = 3, **options: Any
) -> list[propscope.Attribution]:
    """One map per image (`options` as `Client.attribute` takes them), `workers` in flight."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda image: client.attribute(image, model, **options), images))


def evaluate_all(
    client: propscope.Client,
    images: np.ndarray,
    model: str,
    maps: Sequence[np.ndarray | propscope.Attribution],
    workers: int = 3,
    **options: Any,
) -> list[propscope.Evaluation]:
    """`Client.evaluate_attribution` of each (image, map) pair, `workers` in flight."""
    pairs = list(zip(images, maps, strict=True))
    with ThreadPoolExecutor(workers) as pool:
        return list(
            pool.map(
                lambda pair: client.evaluate_attribution(pair[0], model, pair[1], **options), pairs
            )
        )


@dataclass(frozen=True)
class GroundTruth:
    """Sobol on calibration_probe: the cells it cannot see against the one it reads."""

    images: int
    exact_zero_images: int  # images whose every unseen cell is exactly 0.0
    largest_unseen: float  # the largest |index| of an unseen cell over all images
    corner_indices: list[float]  # the index of the cell holding the probe's corner
    forward_passes: list[int]


def ground_truth(maps: Sequence[propscope.Attribution]) -> GroundTruth:
    grid = maps[0].grid.shape[0]
    unseen = unseen_cells(probe_region(), grid)
    corner = region_cells(probe_region(), grid)
    return GroundTruth(
        images=len(maps),
        exact_zero_images=sum(bool(np.all(m.grid[unseen] == 0.0)) for m in maps),
        largest_unseen=float(max(np.abs(m.grid[unseen]).max() for m in maps)),
        corner_indices=[float(m.grid[corner].sum()) for m in maps],
        forward_passes=[m.forward_passes for m in maps],
    )


@dataclass(frozen=True)
class Localisation:
    """The share of each map's positive mass in the patch's cells, for one model."""

    model: str
    shares: list[float]
    shares_touching: list[float]  # the same over every cell the patch touches at all
    predicted: list[int]

    def at_least(self, share: float) -> float:
        """The fraction of images with at least `share` of the mass in the patch's cells."""
        return float(np.mean(np.asarray(self.shares) >= share))


def localisation(model: str, maps: Sequence[propscope.Attribution]) -> Localisation:
    grid = maps[0].grid.shape[0]
    cells = region_cells(patch_region(), grid)
    touching = region_cells(patch_region(), grid, min_cover=1e-9)
    return Localisation(
        model=model,
        shares=[positive_share(m.grid, cells) for m in maps],
        shares_touching=[positive_share(m.grid, touching) for m in maps],
        predicted=[m.target_class for m in maps],
    )


@dataclass(frozen=True)
class Determinism:
    cold_passes: int
    warm_cache_hit: bool
    flushed_passes: int | None  # None: no Redis to flush was given
    identical_warm: bool
    identical_flushed: bool | None


def same_map(a: propscope.Attribution, b: propscope.Attribution) -> bool:
    """Bit-identical map and grid."""
    return a.map.tobytes() == b.map.tobytes() and a.grid.tobytes() == b.grid.tobytes()


def determinism(
    client: propscope.Client,
    image: np.ndarray,
    model: str,
    flush: Callable[[], None] | None,
    **options: Any,
) -> Determinism:
    """The same request cold (an image the cache has not seen), warm, and cold again after
    `flush` empties the cache (when given)."""
    cold = client.attribute(image, model, **options)
    warm = client.attribute(image, model, **options)
    again = None
    if flush is not None:
        flush()
        again = client.attribute(image, model, **options)
    return Determinism(
        cold_passes=cold.forward_passes,
        warm_cache_hit=warm.cache_hit,
        flushed_passes=None if again is None else again.forward_passes,
        identical_warm=same_map(cold, warm),
        identical_flushed=None if again is None else same_map(cold, again),
    )
