"""The statistics of the causal explanatory graph (arXiv 2305.08950, with PropGrad's
test): node and edge scores of gradual do-intervention curves, Benjamini-Hochberg
q-values, pre-screen and edge selection, the task-level graph with bootstrap
frequencies, the repair's channel choice, and the pass count every plan states.

Pure numpy/scipy: the method (methods/causal_graph.py) runs the passes."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np
from scipy import stats

from propscope_server.scoring.property_gradient import (
    TIE_TOLERANCE,
    gradient_magnitude,
    permutation_p_values,
)

# An edge is relevant when significant and |path_effect| >= this share of the request's
# min_probability_change (0.005 at the default 0.05). One downstream channel carries a
# part of its source's effect: on synth_hue's uncertain images (p0 0.5..0.8) the nodes
# of features.1/features.2 move p by 0.17..0.35 and single paths by 0.003..0.022, on
# saturated images (p0 > 0.999) by < 1e-3, orderly enough to be significant.
PATH_EFFECT_SHARE = 0.1
# Monotone shapes of a curve of S + 1 points tried for the best p-value a request's test
# can give (logistic ramps of several slopes and centres, a line, convex and concave
# powers): on 5..7 points a search over 12,000 random monotone curves found exact
# p-values at most 1.5x lower than the best of these (5 points: none below 0.067).
ORDERED_SLOPES = (2.0, 3.0, 4.0, 6.0, 10.0)
ORDERED_CENTRES = (0.35, 0.5, 0.65)
# Up to this many steps the best p-value is exact (every permutation of S + 1 points,
# 8! = 40,320); beyond, a seeded Monte Carlo estimate with the request's permutations.
EXACT_STEPS = 7
# From this many steps on, even a line gives an exact p-value below 1e-6: the test's
# floor is then 1 / (permutations + 1).
ALWAYS_REACHABLE_STEPS = 12
# Added to a layer's scale before dividing its channels' movements by it (a layer that is
# zero on every clean image).
MOVEMENT_EPS = 1e-6


def image_passes(
    layer_channels: Sequence[int], nodes_per_layer: int, steps: int, edges: int, edge_layers: int
) -> int:
    """Forward passes of one image (the design's formula, section 2 step 6):

        1 (clean) + sum over screened layers of C_l (one full ablation per channel)
        + per node: S - 1 (screened layer: t = 1 reused from the pre-screen) or S
        + edges * S (each edge's clamped path, t = 1..S) + one ACTIVATIONS pass per
        downstream layer of an edge (`edge_layers`).

    A layer is screened when it has more than `nodes_per_layer` channels."""
    total = 1 + edges * steps + edge_layers
    for channels in layer_channels:
        if channels > nodes_per_layer:
            total += channels + nodes_per_layer * (steps - 1)
        else:
            total += channels * steps
    return total


def max_edges_of(layer_channels: Sequence[int], nodes_per_layer: int, max_edges: int) -> int:
    """The most edges one image can have: node pairs of consecutive chosen layers,
    capped by max_edges."""
    nodes = [min(c, nodes_per_layer) for c in layer_channels]
    pairs = sum(a * b for a, b in zip(nodes, nodes[1:], strict=False))
    return min(pairs, max_edges)


def planned_passes(
    images: int,
    layer_channels: Sequence[int],
    nodes_per_layer: int,
    steps: int,
    max_edges: int,
    reference_images: int = 0,
    repair: bool = False,
) -> int:
    """The bound a plan states and checks against max_graph_passes: every image at its
    most edges (each edge layer needing its ACTIVATIONS pass), the reference images'
    passes, and the repair's S passes per image along the edited path."""
    edges = max_edges_of(layer_channels, nodes_per_layer, max_edges)
    edge_layers = min(max(len(layer_channels) - 1, 0), edges)
    per_image = image_passes(layer_channels, nodes_per_layer, steps, edges, edge_layers)
    return images * (per_image + (steps if repair else 0)) + reference_images


def ordered_curves(steps: int) -> np.ndarray:
    """[F, S + 1] monotone curves, the most ordered arrangements the test can meet."""
    t = np.linspace(0.0, 1.0, steps + 1)
    logistic = [
        1.0 / (1.0 + np.exp(-slope * (t - centre)))
        for slope in ORDERED_SLOPES
        for centre in ORDERED_CENTRES
    ]
    return np.array([t, t**2, np.sqrt(t), *logistic])


@functools.lru_cache(maxsize=512)
def ordered_p_values(steps: int, permutations: int) -> tuple[float, ...]:
    """Per ordered_curves curve (the line first), the p-value the test gives it with this
    many permutations, at least 1 / (permutations + 1). Exact up to EXACT_STEPS: a Monte
    Carlo p-value scatters around the exact one, and a lucky draw must not make a hopeless
    path length look usable; seeded beyond, so the same for every request."""
    floor = 1.0 / (permutations + 1)
    curves = ordered_curves(steps)
    if steps >= ALWAYS_REACHABLE_STEPS:
        return (floor,) * len(curves)
    if steps <= EXACT_STEPS:
        orders = np.array(list(itertools.permutations(range(steps + 1))))
        null = gradient_magnitude(curves[:, orders])  # [F, (S + 1)!]
        center = null.mean(axis=1, keepdims=True)
        observed = gradient_magnitude(curves)[:, None]
        extreme = np.abs(null - center) >= np.abs(observed - center) - TIE_TOLERANCE
        p_values = extreme.mean(axis=1)
    else:
        p_values, _ = permutation_p_values(curves, permutations, np.random.default_rng(0))
    return tuple(max(float(p), floor) for p in p_values)


def best_p_value(steps: int, permutations: int, line: bool = False) -> float:
    """The smallest p-value a curve of S + 1 points can get (PropGrad's best_p_value idea,
    over ordered_curves), or a straight line's (`line`): a request whose best is not
    below alpha can find nothing."""
    p_values = ordered_p_values(steps, permutations)
    return p_values[0] if line else min(p_values)


@functools.lru_cache(maxsize=512)
def fewest_reachable_steps(
    permutations: int, alpha: float, max_steps: int, line: bool = False
) -> int | None:
    """The fewest steps (from 2) whose best p-value (a line's: `line`) is below alpha;
    None up to max_steps."""
    for steps in range(2, max_steps + 1):
        if best_p_value(steps, permutations, line) < alpha:
            return steps
    return None


def prescreen(changes: np.ndarray, keep: int) -> np.ndarray:
    """The `keep` channels with the largest |p(1) - p(0)| (ties: lower channel first),
    in channel order."""
    changes = np.abs(np.asarray(changes, dtype=np.float64))
    order = np.argsort(-changes, kind="stable")[:keep]
    return np.sort(order)


def score_curves(
    curves: np.ndarray, permutations: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """curves [n, S + 1] -> (E|dp| per curve, permutation p-value per curve). A flat
    curve gets p = 1: every permutation scores the same."""
    curves = np.asarray(curves, dtype=np.float64)
    if len(curves) == 0:
        return np.zeros(0), np.zeros(0)
    p_values, _ = permutation_p_values(curves, permutations, rng)
    return gradient_magnitude(curves), p_values


def q_values(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy's false_discovery_control)."""
    p_values = np.asarray(p_values, dtype=np.float64)
    if p_values.size == 0:
        return p_values
    return stats.false_discovery_control(p_values, method="bh")


def choose_edges(direct_effects: np.ndarray, max_edges: int) -> np.ndarray:
    """Indices of the candidate edges to test: the largest |direct effect| first (ties:
    candidate order), at most max_edges."""
    effects = np.abs(np.asarray(direct_effects, dtype=np.float64))
    return np.argsort(-effects, kind="stable")[:max_edges]


def majority_class(targets: Sequence[int]) -> int:
    """The class most images are predicted as (ties: the lowest class)."""
    values, counts = np.unique(np.asarray(targets), return_counts=True)
    return int(values[np.argmax(counts)])


def task_shares(
    significant: np.ndarray,
    scores: np.ndarray,
    min_share: float,
    bootstrap: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """significant [I, K] (False where an item was not tested on an image), scores
    [I, K] (NaN where not tested) -> per item: the share of images on which it is
    significant, the bootstrap frequency (resampling the I images with replacement,
    `bootstrap` times) with which that share reaches min_share, and its mean score over
    the images where it was tested (0 where never)."""
    significant = np.asarray(significant, dtype=bool)
    images = significant.shape[0]
    share = significant.mean(axis=0)
    draws = rng.integers(0, images, size=(bootstrap, images))
    resampled = significant[draws].mean(axis=1)  # [B, K]
    frequency = (resampled >= min_share - 1e-12).mean(axis=0)
    tested = ~np.isnan(scores)
    counts = tested.sum(axis=0)
    sums = np.where(tested, scores, 0.0).sum(axis=0)
    mean_score = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return share, frequency, mean_score


def movements(path_means: np.ndarray, clean_means: np.ndarray, starts: Sequence[int]) -> np.ndarray:
    """path_means [I, S, K] (each image's channel means along the edited path),
    clean_means [I, K], starts (each layer's first entry, then K) -> each channel's
    movement: its largest |change| from the clean image along the path, averaged over
    the images, in units of its layer's scale (the RMS of the layer's clean channel
    means). One scale per layer, not per channel: a channel's own spread over a few
    similar images is near zero and made its movement explode (1e3 to 6e4 on two
    images); per layer, layers of different magnitudes still compare."""
    change = np.abs(path_means - clean_means[:, None, :]).max(axis=1).mean(axis=0)
    scale = np.empty_like(change)
    for start, end in itertools.pairwise(starts):
        scale[start:end] = np.sqrt(np.mean(np.square(clean_means[:, start:end])))
    return change / (scale + MOVEMENT_EPS)


def repair_choice(
    movement: np.ndarray, candidates: np.ndarray, max_share: float, total_channels: int
) -> np.ndarray:
    """Indices (into `candidates`' flat channel vector) of the repair: among the
    candidate channels (significant in the graph), the floor(max_share * total) (at
    least 1) that the property moves most, largest first."""
    keep = max(1, int(np.floor(max_share * total_channels)))
    candidates = np.flatnonzero(candidates)
    order = np.argsort(-np.asarray(movement)[candidates], kind="stable")
    return candidates[order[:keep]]


def saturation_warning(
    image: int,
    p0: float,
    largest_change: float,
    min_probability_change: float,
    significant: int,
    tested: int,
) -> str | None:
    """The warning of an image on which no node can be relevant: no tested channel's full
    intervention moved its target probability by min_probability_change. Mostly a
    saturated image (synth_hue's own images: p0 = 1 - 8.6e-12, the largest single-channel
    change 4e-9), whose graph keeps nothing although its ranking by score still holds;
    silence would read as "nothing matters". `significant` of `tested` nodes say whether
    the test still sees the curves: below ~1e-12 per step (a red circle: 1 - 1.5e-14,
    largest change 2.3e-12) they are TIE_TOLERANCE ties and nothing is significant either.
    None when some channel reached it."""
    if largest_change >= min_probability_change:
        return None
    distance = min(p0, 1.0 - p0)
    if p0 >= 1.0:
        level = "1 to float64 precision"
    elif p0 <= 0.0:
        level = "0 to float64 precision"
    else:
        level = f"1 - {1.0 - p0:.2g}" if p0 > 0.5 else f"{p0:.2g}"
    saturated = distance < min_probability_change
    if significant:
        fix = "the ranking by score still holds; lower min_probability_change"
        fix += " or explain less confident images" if saturated else ""
    else:
        # Lowering the floor cannot help: the test sees no curve, the scores rank noise.
        fix = "nothing is significant either, so even the scores rank noise"
        fix += "; explain less confident images" if saturated else ""
    return (
        f"image {image}: the target probability is {level}; no channel's full intervention "
        f"moved it by >= {min_probability_change:g} (largest {largest_change:.2g}), so no "
        f"node is relevant ({significant} of {tested} significant) and the graph keeps "
        f"nothing; {fix}"
    )
