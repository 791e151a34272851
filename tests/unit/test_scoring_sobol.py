"""Sobol design, total-order estimators and mask upsampling.

Reference values: TensorFlow (and so Xplique) cannot be installed here, so the
Xplique parity cases compare with (a) values worked out by hand on tiny inputs, in
the comments, and (b) loop-by-loop transliterations of Xplique's formulas kept in
this file (`_xplique_*`), written from Xplique's source independently of the module.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import qmc

from propscope_server.scoring.sobol import (
    ESTIMATORS,
    design_points,
    design_rows,
    forward_passes,
    nearest_indices,
    resize_map,
    sobol_design,
    total_order,
    upsample_masks,
)

FACTORS = 16
# The one factor whose design columns (A_9, B_9) are far from independent over the first
# 64 points of the unscrambled 32-dimensional Sobol sequence (see the module docstring).
DEGENERATE_FACTOR = 9


def _linear_truth(weights):
    return weights**2 / np.sum(weights**2)


def _xplique_design(dimension, nb_design):
    """Xplique's ScipySobolSequenceRS + build_replicated_design, as loops."""
    points = qmc.Sobol(dimension * 2, scramble=False).random(nb_design).astype(np.float32)
    a, b = points[:, :dimension], points[:, dimension:]
    blocks = []
    for i in range(dimension):
        block = a.copy()
        block[:, i] = b[:, i]
        blocks.append(block)
    return np.concatenate([a, b, *blocks], axis=0)


def _xplique_estimator(name, outputs, nb_design, dimension):
    """Xplique's sobol_estimators.py formulas, one factor at a time (float64)."""
    a = outputs[:nb_design]
    n = len(a)
    var_a = max(np.sum((a - a.mean()) ** 2) / max(n - 1, 1), 1e-12)
    result = []
    for i in range(dimension):
        c = outputs[nb_design * (2 + i) : nb_design * (3 + i)]
        if name == "jansen":
            result.append(np.sum((a - c) ** 2) / (2.0 * n * var_a))
        elif name == "homma":
            result.append((var_a - np.mean(a * c) + a.mean() ** 2) / var_a)
        elif name == "saltelli":
            result.append(1.0 - (np.mean(a * c) - a.mean() ** 2) / var_a)
        elif name == "glen_isaacs":
            var_c = max(np.sum((c - c.mean()) ** 2) / max(n - 1, 1), 1e-12)
            cov = np.sum((a - a.mean()) * (c - c.mean())) / max(n - 1, 1)
            result.append(1.0 - cov / np.sqrt(var_a * var_c))
        else:  # janon, Janon et al. (2014) with 1/N (our documented deviation from Xplique)
            m = (a.mean() + c.mean()) / 2
            v = max((np.mean(a**2) + np.mean(c**2)) / 2 - m**2, 1e-12)
            result.append(1.0 - (np.mean(a * c) - m**2) / v)
    return np.array(result)


def test_design_is_xplique_scipy_replicated_design():
    design = sobol_design(8, 5)
    assert design.dtype == np.float32
    assert design.shape == (8 * (5 + 2), 5) == (forward_passes(8, 5), 5)
    np.testing.assert_array_equal(design, _xplique_design(5, 8))
    a, b = design[:8], design[8:16]
    for i in range(5):
        block = design[8 * (2 + i) : 8 * (3 + i)]
        np.testing.assert_array_equal(block[:, i], b[:, i])
        np.testing.assert_array_equal(np.delete(block, i, axis=1), np.delete(a, i, axis=1))
    assert np.all((design >= 0) & (design < 1))
    # Unscrambled: the sequence starts at the origin, then the centre.
    np.testing.assert_array_equal(a[0], 0.0)
    np.testing.assert_array_equal(a[1], 0.5)


def test_scrambled_design_keeps_the_structure_and_is_deterministic():
    design = sobol_design(16, 6, scramble_seed=3)
    np.testing.assert_array_equal(design, sobol_design(16, 6, scramble_seed=3))
    assert not np.array_equal(design, sobol_design(16, 6, scramble_seed=4))
    assert not np.array_equal(design, sobol_design(16, 6))
    a, b = design[:16], design[16:32]
    for i in range(6):
        block = design[16 * (2 + i) : 16 * (3 + i)]
        np.testing.assert_array_equal(block[:, i], b[:, i])
        np.testing.assert_array_equal(np.delete(block, i, axis=1), np.delete(a, i, axis=1))
    assert np.all((design >= 0) & (design < 1))


def test_default_grid_scale_of_indices_with_and_without_scrambling():
    # Additive model over the 64 cells of the default grid, N = 32: each S_T = 1/64, so
    # the indices sum to 1. Xplique's unscrambled design sums to about 0.15 (var(A) is
    # inflated by the origin) and under-weights cells 9 and 42 (about 0.2-0.25 of the
    # median); the other cells stay within 0.76-1.01 of it.
    weights = np.ones(64)
    design = sobol_design(32, 64).astype(np.float64)
    indices = total_order(design @ weights, 32, 64)
    assert indices.sum() < 0.3
    ratio = indices / np.median(indices)
    assert np.flatnonzero(ratio < 0.6).tolist() == [9, 42]
    assert np.delete(ratio, [9, 42]).min() > 0.7 and ratio.max() < 1.1
    scrambled = sobol_design(32, 64, scramble_seed=1).astype(np.float64)
    indices = total_order(scrambled @ weights, 32, 64)
    assert 0.6 < indices.sum() < 1.5


@pytest.mark.parametrize("nb_design", [0, 3, 24, 33])
def test_design_rejects_a_number_of_designs_that_is_not_a_power_of_two(nb_design):
    with pytest.raises(ValueError, match="nb_design must be a power of two"):
        sobol_design(nb_design, 4)


def test_estimators_agree_with_hand_computed_values():
    # N = 2, D = 1: A -> [1, 3], B -> [0, 0], C_1 -> [2, 3].
    # var(A) = 2 (ddof 1); sum (a - c)^2 = 1 -> Jansen = 1 / (2 * 2 * 2) = 0.125.
    # mean(a c) = 5.5, mean(a)^2 = 4 -> Homma = Saltelli = 1 - 1.5 / 2 = 0.25.
    # Janon: m = (2 + 2.5) / 2 = 2.25, v = (5 + 6.5) / 2 - 2.25^2 = 0.6875,
    #        1 - (5.5 - 5.0625) / 0.6875 = 4 / 11.
    # Glen-Isaacs: two points are perfectly correlated -> 1 - 1 = 0.
    scores = np.array([1.0, 3.0, 0.0, 0.0, 2.0, 3.0])
    expected = {"jansen": 0.125, "homma": 0.25, "saltelli": 0.25, "janon": 4 / 11}
    for name, value in expected.items():
        assert total_order(scores, 2, 1, name)[0] == pytest.approx(value, abs=1e-12)
    assert total_order(scores, 2, 1, "glen_isaacs")[0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimators_match_xplique_formulas_on_random_outputs(estimator):
    rng = np.random.default_rng(11)
    nb_design, dimension = 16, 9
    outputs = rng.normal(0.4, 0.2, forward_passes(nb_design, dimension))
    ours = total_order(outputs, nb_design, dimension, estimator)
    reference = _xplique_estimator(estimator, outputs, nb_design, dimension)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-9)


def test_jansen_recovers_the_weights_of_a_linear_model():
    # Issue part 5: f(M) = sum w_i M_i, 16 factors, N 64 -> S_Ti = w_i^2 / sum w^2.
    weights = np.arange(1.0, FACTORS + 1)
    design = sobol_design(64, FACTORS).astype(np.float64)
    indices = total_order(design @ weights, 64, FACTORS)
    error = np.abs(indices - _linear_truth(weights))
    assert np.delete(error, DEGENERATE_FACTOR).max() <= 0.05
    # The measured limitation of this (Xplique's) design at N = 64: factor 9's columns in
    # A and B are nearly dependent, so its index comes out about 4x too small; at N = 128
    # every factor is within 0.05.
    a, b = design[:64], design[64:128]
    assert np.mean((a[:, DEGENERATE_FACTOR] - b[:, DEGENERATE_FACTOR]) ** 2) < 0.3 / 6
    assert indices[DEGENERATE_FACTOR] < 0.5 * _linear_truth(weights)[DEGENERATE_FACTOR]
    design = sobol_design(128, FACTORS).astype(np.float64)
    indices = total_order(design @ weights, 128, FACTORS)
    assert np.abs(indices - _linear_truth(weights)).max() <= 0.05


# Tolerances measured on six weight vectors (1..16 and five random ones): at N = 64 the
# worst error (factor 9 aside) is 0.045 for jansen/janon/glen_isaacs and 0.096 for
# homma/saltelli; at N = 128 (every factor) 0.018 and 0.033.
TOLERANCE_64 = {"jansen": 0.05, "janon": 0.05, "glen_isaacs": 0.05, "homma": 0.1, "saltelli": 0.1}
TOLERANCE_128 = {
    "jansen": 0.02,
    "janon": 0.02,
    "glen_isaacs": 0.02,
    "homma": 0.04,
    "saltelli": 0.04,
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("seed", range(3))
def test_every_estimator_recovers_random_linear_weights(estimator, seed):
    weights = np.random.default_rng(seed).uniform(0.0, 1.0, FACTORS)
    truth = _linear_truth(weights)
    for nb_design, tolerance in ((64, TOLERANCE_64), (128, TOLERANCE_128)):
        design = sobol_design(nb_design, FACTORS).astype(np.float64)
        error = np.abs(total_order(design @ weights, nb_design, FACTORS, estimator) - truth)
        if nb_design == 64:
            error = np.delete(error, DEGENERATE_FACTOR)
        assert error.max() <= tolerance[estimator]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_a_pure_interaction_pair_is_found_and_ignored_factors_are_zero(estimator):
    design = sobol_design(64, FACTORS).astype(np.float64)
    scores = (design[:, 2] - 0.5) * (design[:, 5] - 0.5)  # S_T = 1 for both, 0 elsewhere
    indices = total_order(scores, 64, FACTORS, estimator)
    assert indices[2] >= 0.4 and indices[5] >= 0.4
    ignored = np.delete(indices, [2, 5])
    if estimator in ("homma", "saltelli"):
        # Xplique's formula: 1 - (mean(a^2) - mean(a)^2) / var_ddof1(a) = 1 / N.
        np.testing.assert_allclose(ignored, 1 / 64, rtol=1e-9)
    else:
        assert np.all(ignored == 0.0)


def test_a_constant_model_gives_zero_indices_not_nan():
    indices = total_order(np.full(forward_passes(8, 4), 0.7), 8, 4, "jansen")
    np.testing.assert_array_equal(indices, 0.0)


def test_total_order_rejects_bad_inputs():
    with pytest.raises(ValueError, match="estimator must be one of"):
        total_order(np.zeros(12), 2, 4, "sobol")
    with pytest.raises(ValueError, match="nb_design \\* \\(dimension \\+ 2\\) = 12"):
        total_order(np.zeros(11), 2, 4)


def _tf_nearest_source(cells, size):
    """TF's ResizeNearestNeighbor (half_pixel_centers): floor((x + 0.5f) * (in / out)) in
    float32, capped at in - 1; one pixel at a time."""
    scale = np.float32(cells) / np.float32(size)
    return [
        min(int(np.floor((np.float32(x) + np.float32(0.5)) * scale)), cells - 1)
        for x in range(size)
    ]


def test_nearest_indices_follow_tensorflow_half_pixel_rule():
    assert nearest_indices(2, 3).tolist() == [0, 1, 1]  # (x + 0.5) * 2/3 = 1/3, 1, 5/3
    assert nearest_indices(8, 16).tolist() == [i // 2 for i in range(16)]
    for cells, size in [(2, 41), (7, 100), (8, 13), (9, 224), (8, 1023), (3, 5)]:
        assert nearest_indices(cells, size).tolist() == _tf_nearest_source(cells, size)


def test_upsampling_handles_non_square_and_indivisible_sizes():
    grid, height, width = 3, 7, 11
    rows = np.arange(2 * grid * grid, dtype=np.float32).reshape(2, -1)
    masks = upsample_masks(rows, grid, height, width)
    assert masks.shape == (2, height, width, 1) and masks.dtype == np.float32
    cells = rows.reshape(2, grid, grid)
    for y in range(height):
        for x in range(width):
            cy, cx = (2 * y + 1) * grid // (2 * height), (2 * x + 1) * grid // (2 * width)
            np.testing.assert_array_equal(masks[:, y, x, 0], cells[:, cy, cx])
    # Every cell is used, and cell areas differ by at most one row or column.
    counts = np.bincount(nearest_indices(grid, width))
    assert counts.size == grid and counts.max() - counts.min() <= 1


def test_upsampling_with_channels_reshapes_factors_channel_last():
    rows = np.arange(2 * 2 * 3, dtype=np.float32)[None]
    masks = upsample_masks(rows, 2, 4, 4, channels=3)
    assert masks.shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(masks[0, 0, 0], [0, 1, 2])  # cell (0, 0)
    np.testing.assert_array_equal(masks[0, 3, 0], [6, 7, 8])  # cell (1, 0)


def test_upsampling_rejects_a_grid_larger_than_the_image():
    with pytest.raises(ValueError, match="grid must be between 1 and the image's smaller side"):
        upsample_masks(np.zeros((1, 64)), 8, 6, 20)
    with pytest.raises(ValueError, match="design rows must have shape"):
        upsample_masks(np.zeros((1, 63)), 8, 16, 16)


def test_resize_map_is_opencv_bicubic():
    # OpenCV INTER_CUBIC, 2 -> 4 pixels: output x maps to source (x + 0.5) / 2 - 0.5, i.e.
    # -0.25, 0.25, 0.75, 1.25; Keys weights with a = -0.75, taps clamped to the edge.
    # For x = 1 (source 0.25): taps -1, 0, 1, 2 at distances 1.25, 0.25, 0.75, 1.75:
    # w = -0.10546875, 0.87890625, 0.26171875, -0.03515625 -> value on [0, 1]:
    # 0.26171875 - 0.03515625 = 0.2265625.
    line = resize_map(np.array([[0.0, 1.0]]), 1, 4)[0]
    assert line[1] == pytest.approx(0.2265625, abs=1e-7)
    np.testing.assert_allclose(line, 1 - line[::-1], atol=1e-7)  # symmetric
    # Constant maps stay constant, and the identity size is the identity.
    np.testing.assert_allclose(resize_map(np.full((8, 8), 0.3), 50, 70), 0.3, atol=1e-6)
    values = np.random.default_rng(0).random((8, 8))
    np.testing.assert_allclose(resize_map(values, 8, 8), values, atol=1e-6)


def test_design_rows_in_batches_are_the_design_in_pieces():
    a, b = design_points(8, 5)
    design = sobol_design(8, 5)
    pieces = [design_rows(a, b, start, min(start + 7, len(design))) for start in range(0, 56, 7)]
    np.testing.assert_array_equal(np.concatenate(pieces), design)
    # Row N (D + 2) - 1 is C_D's last: A's last point with column D from B's last.
    expected = a[-1].copy()
    expected[-1] = b[-1, -1]
    np.testing.assert_array_equal(design[-1], expected)
