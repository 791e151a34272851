"""Sobol indices over edit strengths: design, estimators on closed forms, bootstrap
intervals, the zero-variance case and the composition schedule.

Closed forms (uniform factors on [0, 1]):
- f = a x1 + b x2: S_i = ST_i = w_i^2 / (a^2 + b^2), no interaction.
- f = x1 x2: V = 1/9 - 1/16 = 7/144, V_1 = var(x1 / 2) = 3/144, so S_i = 3/7,
  ST_i = 1 - S_j = 4/7, S_12 = 1 - 6/7 = 1/7, share = 8/7 - 6/7 = 2/7.
- Ishigami (a = 7, b = 0.1, x = pi (2 u - 1)): V = a^2/8 + b pi^4/5 + b^2 pi^8/18 + 1/2,
  V_1 = (1 + b pi^4/5)^2 / 2, V_2 = a^2/8, V_3 = 0, V_13 = b^2 pi^8 (1/18 - 1/50).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import qmc

from propscope_server.scoring.interactions import (
    Design,
    EditCall,
    design_row_count,
    edit_schedule,
    estimate_indices,
    interaction_design,
    nearest_powers_of_two,
)

ISHIGAMI_A, ISHIGAMI_B = 7.0, 0.1


def _estimate(f, properties=2, n=1024, seed=0, pair=None, bootstrap=1000):
    design = interaction_design(properties, n, seed, pair)
    return design, estimate_indices(
        design, f(design.rows.astype(np.float64)), bootstrap, 0.95, seed
    )


def _inside(interval, truth):
    return interval.low <= truth <= interval.high


def _ishigami(u):
    x = np.pi * (2.0 * u - 1.0)
    return (
        np.sin(x[:, 0])
        + ISHIGAMI_A * np.sin(x[:, 1]) ** 2
        + ISHIGAMI_B * x[:, 2] ** 4 * np.sin(x[:, 0])
    )


def _ishigami_truth():
    a, b = ISHIGAMI_A, ISHIGAMI_B
    variance = a**2 / 8 + b * np.pi**4 / 5 + b**2 * np.pi**8 / 18 + 0.5
    v1, v2 = 0.5 * (1 + b * np.pi**4 / 5) ** 2, a**2 / 8
    v13 = b**2 * np.pi**8 * (1 / 18 - 1 / 50)
    first = np.array([v1, v2, 0.0]) / variance
    total = np.array([v1 + v13, v2, v13]) / variance
    return first, total, v13 / variance


# --- design ---------------------------------------------------------------------------


def test_design_blocks_follow_a_b_and_one_column_swaps():
    n, p = 8, 3
    design = interaction_design(p, n, seed=5, pair=(2, 0))
    rows = design.rows
    assert rows.dtype == np.float32
    assert rows.shape == (design_row_count(p, n, pair=True), p) == (n * (p + 3), p)
    assert (
        design.kinds == ["A"] * n + ["B"] * n + ["C1"] * n + ["C2"] * n + ["C3"] * n + ["C13"] * n
    )
    assert design.pair == (0, 2)
    assert np.all((rows >= 0.0) & (rows < 1.0))
    a, b = rows[:n], rows[n : 2 * n]
    points = qmc.Sobol(2 * p, scramble=True, seed=5).random(n).astype(np.float32)
    np.testing.assert_array_equal(np.concatenate([a, b], axis=1), points)
    for i in range(p):
        block = rows[(2 + i) * n : (3 + i) * n]
        expected = a.copy()
        expected[:, i] = b[:, i]
        np.testing.assert_array_equal(block, expected)
    pair_block = rows[(2 + p) * n :]
    np.testing.assert_array_equal(pair_block[:, [0, 2]], b[:, [0, 2]])
    np.testing.assert_array_equal(pair_block[:, 1], a[:, 1])


def test_design_without_pair_and_its_determinism():
    first = interaction_design(2, 16, seed=3, pair=None)
    again = interaction_design(2, 16, seed=3, pair=None)
    other = interaction_design(2, 16, seed=4, pair=None)
    assert first.rows.shape == (16 * 4, 2) and first.pair is None
    assert first.kinds[-1] == "C2"
    np.testing.assert_array_equal(first.rows, again.rows)
    assert not np.array_equal(first.rows, other.rows)


def test_pair_kind_is_unambiguous_with_ten_or_more_properties():
    design = interaction_design(12, 2, seed=0, pair=(0, 11))
    assert design.kinds[-1] == "C1_12" and "C12" in design.kinds


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"properties": 1}, "properties must be at least 2"),
        ({"design_size": 48}, "use 32 or 64"),
        ({"design_size": 0}, "design_size must be a power of two"),
        ({"design_size": 1}, "design_size must be a power of two"),
        ({"pair": (1, 1)}, "two different properties"),
        ({"pair": (0, 2)}, "pair index 2 is out of range"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_design_refusals_name_the_parameter(kwargs, message):
    arguments = {"properties": 2, "design_size": 8, "seed": 0, "pair": None} | kwargs
    with pytest.raises(ValueError, match=message):
        interaction_design(**arguments)


def test_nearest_powers_of_two():
    assert nearest_powers_of_two(48) == (32, 64)
    assert nearest_powers_of_two(32) == (32, 32)
    assert nearest_powers_of_two(3) == (2, 4)


# --- estimators on closed forms ---------------------------------------------------------


def test_additive_model_first_equals_total_and_no_interaction():
    _, estimate = _estimate(lambda x: 1.0 * x[:, 0] + 2.0 * x[:, 1])
    truth = (0.2, 0.8)
    for i in range(2):
        for interval in (estimate.first[i], estimate.total[i]):
            assert _inside(interval, truth[i])
            assert interval.value == pytest.approx(truth[i], abs=0.02)
        assert _inside(estimate.interaction[i], 0.0)
    assert _inside(estimate.share, 0.0)
    assert abs(estimate.share.value) < 0.01
    assert not estimate.significant
    assert estimate.warnings == ()
    assert estimate.mean == pytest.approx(1.5, abs=0.01)
    assert estimate.variance == pytest.approx(5 / 12, rel=0.02)


def test_product_first_total_share_and_second_order():
    _, estimate = _estimate(lambda x: x[:, 0] * x[:, 1], pair=(0, 1))
    for i in range(2):
        assert _inside(estimate.first[i], 3 / 7)
        assert _inside(estimate.total[i], 4 / 7)
        assert _inside(estimate.interaction[i], 1 / 7)
        assert estimate.first[i].value == pytest.approx(3 / 7, abs=0.02)
        assert estimate.total[i].value == pytest.approx(4 / 7, abs=0.02)
    assert _inside(estimate.share, 2 / 7)
    assert estimate.share.value == pytest.approx(2 / 7, abs=0.02)
    assert estimate.significant
    assert estimate.second_order is not None
    assert _inside(estimate.second_order, 1 / 7)
    assert estimate.second_order.value == pytest.approx(1 / 7, abs=0.02)


def test_intervals_cover_the_truth_for_most_seeds_and_additive_is_never_significant():
    covered, seeds = 0, 20
    for seed in range(seeds):
        _, product = _estimate(lambda x: x[:, 0] * x[:, 1], n=64, seed=seed, bootstrap=300)
        covered += all(
            [_inside(product.first[i], 3 / 7) for i in range(2)]
            + [_inside(product.total[i], 4 / 7) for i in range(2)]
            + [_inside(product.share, 2 / 7)]
        )
        _, additive = _estimate(lambda x: x[:, 0] + 2.0 * x[:, 1], n=64, seed=seed, bootstrap=300)
        assert not additive.significant
    assert covered >= 0.9 * seeds


def test_ishigami_indices_and_the_closed_second_order_pair():
    first, total, s13 = _ishigami_truth()
    _, estimate = _estimate(_ishigami, properties=3, pair=(0, 2))
    for i in range(3):
        assert _inside(estimate.first[i], first[i])
        assert _inside(estimate.total[i], total[i])
        assert estimate.first[i].value == pytest.approx(first[i], abs=0.05)
        assert estimate.total[i].value == pytest.approx(total[i], abs=0.05)
    assert _inside(estimate.second_order, s13)
    assert estimate.second_order.value == pytest.approx(s13, abs=0.05)
    assert estimate.significant


def test_indices_do_not_depend_on_the_scores_offset_or_scale():
    design = interaction_design(2, 32, seed=1, pair=(0, 1))
    x = design.rows.astype(np.float64)
    base = estimate_indices(design, x[:, 0] * x[:, 1], 200, 0.9, seed=1)
    shifted = estimate_indices(design, 3.0 * x[:, 0] * x[:, 1] - 5.0, 200, 0.9, seed=1)
    for name in ("first", "total", "interaction"):
        for ours, theirs in zip(getattr(base, name), getattr(shifted, name), strict=True):
            assert (ours.value, ours.low, ours.high) == pytest.approx(
                (theirs.value, theirs.low, theirs.high), abs=1e-9
            )
    assert base.second_order.value == pytest.approx(shifted.second_order.value, abs=1e-9)
    assert base.share.value == pytest.approx(shifted.share.value, abs=1e-9)


def test_bootstrap_is_deterministic_for_a_seed():
    design = interaction_design(2, 64, seed=7, pair=None)
    scores = design.rows[:, 0] * design.rows[:, 1]
    first = estimate_indices(design, scores, 500, 0.95, seed=7)
    again = estimate_indices(design, scores, 500, 0.95, seed=7)
    other = estimate_indices(design, scores, 500, 0.95, seed=8)
    assert first == again
    assert other.first[0].value == first.first[0].value
    assert (other.first[0].low, other.first[0].high) != (first.first[0].low, first.first[0].high)


def test_a_higher_confidence_widens_the_intervals():
    design = interaction_design(2, 64, seed=2, pair=None)
    scores = design.rows[:, 0] * design.rows[:, 1]
    narrow = estimate_indices(design, scores, 500, 0.5, seed=2).total[0]
    wide = estimate_indices(design, scores, 500, 0.99, seed=2).total[0]
    assert wide.low < narrow.low < narrow.high < wide.high


@pytest.mark.parametrize("moving_rows", [False, True])
def test_zero_variance_gives_zeros_and_a_warning(moving_rows):
    design = interaction_design(3, 16, seed=0, pair=(0, 1))
    scores = np.full(len(design.rows), 0.7)
    if moving_rows:
        # Only C rows move: A and B see a constant score, so V over A and B is 0.
        scores[2 * 16 :] = np.linspace(0.0, 1.0, len(scores) - 32)
    estimate = estimate_indices(design, scores, 100, 0.95, seed=0)
    intervals = [*estimate.first, *estimate.total, *estimate.interaction]
    intervals += [estimate.share, estimate.second_order]
    assert all((iv.value, iv.low, iv.high) == (0.0, 0.0, 0.0) for iv in intervals)
    assert not estimate.significant
    assert estimate.variance == 0.0 and estimate.mean == pytest.approx(0.7)
    assert (
        len(estimate.warnings) == 1 and "no property moves the prediction" in estimate.warnings[0]
    )


def test_a_resample_without_variance_counts_as_zero_not_nan():
    design = interaction_design(2, 2, seed=0, pair=None)
    scores = np.zeros(len(design.rows))
    scores[0] = 1.0  # A's first row only: resamples that miss it see V = 0
    estimate = estimate_indices(design, scores, 200, 0.95, seed=0)
    values = [
        v for iv in (*estimate.first, *estimate.total, estimate.share) for v in (iv.low, iv.high)
    ]
    assert np.all(np.isfinite(values))
    assert estimate.first[0].low == 0.0


@pytest.mark.parametrize(
    ("scores", "bootstrap", "confidence", "seed", "message"),
    [
        (np.zeros(5), 10, 0.95, 0, r"one value per design row \(32\), got 5"),
        (np.r_[np.nan, np.zeros(31)], 10, 0.95, 0, "scores must be finite"),
        (np.zeros(32), 0, 0.95, 0, "bootstrap must be >= 1"),
        (np.zeros(32), 10, 1.0, 0, r"confidence must be in \(0, 1\)"),
        (np.zeros(32), 10, 0.95, -1, "seed must be >= 0"),
    ],
)
def test_estimate_refusals_name_the_parameter(scores, bootstrap, confidence, seed, message):
    design = interaction_design(2, 8, seed=0, pair=None)
    with pytest.raises(ValueError, match=message):
        estimate_indices(design, scores, bootstrap, confidence, seed=seed)


# --- composition schedule ---------------------------------------------------------------


def _compose(schedule, rows):
    """Executes a schedule with an 'editor' that records (property, strength): the image
    of every prefix, as the gateway would build it (0 is the identity)."""
    images: dict[tuple[float, ...], tuple] = {(): ()}
    for stage in schedule:
        k = stage.property
        for call in stage.calls:
            source = images[call.prefix]  # produced by an earlier stage
            for strength in call.strengths:
                images[(*call.prefix, strength)] = (*source, (k, strength))
        for row in rows:
            if row[k] == 0.0:
                prefix = tuple(float(s) for s in row[:k])
                images[(*prefix, 0.0)] = images[prefix]
    return images


def _check_composes(rows):
    schedule = edit_schedule(rows)
    images = _compose(schedule, rows)
    for row in rows:
        expected = tuple((k, float(s)) for k, s in enumerate(row) if s != 0.0)
        assert images[tuple(float(s) for s in row)] == expected
    return schedule


@pytest.mark.parametrize("properties", [2, 3, 4])
def test_schedule_shares_prefixes(properties):
    n = 8
    design = interaction_design(properties, n, seed=0, pair=None)
    schedule = _check_composes(design.rows)
    # Stages 0-based. Stage 0: one call on the input image for A's and B's strengths.
    # Stage k: one call per prefix of A, B and C_0..C_{k-1} (C_0's equals B's at k = 1),
    # each for its own strength plus, on A's prefixes, C_k's strength from B.
    calls = [1, 2 * n] + [n * (k + 2) for k in range(2, properties)]
    assert [s.editor_calls for s in schedule] == calls[:properties]
    assert [s.edits for s in schedule] == [2 * n] + [n * (k + 3) for k in range(1, properties)]
    assert sum(s.edits for s in schedule) < len(design.rows) * properties
    assert all(
        call.strengths == tuple(sorted(call.strengths)) for s in schedule for call in s.calls
    )


def test_schedule_with_a_pair_adds_only_the_edits_it_does_not_share():
    n = 8
    plain = edit_schedule(interaction_design(3, n, seed=0, pair=None).rows)
    # C_13 shares A's prefix at stage 1 (its strength is C_1's) and C_1's prefix at
    # stage 2 (same strength); only its third strength (B's) is new.
    paired = _check_composes(interaction_design(3, n, seed=0, pair=(0, 2)).rows)
    assert [s.editor_calls for s in paired] == [s.editor_calls for s in plain]
    assert [s.edits for s in paired] == [plain[0].edits, plain[1].edits, plain[2].edits + n]
    # C_12 of two properties is B itself: no edit at all.
    two = interaction_design(2, n, seed=0, pair=(0, 1))
    np.testing.assert_array_equal(two.rows[4 * n :], two.rows[n : 2 * n])
    assert [s.edits for s in edit_schedule(two.rows)] == [2 * n, 4 * n]


def test_schedule_treats_strength_zero_as_the_identity():
    rows = np.array([[0.0, 0.5], [0.0, 0.25], [0.3, 0.5], [0.0, 0.0]], dtype=np.float32)
    schedule = _check_composes(rows)
    assert schedule[0].calls == (EditCall(prefix=(), strengths=(np.float32(0.3).item(),)),)
    assert schedule[1].calls == (
        EditCall(prefix=(0.0,), strengths=(0.25, 0.5)),
        EditCall(prefix=(np.float32(0.3).item(),), strengths=(0.5,)),
    )


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (np.zeros(4), r"shape \[rows, properties\]"),
        (np.array([[0.5, 1.5]]), r"strengths in \[0, 1\]"),
    ],
)
def test_schedule_refusals(rows, message):
    with pytest.raises(ValueError, match=message):
        edit_schedule(rows)


def test_design_dataclass_reports_its_properties():
    design = interaction_design(4, 2, seed=0, pair=None)
    assert isinstance(design, Design) and design.properties == 4


# --- warnings: a negligible variance, wide intervals ------------------------------------


def test_a_score_that_barely_moves_keeps_its_indices_with_a_warning():
    # A saturated probability: the hue moves it by ~1e-4 (V ~ 1e-9, above the 1e-12 floor).
    design = interaction_design(2, 64, seed=0, pair=None)
    scores = 0.9999 + 1e-4 * design.rows[:, 0] + 1e-6 * design.rows[:, 1]
    estimate = estimate_indices(design, scores, 200, 0.95, seed=0, names=("hue", "patch"))
    assert estimate.total[0].value > 0.9  # kept as computed
    negligible = [w for w in estimate.warnings if "barely moves" in w]
    assert len(negligible) == 1
    assert f"variance {estimate.variance:.3g}" in negligible[0]
    assert "read `variance` first" in negligible[0]
    assert estimate.negligible_variance and not estimate.significant
    # No design advice: the score's noise, not the design size, spreads its intervals.
    assert len(estimate.warnings) == 1
    # The same shape scaled to a probability that moves: no such warning.
    moving = estimate_indices(design, 0.5 + 0.4 * design.rows[:, 0], 200, 0.95, seed=0)
    assert not any("barely moves" in w for w in moving.warnings)


def test_a_flat_score_is_never_significant():
    # x1 x2 scaled into a probability's ninth decimal: the same indices (they are scale
    # invariant) and the same share interval above 0, but the score barely moves.
    design = interaction_design(2, 1024, seed=0, pair=None)
    rows = design.rows.astype(np.float64)
    moving = estimate_indices(design, rows[:, 0] * rows[:, 1], 500, 0.95, seed=0)
    flat = estimate_indices(design, 0.9 + 1e-4 * rows[:, 0] * rows[:, 1], 500, 0.95, seed=0)
    assert moving.significant and not moving.negligible_variance
    assert flat.share.low > 0.0 and flat.share.value == pytest.approx(moving.share.value)
    assert flat.negligible_variance and not flat.significant
    (warning,) = flat.warnings
    assert "barely moves" in warning and "interaction_significant is false" in warning
    # Below the 1e-12 floor too.
    zero = estimate_indices(design, np.full(len(design.rows), 0.3), 100, 0.95, seed=0)
    assert zero.negligible_variance and not zero.significant


def _corner(x):
    """A conjunction on a small corner of the square."""
    return ((x[:, 0] > 0.8) & (x[:, 1] > 0.8)).astype(np.float64)


def test_an_undecided_wide_share_interval_names_a_design_size_that_narrows_it():
    # At N 16 the corner's share interval is wide and reaches 0.
    design = interaction_design(2, 16, seed=3, pair=None)
    estimate = estimate_indices(
        design, _corner(design.rows), 500, 0.95, seed=3, names=("hue", "patch")
    )
    share = estimate.share
    assert share.high - share.low > 0.5 and share.low <= 0.0 <= share.high
    wide = [w for w in estimate.warnings if "wider than 0.5" in w]
    assert wide == [
        f"the interaction share's interval [{share.low:.3g}, {share.high:.3g}] is wider than "
        "0.5 and reaches 0: it cannot decide whether the properties interact; "
        "a design_size of 64 (now 16) narrows it"
    ]
    capped = estimate_indices(design, _corner(design.rows), 500, 0.95, seed=3, max_design_size=32)
    assert any("a design_size of 32 (now 16)" in w for w in capped.warnings)
    at_max = estimate_indices(design, _corner(design.rows), 500, 0.95, seed=3, max_design_size=16)
    assert any("the largest allowed: more scenes narrow it" in w for w in at_max.warnings)
    # Narrow intervals (N 1024 on a smooth product) warn about nothing.
    _, narrow = _estimate(lambda x: x[:, 0] * x[:, 1])
    assert narrow.warnings == ()


def test_wide_intervals_that_decide_are_not_warned_about():
    # A hue-like model at N 32: its first and total order intervals are wider than 0.5,
    # but the share's is narrow around 0 (decided: no interaction worth the name).
    design = interaction_design(2, 32, seed=0, pair=None)
    rows = design.rows.astype(np.float64)
    hue = estimate_indices(
        design, np.cos(np.pi * rows[:, 0]) ** 2 + 0.02 * rows[:, 1], 1000, 0.95, seed=0
    )
    assert hue.first[0].high - hue.first[0].low > 0.5
    assert hue.share.high - hue.share.low < 0.5
    # A smooth AND at N 32: the share's interval is wider than 0.5 but lies above 0.
    conjunction = estimate_indices(
        design,
        1.0 / (1.0 + np.exp(-20.0 * (np.minimum(rows[:, 0], rows[:, 1]) - 0.5))),
        1000,
        0.95,
        seed=0,
    )
    assert conjunction.share.high - conjunction.share.low > 0.5 and conjunction.significant
    for estimate in (hue, conjunction):
        assert not any("wider than" in w for w in estimate.warnings)


def test_a_point_estimate_on_or_outside_its_interval_says_the_bootstrap_is_unreliable():
    # At N 8 one row carries the corner's whole variance: the share is 1.75, and every
    # resample either repeats that row's weight or drops it, so 1.75 is the interval's top.
    design = interaction_design(2, 8, seed=7, pair=None)
    estimate = estimate_indices(
        design, _corner(design.rows), 1000, 0.95, seed=7, names=("hue", "patch")
    )
    share = estimate.share
    assert share.value == pytest.approx(share.high)
    unreliable = [w for w in estimate.warnings if "unreliable" in w]
    (warning,) = unreliable
    assert f"interaction share {share.value:.3g} [{share.low:.3g}, {share.high:.3g}]" in warning
    assert "the bootstrap is unreliable at this design_size (8); raise design_size (e.g. 32)" in (
        warning
    )
    at_max = estimate_indices(design, _corner(design.rows), 1000, 0.95, seed=7, max_design_size=8)
    assert any("design_size 8 is the largest allowed" in w for w in at_max.warnings)
    # The same corner at N 1024: every point inside its interval.
    _, fine = _estimate(_corner)
    assert not any("unreliable" in w for w in fine.warnings)


def test_a_resample_draws_the_same_rows_in_every_block():
    # Property 2 is inert: f_C2 equals f_A row by row, so a resample that keeps rows joint
    # across A, B and C gives exactly 0 for its first and total order; resampling the
    # blocks independently would not.
    design = interaction_design(2, 16, 5, None)
    estimate = estimate_indices(design, design.rows[:, 0].astype(np.float64) ** 2, 500, 0.95, 2)
    assert (estimate.first[1].value, estimate.first[1].low, estimate.first[1].high) == (0, 0, 0)
    assert (estimate.total[1].value, estimate.total[1].low, estimate.total[1].high) == (0, 0, 0)
    assert estimate.total[0].low > 0.3
