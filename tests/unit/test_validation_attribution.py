"""The attribution table's pure pieces: regions as grid cells, mass shares, its images and
the paired comparison."""

from __future__ import annotations

import numpy as np
import pytest

from propscope_dev.validation import attribution as va
from propscope_server.synthetic.world import PATCH_BOX, PATCH_COLORS


def test_the_patch_owns_the_top_left_two_by_two_cells_of_an_8x8_grid():
    cover = va.cell_cover(va.patch_region(), 8)
    # 14 pixels from (3, 3): 5 of the first cell's 8 rows, all 8 of the second, 1 of the third.
    assert cover[0, 0] == pytest.approx(25 / 64)
    assert cover[1, 1] == 1.0 and cover[0, 1] == pytest.approx(40 / 64)
    assert cover[2, 2] == pytest.approx(1 / 64)
    expected = np.zeros((8, 8), bool)
    expected[:2, :2] = True
    assert np.array_equal(va.region_cells(va.patch_region(), 8), expected)
    assert va.region_cells(va.patch_region(), 8, min_cover=1e-9).sum() == 9


def test_the_probe_sees_one_cell_at_grid_8_and_four_at_grid_16():
    assert va.unseen_cells(va.probe_region(), 8).sum() == 63
    assert not va.unseen_cells(va.probe_region(), 8)[7, 7]
    assert va.unseen_cells(va.probe_region(), 16).sum() == 256 - 4


def test_cell_cover_refuses_a_grid_that_does_not_divide_the_region():
    with pytest.raises(ValueError, match="does not split"):
        va.cell_cover(np.zeros((64, 64), bool), 12)


def test_positive_share_ignores_negative_noise_and_an_all_zero_map():
    values = np.array([[3.0, -5.0], [1.0, 0.0]])
    cells = np.array([[True, True], [False, False]])
    assert va.positive_share(values, cells) == pytest.approx(0.75)
    assert va.positive_share(np.zeros((2, 2)), cells) == 0.0


def test_the_tables_images_have_the_patch_or_a_bright_corner():
    scenes = va.patch_images(4)
    x, y, _ = PATCH_BOX
    assert scenes.shape == (4, 64, 64, 3)
    assert all(np.array_equal(scene[y, x], PATCH_COLORS[0]) for scene in scenes)
    probes = va.probe_images(6)
    corners = probes[:, -8:, -8:].reshape(6, -1)
    assert corners.min() >= round(0.55 * 255) and corners.max() <= round(0.75 * 255)
    assert np.array_equal(va.oracle_map()[-8:, -8:], np.ones((8, 8), np.float32))
    assert va.oracle_map().sum() == 64


def test_paired_counts_wins_in_the_metrics_direction():
    lower = va.paired("deletion", "a", [0.1, 0.2, 0.3, 0.1, 0.2], "b", [0.5] * 5, "lower")
    assert lower.wins == 5 and lower.winner == "a"
    assert lower.p_value == pytest.approx(0.0625)  # exact two-sided, n = 5, all one way
    higher = va.paired("insertion", "a", [0.1, 0.2, 0.3, 0.1, 0.2], "b", [0.5] * 5, "higher")
    assert higher.wins == 0 and higher.winner == "b"
    same = va.paired("deletion", "a", [0.1, 0.2], "b", [0.1, 0.2], "lower")
    assert (same.p_value, same.winner) == (1.0, "neither")


def test_paired_refuses_unpaired_values_and_an_unknown_direction():
    with pytest.raises(ValueError, match="equal"):
        va.paired("deletion", "a", [0.1, 0.2], "b", [0.1], "lower")
    with pytest.raises(ValueError, match="better"):
        va.paired("deletion", "a", [0.1], "b", [0.2], "smaller")


def test_one_sided_test_of_lower_values():
    low, high = np.arange(8) / 10, np.arange(8) / 10 + 1
    assert va.one_sided_less(low, high) == pytest.approx(1 / 256)
    assert va.one_sided_less(high, low) > 0.99
