"""EVA's pure maths (scoring/eva.py): the radius in the model's input units, the d + 1
radius rows on Sobol's cells in the input's own layout, the overlap from margins,
phi against a linear model whose bounds are exact, and the warnings (the method
through Triton is tests/integration/test_eva.py)."""

from __future__ import annotations

import numpy as np
import pytest

from propscope_server.backends.preprocessing import image_region, resize
from propscope_server.scoring import eva, sobol


def test_epsilon_is_pixel_values_for_a_uint8_input():
    assert eva.input_epsilon(8 / 255, "UINT8", (0.5, 0.5, 0.5)).tolist() == pytest.approx([8.0] * 3)


def test_epsilon_is_divided_by_the_std_for_a_float_input():
    found = eva.input_epsilon(0.1, "FP32", (0.2, 0.25, 0.5))
    assert found.tolist() == pytest.approx([0.5, 0.4, 0.2])


def test_epsilon_is_unchanged_for_a_float_input_without_std():
    assert eva.input_epsilon(0.1, "FP16", None).tolist() == pytest.approx([0.1] * 3)


def test_row_zero_perturbs_everything_and_row_one_plus_u_holds_cell_u():
    grid, height, width = 3, 7, 10
    radius = np.array([1.0, 2.0, 3.0])
    rows = eva.radius_rows(grid, height, width, radius, channels_first=False)
    assert rows.shape == (grid * grid + 1, height * width * 3) and rows.dtype == np.float32
    assert (rows[0].reshape(height, width, 3) == radius).all()
    for cell in range(grid * grid):
        one_hot = np.zeros((1, grid * grid), np.float32)
        one_hot[0, cell] = 1.0
        inside = sobol.upsample_masks(one_hot, grid, height, width)[0, ..., 0] == 1.0
        held = rows[1 + cell].reshape(height, width, 3)
        assert (held[inside] == 0).all(), cell  # Sobol's cell u, exactly
        assert (held[~inside] == radius).all(), cell


def test_channels_first_rows_are_the_same_radii_transposed():
    radius = np.array([1.0, 2.0, 3.0])
    last = eva.radius_rows(4, 8, 6, radius, channels_first=False)
    first = eva.radius_rows(4, 8, 6, radius, channels_first=True)
    assert first.shape == last.shape
    np.testing.assert_array_equal(
        first.reshape(-1, 3, 8, 6), last.reshape(-1, 8, 6, 3).transpose(0, 3, 1, 2)
    )
    assert (first[0].reshape(3, 8, 6)[2] == 3.0).all()  # channel 2 is the blue radius


def test_overlap_and_adversary_leave_the_target_out():
    margins = np.array([[0.0, -1.0, 2.0], [5.0, -4.0, -3.0]])
    assert eva.overlaps(margins, 0).tolist() == [2.0, -3.0]
    assert eva.adversary(np.array([0.0, -1.0, -0.5]), 0) == 2  # the target's 0 is not it


def linear_bounds(weights: np.ndarray, x: np.ndarray, radii: np.ndarray, target: int):
    """The exact max over the box x +- r of (w_c - w_y) . x' per row and class."""
    difference = weights - weights[target]
    return (difference @ x)[:, None] + np.abs(difference) @ radii.T


def test_phi_of_a_linear_two_class_model_is_its_weight_mass_in_each_cell():
    """With one other class AO_bar(B) - AO_bar(B_u) = sum over u's elements of
    |w_1 - w_0| r exactly: the definition and the rows agree."""
    rng = np.random.default_rng(0)
    grid, height, width = 4, 8, 8
    weights = rng.normal(size=(2, height * width * 3))
    x = rng.uniform(0, 1, height * width * 3)
    radii = eva.radius_rows(grid, height, width, np.full(3, 0.05), channels_first=False)
    bound = linear_bounds(weights, x, radii, target=0).T  # [rows, K]
    bounds = eva.eva_bounds(bound, bound, 0)
    cells = eva.cell_of_pixels(grid, height, width)
    mass = np.abs(weights[1] - weights[0]).reshape(height, width, 3).sum(axis=-1) * 0.05
    expected = np.array([mass[cells == u].sum() for u in range(grid * grid)])
    np.testing.assert_allclose(bounds.importance, expected, rtol=1e-5)
    assert bounds.adversary_class == 1
    assert bounds.overlap_bound == pytest.approx(bound[0, 1])


def test_sampled_overlap_is_the_highest_over_every_row():
    bound = np.array([[0.0, 3.0], [0.0, 2.0], [0.0, 1.0]])
    sampled = np.array([[0.0, -1.0], [0.0, 0.5], [0.0, -2.0]])
    assert eva.eva_bounds(bound, sampled, 0).sampled_overlap == 0.5


def test_a_map_no_cell_changes_is_flat():
    flat = eva.eva_bounds(np.array([[0.0, 2.0]] * 5), np.zeros((5, 2)), 0)
    warning = eva.flat_warning(flat)
    assert "carries no information" in warning and "epsilon" in warning and "grid" in warning
    moving = eva.eva_bounds(np.array([[0.0, 2.0]] * 4 + [[0.0, 1.9]]), np.zeros((5, 2)), 0)
    assert eva.flat_warning(moving) == ""


def test_an_infinite_bound_gives_a_zero_map_and_says_why():
    """The model returns +inf for a box float32 cannot bound; inf - inf would be NaN."""
    rows = np.array([[0.0, np.inf]] * 4 + [[0.0, 3.0]])
    bounds = eva.eva_bounds(rows, np.zeros((5, 2)), 0)
    assert bounds.overlap_bound == np.inf
    assert np.array_equal(bounds.importance, np.zeros(4))
    assert "infinite" in eva.flat_warning(bounds) and "eva.epsilon" in eva.flat_warning(bounds)


def test_a_sampled_margin_above_its_bound_is_a_soundness_failure():
    bound = np.array([[0.0, 1.0, 2.0], [0.0, 0.5, 0.5]])
    below = np.array([[0.0, 0.9, 2.0], [0.0, 0.5, 0.1]])
    assert eva.soundness_warnings(bound, below, 0) == ()
    above = below.copy()
    above[1, 2] = 0.7
    (warning,) = eva.soundness_warnings(bound, above, 0)
    assert warning.startswith("SOUNDNESS FAILURE") and "row 1 class 2" in warning


def test_an_excess_within_float32_rounding_is_said_as_rounding():
    bound = np.array([[0.0, 100.0]])
    (warning,) = eva.soundness_warnings(bound, bound + [[0.0, 1e-4]], 0)
    assert "float32 rounding" in warning and "SOUNDNESS" not in warning


def test_the_target_column_is_not_checked():
    bound = np.array([[0.0, 1.0]])
    assert eva.soundness_warnings(bound, np.array([[5.0, 1.0]]), 0) == ()


def test_a_range_of_rows_is_the_same_rows_of_the_whole():
    radius = np.array([1.0, 2.0, 3.0])
    whole = eva.radius_rows(3, 6, 6, radius, channels_first=True)
    parts = [
        eva.radius_rows(3, 6, 6, radius, True, start, min(start + 4, 10)) for start in (0, 4, 8)
    ]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("mode", ["letterbox", "center_crop", "squash"])
def test_the_letterbox_padding_is_held_fixed_on_every_row(mode):
    """A wide image letterboxed into a square input: the bars above and below show no
    image, so no row perturbs them; center_crop and squash fill the input with image."""
    image = np.full((20, 40, 3), 200, np.uint8)
    (view,) = resize(image[None], 16, 16, mode)
    region = image_region(image.shape[:2], view.shape[:2], mode)
    shown = view.sum(axis=2) > 0  # the letterbox bars are black, the image is not
    rows = eva.radius_rows(4, 16, 16, np.full(3, 8.0), False, image=region)
    radii = rows.reshape(17, 16, 16, 3)
    assert ((radii[0] > 0).all(axis=2) == shown).all()
    assert (radii[:, ~shown] == 0).all()
    if mode == "letterbox":
        assert region == (4, 0, 8, 16) and not shown.all()
    else:
        assert region == (0, 0, 16, 16) and shown.all()
    # A cell inside the image is still held fixed in its own row.
    held = eva.cell_of_pixels(4, 16, 16) == 5
    assert (radii[6][held] == 0).all() and (radii[6][shown & ~held] > 0).all()


@pytest.mark.parametrize(
    ("changes", "decision", "words"),
    [
        ({"overlap_bound": -4.6}, "certified", "certified: no input"),
        ({"sampled_overlap": 0.5}, "not_robust", "not robust: a sampled point"),
        (
            {},
            "undecided",
            "gap of 176.6 (the bound's looseness plus what the samples missed); a smaller",
        ),
        ({"bound": "ibp"}, "undecided", "missed); the crown bound or a smaller epsilon"),
        (
            {"guaranteed": False, "overlap_bound": -3.5},
            "undecided",
            "the hybrid bound -3.5 is below 0 but NOT guaranteed",
        ),
    ],
)
def test_an_eva_result_says_what_its_overlaps_decide(changes, decision, words):
    """A bound far above a negative sampled overlap decides nothing: said, with the gap."""
    figures = {
        "guaranteed": True,
        "bound": "crown",
        "overlap_bound": 165.2,
        "sampled_overlap": -11.42,
    }
    decided, verdict = eva.decide(**{**figures, **changes})
    assert decided == decision
    assert words in verdict, verdict
