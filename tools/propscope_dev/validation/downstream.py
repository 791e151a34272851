"""The paper's Table 2: predicting whether an intervention changes the model's
output, from our property score against the change of saliency maps.

Each (image, property) pair gets an intervention of random size, drawn per model
from a range calibrated through the service (`calibrate`, `size_ranges`) so that
about half of the model's pairs change its output: otherwise "unchanged" is the
answer almost always, and every predictor scores what the constant one does. Ground truth: the intervention x_N changes
the output when its predicted class differs from the original's or the target
class's probability moves by at least CHANGE_THRESHOLD. Every predictor gets the
threshold that maximises its accuracy on the data (the paper's protocol), so the
table compares how well each one *ranks* the pairs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import propscope
from propscope_dev.validation import saliency
from propscope_dev.validation.runner import PropertyRun, explain_all
from propscope_server.triton_models.classifiers.cnn import normalise_uint8_hwc

CHANGE_THRESHOLD = 0.1
OURS = "E|∇X| (ours)"


@dataclass(frozen=True)
class SizeAxis:
    """How big one property's intervention can be: a size m in [0, 1] maps to
    `start + m * (extreme - start)`; signed axes go either way (sign drawn with the
    size), to `negative_extreme` below zero."""

    template: str  # procedural spec with one {} for the size
    start: float
    extreme: float
    negative_extreme: float | None = None
    # Whether a path of `extreme` samples the whole axis (strength s = size s); the
    # patch's size is its side, not its opacity, so it takes one request per size.
    along_path: bool = True

    def spec(self, size: float, negative: bool = False) -> str:
        end = self.negative_extreme if negative else self.extreme
        if end is None:
            raise ValueError("this axis has no negative side")
        return self.template.format(self.start + size * (end - self.start))

    @property
    def signed(self) -> bool:
        return self.negative_extreme is not None

    def describe(self, smallest: float, largest: float) -> str:
        """The parameter values sizes in (smallest, largest] give, in words."""
        low, high = (self.start + m * (self.extreme - self.start) for m in (smallest, largest))
        text = f"{self.parameter} {low:.3g}..{high:.3g}"
        if self.negative_extreme is not None:
            low, high = (
                self.start + m * (self.negative_extreme - self.start) for m in (smallest, largest)
            )
            text += f" or {low:.3g}..{high:.3g}"
        return text

    @property
    def parameter(self) -> str:
        return self.template.rsplit(",", 1)[-1].split("=")[0]


# The widest sensible sizes (a hue turned half-way round, a patch that covers the whole
# 64 px image, a background from black to white, an object from 5% to twice its size).
AXES: dict[str, SizeAxis] = {
    "object_hue": SizeAxis("procedural:operation=hue,region=object,amount={:.2f}", 0.0, 180.0),
    "patch": SizeAxis("procedural:operation=blend,patch_size={:.0f}", 4.0, 64.0, along_path=False),
    "background_brightness": SizeAxis(
        "procedural:operation=brightness,region=background,amount={:.4f}", 0.0, 1.0, -1.0
    ),
    "object_size": SizeAxis("procedural:operation=scale,amount={:.4f}", 0.0, 1.0, -0.95),
}
# The aim: this share of each model's pairs change the output.
TARGET_CHANGE_RATE = 0.5
# Sizes probed per axis (and side) when calibrating.
GRID = 20
# The shortest path the service scores at alpha 0.01 (6 images); only x_N is read.
SINGLE_STEPS = 5


def grid_sizes(grid: int = GRID) -> np.ndarray:
    """The middle of each cell ((k - 1) / grid, k / grid]: a size drawn in a range of
    cells changes the output about as often as their middles do."""
    return (np.arange(1, grid + 1) - 0.5) / grid


def calibration_properties(grid: int = GRID) -> tuple[dict[str, str], dict[str, str]]:
    """The probes of every axis at the middle of each of its `grid` cells: (path
    properties, explained with 2 x grid steps, whose (2k - 1)-th image is cell k's
    middle; one property per size, explained with SINGLE_STEPS steps, read at x_N).
    Names are "<property>+" / "<property>-" (sides) and "<property>@<k>" (sizes)."""
    paths, singles = {}, {}
    for name, axis in AXES.items():
        if axis.along_path:
            paths[f"{name}+"] = axis.spec(1.0)
            if axis.signed:
                paths[f"{name}-"] = axis.spec(1.0, negative=True)
        else:
            for k, size in enumerate(grid_sizes(grid), start=1):
                singles[f"{name}@{k}"] = axis.spec(size)
    return paths, singles


def change_by_size(
    path_runs: Sequence[PropertyRun], single_runs: Sequence[PropertyRun], grid: int = GRID
) -> dict[str, np.ndarray]:
    """Per property, the share of (image, side) pairs whose output changes at each
    size of the grid: [grid] fractions, from one model's calibration runs."""
    changes: dict[str, list[np.ndarray]] = {name: [] for name in AXES}
    for run in path_runs:
        name = run.property_name.rstrip("+-")
        changes[name].append(
            np.array([output_changed(run, end=2 * k - 1) for k in range(1, grid + 1)], dtype=float)
        )
    by_image: dict[tuple[str, int], np.ndarray] = {}
    for run in single_runs:
        name, k = run.property_name.split("@")
        row = by_image.setdefault((name, run.image_index), np.full(grid, np.nan))
        row[int(k) - 1] = float(output_changed(run))
    for (name, _), row in by_image.items():
        changes[name].append(row)
    return {name: np.mean(rows, axis=0) for name, rows in changes.items() if rows}


def calibrate(
    client: propscope.Client,
    images: np.ndarray,
    model: str,
    grid: int = GRID,
    workers: int = 4,
) -> dict[str, np.ndarray]:
    """`change_by_size` for `model` on `images` (kept apart from the test images),
    through the service."""
    paths, singles = calibration_properties(grid)
    path_runs = explain_all(client, images, [model], paths, steps=2 * grid, workers=workers)
    single_runs = explain_all(client, images, [model], singles, steps=SINGLE_STEPS, workers=workers)
    return change_by_size(path_runs, single_runs, grid)


def interval_rate(changes: np.ndarray, first: int, last: int) -> float:
    """P(change) for a size drawn uniformly over grid cells first..last (1-based: cell k
    is sizes ((k - 1) / grid, k / grid]), from the change share at each cell's middle."""
    return float(np.mean(changes[first - 1 : last]))


@dataclass(frozen=True)
class SizeRange:
    """One model x property: sizes are drawn uniformly from (smallest, largest]; a
    property that (almost) never changes the model's output is left out of its pairs."""

    property_name: str
    smallest: float
    largest: float
    target_rate: float
    expected_rate: float  # on the calibration images
    most_possible_rate: float
    included: bool


# A property whose best size range changes a model's output less often than this is left
# out of that model's pairs: at every size its pairs are "unchanged", which only pads
# the constant predictor (the old table's degeneracy).
MIN_POSSIBLE_RATE = 0.05
# Among size ranges this near the aim, the widest: it spans the flip point.
RATE_TOLERANCE = 0.02


def size_ranges(
    changes: dict[str, np.ndarray], target: float = TARGET_CHANGE_RATE
) -> dict[str, SizeRange]:
    """Per property, the range of sizes whose expected change rate is nearest its aim.
    Properties that can reach MIN_POSSIBLE_RATE aim at `target`; where one cannot
    reach it at any size range (or changes the output at every size), the others make
    up the difference (`common_level`), so that the model's pairs together change
    about `target` of the time."""
    grid = len(next(iter(changes.values())))
    intervals = [(first, last) for first in range(1, grid + 1) for last in range(first, grid + 1)]
    rates = {
        name: np.array([interval_rate(c, first, last) for first, last in intervals])
        for name, c in changes.items()
    }
    most = {name: float(r.max()) for name, r in rates.items()}
    included = {
        name: (float(r.min()), most[name])
        for name, r in rates.items()
        if most[name] >= MIN_POSSIBLE_RATE
    }
    aims = common_level(included, target) if included else {}
    ranges = {}
    for name, r in rates.items():
        aim = aims.get(name, 0.0)
        error = np.abs(r - aim)
        near = np.flatnonzero(error <= error.min() + RATE_TOLERANCE)
        widest = max(near, key=lambda i: (intervals[i][1] - intervals[i][0], -error[i]))
        first, last = intervals[widest]
        ranges[name] = SizeRange(
            property_name=name,
            smallest=(first - 1) / grid,
            largest=last / grid,
            target_rate=aim,
            expected_rate=float(r[widest]),
            most_possible_rate=most[name],
            included=name in included,
        )
    return ranges


def common_level(bounds: dict[str, tuple[float, float]], target: float) -> dict[str, float]:
    """Per property an aim within its (least, most) possible rates: one level t clipped
    to each range, with t chosen so that the aims' mean is `target` (or as near as the
    ranges allow). Properties that can reach the target all aim at it."""

    def mean_at(level: float) -> float:
        return float(np.mean([min(max(level, low), high) for low, high in bounds.values()]))

    low, high = 0.0, 1.0
    for _ in range(60):  # bisection: the mean is non-decreasing in the level
        middle = (low + high) / 2
        low, high = (middle, high) if mean_at(middle) < target else (low, middle)
    level = (low + high) / 2
    return {name: min(max(level, lo), hi) for name, (lo, hi) in bounds.items()}


def random_interventions(
    count: int, seed: int, ranges: dict[str, SizeRange] | None = None
) -> list[dict[str, str]]:
    """Per image, the properties (those `ranges` has and includes; all four without it) with
    sizes drawn uniformly within each range (the whole axis without `ranges`), the
    sign of a signed axis at random."""
    rng = np.random.default_rng([seed, 2])
    interventions = []
    for _ in range(count):
        drawn = {}
        for name, axis in AXES.items():
            chosen = ranges.get(name) if ranges is not None else None
            if ranges is not None and (chosen is None or not chosen.included):
                continue
            low, high = (chosen.smallest, chosen.largest) if chosen is not None else (0.0, 1.0)
            size = float(rng.uniform(low, high))
            negative = axis.signed and bool(rng.integers(0, 2))
            drawn[name] = axis.spec(size, negative)
        interventions.append(drawn)
    return interventions


def output_changed(run: PropertyRun, threshold: float = CHANGE_THRESHOLD, end: int = -1) -> bool:
    """Whether x_end (x_N by default) changes the output against x_0."""
    flipped = run.predicted_classes[end] != run.predicted_classes[0]
    return bool(flipped or abs(run.curve[end] - run.curve[0]) >= threshold)


def best_threshold_accuracy(values: Sequence[float], labels: Sequence[bool]) -> float:
    """The best accuracy of "changed when value > t" over every threshold t,
    including the constant predictions."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    thresholds = np.concatenate([[-np.inf], np.unique(values)])
    predictions = values[None, :] > thresholds[:, None]
    return float((predictions == labels[None, :]).mean(axis=1).max())


@dataclass(frozen=True)
class Accuracies:
    """One model's pairs: the accuracy of each predictor, the share of pairs whose
    output changed, and the largest gap between the in-process and the served
    model's target probability on the originals (both must be the same model)."""

    by_predictor: dict[str, float]
    positive_rate: float
    max_probability_gap: float
    saliency_seconds: dict[str, float] = field(default_factory=dict)


def predictor_accuracies(
    runs: Sequence[PropertyRun],
    images: np.ndarray,
    model_name: str,
    methods: Iterable[str] = saliency.METHODS,
    seed: int = 0,
) -> Accuracies:
    """`runs` must carry x_N (explained with keep_last_image); `seed` seeds LIME's and
    Kernel SHAP's sampling."""
    runs = [r for r in runs if r.model == model_name]
    labels = [output_changed(r) for r in runs]
    model = saliency.served_classifier(model_name)
    # Every property of an image shares x_0: any of its runs knows x_0's class and p.
    original_runs = {r.image_index: r for r in runs}
    originals = sorted(original_runs)
    row = {index: i for i, index in enumerate(originals)}
    original_targets = np.array([original_runs[i].predicted_classes[0] for i in originals])
    with torch.inference_mode():
        logits = model(normalise_uint8_hwc(images[originals]))
    in_process = torch.softmax(logits, dim=1).numpy()[np.arange(len(originals)), original_targets]
    served = np.array([original_runs[i].curve[0] for i in originals])
    edited = np.stack([r.last_image for r in runs])
    original_of_run = [row[r.image_index] for r in runs]
    edited_targets = original_targets[original_of_run]
    by_predictor = {OURS: best_threshold_accuracy([r.score for r in runs], labels)}
    seconds = {}
    for method in methods:
        torch.manual_seed(seed)
        started = time.perf_counter()
        before = saliency.attribution_maps(method, model, images[originals], original_targets)
        after = saliency.attribution_maps(method, model, edited, edited_targets)
        seconds[method] = time.perf_counter() - started
        change = saliency.map_change(before[original_of_run], after)
        by_predictor[method] = best_threshold_accuracy(change, labels)
    return Accuracies(
        by_predictor=by_predictor,
        positive_rate=float(np.mean(labels)),
        max_probability_gap=float(np.abs(in_process - served).max()),
        saliency_seconds=seconds,
    )
