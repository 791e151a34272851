"""RISE masks and the streamed map. Expected values are worked out by hand from
Xplique's rise.py definitions (TensorFlow is not installable here)."""

from __future__ import annotations

import numpy as np
import pytest

from propscope_server.scoring.rise import RiseAccumulator, bilinear_matrix, rise_masks


def test_masks_are_deterministic_for_a_seeded_generator():
    first = rise_masks(20, 5, 0.5, 30, 45, np.random.default_rng(42))
    second = rise_masks(20, 5, 0.5, 30, 45, np.random.default_rng(42))
    other = rise_masks(20, 5, 0.5, 30, 45, np.random.default_rng(43))
    assert first.shape == (20, 30, 45, 1) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_masks_are_smooth_in_unit_range_with_the_preservation_mean():
    masks = rise_masks(400, 7, 0.3, 28, 40, np.random.default_rng(0))
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    assert masks.mean() == pytest.approx(0.3, abs=0.02)
    # Bilinear upsampling: neighbouring pixels differ by at most one cell step's slope.
    assert np.abs(np.diff(masks, axis=2)).max() <= 7 / 40 * 1.5 + 1e-6
    # Not all binary: the edges between cells are interpolated.
    assert np.any((masks > 0.01) & (masks < 0.99))


def test_masks_are_shifted_per_mask():
    masks = rise_masks(50, 2, 1.0, 8, 8, np.random.default_rng(3))
    np.testing.assert_allclose(masks, 1.0)  # p = 1: everything kept, whatever the shift
    # 4 cells over 16 pixels are upsampled to 20 pixels (5 per cell) and cut at a random
    # offset: where a profile crosses 0.5, modulo 5, tells that offset. Xplique's one
    # offset per batch would give a single phase.
    masks = rise_masks(200, 4, 0.5, 16, 16, np.random.default_rng(3))
    phases = set()
    for profile in masks[:, 0, :, 0]:
        low, high = profile[:-1] - 0.5, profile[1:] - 0.5
        for x in np.flatnonzero(low * high < 0):
            phases.add(round(float(x + low[x] / (low[x] - high[x])) % 5, 3))
    assert len(phases) >= 4


def test_bilinear_matrix_is_tensorflow_half_pixel_bilinear():
    # 2 -> 4: sources (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
    np.testing.assert_allclose(
        bilinear_matrix(2, 4), [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], atol=1e-12
    )
    np.testing.assert_allclose(bilinear_matrix(5, 17).sum(axis=1), 1.0)


def test_accumulator_matches_xplique_definition_by_hand():
    # Two 1 x 2 masks: [1, 0] with score 2, [0.5, 1] with score 4.
    # Numerator: [2 + 2, 0 + 4] = [4, 4]; mask sums: [1.5, 1].
    # Xplique: [4 / 1.5001, 4 / 1.0001]; expectation (N p = 2 * 0.5): [4, 4].
    masks = np.array([[1.0, 0.0], [0.5, 1.0]]).reshape(2, 1, 2, 1)
    scores = np.array([2.0, 4.0])
    xplique = RiseAccumulator(1, 2, 0.5)
    xplique.add(masks[:1], scores[:1])
    xplique.add(masks[1:], scores[1:])  # batching does not matter
    np.testing.assert_allclose(xplique.result()[0], [4 / 1.5001, 4 / 1.0001], rtol=1e-6)
    paper = RiseAccumulator(1, 2, 0.5, normalization="expectation")
    paper.add(masks, scores)
    np.testing.assert_allclose(paper.result()[0], [4.0, 4.0], rtol=1e-6)
    assert xplique.count == paper.count == 2


def test_rise_localises_the_region_a_model_reads():
    # A "model" that scores the mean mask value over a 4 x 4 corner patch.
    height, width = 24, 32
    masks = rise_masks(600, 6, 0.5, height, width, np.random.default_rng(9))
    scores = masks[:, :4, -4:, 0].mean(axis=(1, 2))
    accumulator = RiseAccumulator(height, width, 0.5)
    accumulator.add(masks, scores)
    saliency = accumulator.result()
    assert saliency.shape == (height, width)
    assert saliency[:4, -4:].mean() > saliency[-8:, :8].mean() + 0.1


def test_accumulator_rejects_bad_batches():
    accumulator = RiseAccumulator(4, 4, 0.5)
    with pytest.raises(ValueError, match="no masks were added"):
        accumulator.result()
    with pytest.raises(ValueError, match="masks must have shape \\[2, 4, 4, 1\\]"):
        accumulator.add(np.ones((3, 4, 4, 1)), np.ones(2))
    with pytest.raises(ValueError, match="normalization must be one of"):
        RiseAccumulator(4, 4, 0.5, normalization="sum")
    with pytest.raises(ValueError, match="preservation must be in"):
        rise_masks(2, 2, 0.0, 4, 4, np.random.default_rng(0))
