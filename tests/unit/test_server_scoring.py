"""E|dp| and its permutation test, against hand-computed values and the null distribution."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from propscope_server.scoring import property_gradient as pg
from propscope_server.scoring.property_gradient import (
    gradient_magnitude,
    permutation_p_values,
    score_property,
)


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 37])
def test_linear_curve_scores_one_over_n(steps):
    assert gradient_magnitude(np.linspace(0.0, 1.0, steps + 1)) == pytest.approx(1.0 / steps)


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        # np.gradient: edges one-sided, interior central: [0, 0, .5, .5, 0, 0]
        ([0, 0, 0, 1, 1, 1], (0.5 + 0.5) / 6),
        ([0.3] * 7, 0.0),
        # [0.2, 0.1, -0.3, -0.6] -> mean |.| = 1.2 / 4
        ([0.0, 0.2, 0.2, -0.4], 1.2 / 4),
    ],
)
def test_gradient_magnitude_by_hand(curve, expected):
    assert gradient_magnitude(np.array(curve, dtype=float)) == pytest.approx(expected, abs=1e-15)


def test_gradient_magnitude_is_per_row():
    curves = np.array([np.linspace(0, 1, 11), np.zeros(11), np.linspace(1, 0, 11)])
    np.testing.assert_allclose(gradient_magnitude(curves), [0.1, 0.0, 0.1])


def test_constant_curve_has_p_value_one():
    per_curve, of_mean = permutation_p_values(np.full(11, 0.7), 1000, np.random.default_rng(0))
    assert per_curve.tolist() == [1.0]
    assert of_mean == 1.0
    score = score_property(np.full((2, 11), 0.7), np.zeros((2, 11), int), 1000, 0.01, seed=0)
    assert score.p_value == 1.0 and not score.significant


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_curve_p_value_is_one_over_k_plus_one(seed):
    k = 10_000
    per_curve, of_mean = permutation_p_values(np.linspace(0, 1, 11), k, np.random.default_rng(seed))
    assert per_curve.tolist() == [1.0 / (k + 1)]
    assert of_mean == 1.0 / (k + 1) > 0.0


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        # Orders of (.1, .2, .7) score 0.9/3 (sorted, either way), 0.95/3 and 1.15/3, each with
        # probability 1/3; centre 1/3: 0.3 and 1.15/3 are at least as far as the observed 0.3.
        ([0.1, 0.2, 0.7], 2 / 3),
        # Orders of (0, .7, .9) score 1.7/3 (this one and its reverse, which float arithmetic
        # puts 1 ulp lower), 1.35/3 and 1.45/3; centre 0.5: only the reverse ties the observed.
        ([0.7, 0.0, 0.9], 1 / 3),
    ],
)
def test_ties_with_the_observed_score_count_as_extreme(curve, expected):
    per_curve, _ = permutation_p_values(np.array(curve), 3000, np.random.default_rng(0))
    assert per_curve[0] == pytest.approx(expected, abs=0.03)


def test_noise_curves_are_rarely_significant():
    rng = np.random.default_rng(123)
    significant = [
        score_property(rng.random((1, 11)), np.zeros((1, 11), int), 1000, 0.01, seed).significant
        for seed in range(20)
    ]
    assert sum(significant) <= 1


def test_null_p_values_are_uniform():
    curves = np.random.default_rng(7).random((300, 11))
    p_values, _ = permutation_p_values(curves, 500, np.random.default_rng(8))
    assert p_values.min() >= 1.0 / 501 and p_values.max() <= 1.0
    assert stats.kstest(p_values, "uniform").pvalue > 0.001
    assert 0.01 <= np.mean(p_values < 0.05) <= 0.10


def test_same_seed_same_result_other_seed_differs():
    curves = np.random.default_rng(3).random((4, 9))
    classes = np.zeros((4, 9), int)
    a, b = (score_property(curves, classes, 500, 0.05, seed=11) for _ in range(2))
    c = score_property(curves, classes, 500, 0.05, seed=12)
    assert a == b
    assert c.sample_p_values != a.sample_p_values


def test_chunking_does_not_change_p_values(monkeypatch):
    curves = np.random.default_rng(1).random((3, 11))
    whole = permutation_p_values(curves, 300, np.random.default_rng(5))
    monkeypatch.setattr(pg, "CHUNK_ELEMENTS", 1)  # one permutation per chunk
    chunked = permutation_p_values(curves, 300, np.random.default_rng(5))
    np.testing.assert_array_equal(whole[0], chunked[0])
    assert whole[1] == chunked[1]


def test_score_property_aggregates_samples():
    steps = 10
    t = np.linspace(0, 1, steps + 1)
    curves = np.array([t, 0.5 * t, 0.2 * t**2, 1 - t])
    classes = np.zeros((4, steps + 1), int)
    classes[0, 6:] = 1  # flips
    classes[1, 3:5] = 1  # flips and comes back
    classes[3, -1] = 2  # flips
    s = score_property(curves, classes, 1000, 0.01, seed=0)
    per_sample = gradient_magnitude(curves)
    np.testing.assert_allclose(s.sample_scores, per_sample)
    assert s.score == pytest.approx(per_sample.mean())
    assert per_sample.min() <= s.ci_low <= s.score <= s.ci_high <= per_sample.max()
    assert s.ci_low < s.ci_high
    assert s.flip_rate == 0.75 and s.prediction_flipped
    assert s.score_per_unit_strength == pytest.approx(s.score * steps)
    assert len(s.sample_p_values) == 4


@pytest.mark.parametrize(("curve", "sign"), [([0.1, 0.3, 0.4, 0.9], 1), ([0.9, 0.5, 0.4, 0.0], -1)])
def test_mean_signed_gradient_direction(curve, sign):
    s = score_property(np.array([curve]), np.zeros((1, 4), int), 100, 0.01, seed=0)
    assert np.sign(s.mean_signed_gradient) == sign
    assert not s.prediction_flipped and s.flip_rate == 0.0


def test_single_sample_interval_is_the_score():
    s = score_property(np.linspace(0, 1, 11), np.zeros(11, int), 1000, 0.01, seed=0)
    assert s.ci_low == s.ci_high == s.score == pytest.approx(0.1)
    assert s.mean_signed_gradient == pytest.approx(0.1)
    assert s.significant


@pytest.mark.parametrize("curves", [[0.5], [[0.5], [0.2]]])
def test_single_point_path_is_refused(curves):
    with pytest.raises(ValueError, match="at least two points"):
        score_property(np.array(curves), np.zeros_like(np.array(curves), dtype=int), 100, 0.01, 0)


def test_identical_samples_do_not_narrow_the_null():
    curve = np.array([0.9, 0.8, 0.85, 0.7, 0.6, 0.65, 0.5, 0.55, 0.4, 0.45, 0.3])
    classes = np.zeros((1, curve.size), int)
    one = score_property(curve[None], classes, 2000, 0.01, seed=3)
    eight = score_property(np.tile(curve, (8, 1)), np.tile(classes, (8, 1)), 2000, 0.01, seed=3)
    assert eight.p_value == one.p_value
    assert eight.sample_p_values == (one.p_value,) * 8
