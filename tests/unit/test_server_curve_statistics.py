"""The paper code's other statistics and the relevance decision."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from propscope_server.scoring.curve_statistics import (
    ksg_mutual_information,
    mean_defined,
    mutual_information,
    pearson_correlation,
)
from propscope_server.scoring.property_gradient import score_property


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_ksg_matches_the_gaussian_closed_form(rho):
    # For a bivariate normal with correlation rho, I(x; y) = -log(1 - rho^2) / 2.
    rng = np.random.default_rng(7)
    x, noise = rng.standard_normal((2, 3000))
    y = rho * x + np.sqrt(1 - rho**2) * noise
    expected = -0.5 * np.log(1 - rho**2)
    assert ksg_mutual_information(x, y) == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize("points", [11, 51, 400])
def test_ksg_agrees_with_scikit_learn(points):
    from sklearn.feature_selection import mutual_info_regression

    rng = np.random.default_rng(points)
    x = np.linspace(0, 1, points)
    y = np.sin(3 * x) + 0.3 * rng.standard_normal(points)
    expected = mutual_info_regression(x[:, None], y, n_neighbors=5, random_state=0)[0]
    assert ksg_mutual_information(x, y) == pytest.approx(expected, abs=1e-9)


def test_ksg_is_invariant_to_monotone_rescaling():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(500)
    y = x + 0.5 * rng.standard_normal(500)
    assert ksg_mutual_information(x, np.exp(y)) == pytest.approx(
        ksg_mutual_information(x, y), abs=0.08
    )


def test_ksg_does_not_depend_on_where_the_curve_sits():
    # A tiny, orderly curve near p = 1 carries as much information as the same curve near 0.
    curve = 1e-6 * np.sin(np.linspace(0, 3, 51))
    assert mutual_information(1 - 1e-5 + curve) == pytest.approx(
        mutual_information(curve), abs=1e-6
    )


def test_mutual_information_of_curves():
    steps = np.linspace(0, 1, 51)
    assert mutual_information(np.full(51, 0.3)) == 0.0
    assert mutual_information(np.linspace(0, 1, 5)) is None  # 5 points, k = 5
    # A non-monotone function of t still carries information; noise does not.
    assert mutual_information(np.sin(2 * np.pi * steps)) > 1.0
    noise = np.random.default_rng(0).random(51)
    assert mutual_information(noise) < 0.2


def test_pearson_correlation():
    assert pearson_correlation(np.linspace(0.2, 0.8, 11)) == pytest.approx(1.0)
    assert pearson_correlation(np.linspace(0.8, 0.2, 11)) == pytest.approx(-1.0)
    assert pearson_correlation(np.full(11, 0.4)) is None
    assert abs(pearson_correlation(np.sin(np.linspace(0, 2 * np.pi, 101)))) < 0.9


def test_a_curve_moving_only_by_rounding_warns_nothing_into_the_gateway_log():
    curve = np.full(21, 0.9999999)
    curve[5] += 8e-16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pearson_correlation(curve)
    assert r is not None and -1.0 <= r <= 1.0


def test_mean_defined_skips_undefined_values():
    assert mean_defined([None, 0.5, 1.0]) == 0.75
    assert mean_defined([None, None]) is None


def _score(curves, min_probability_change=0.05, alpha=0.01):
    curves = np.atleast_2d(curves)
    classes = (curves < 0.5).astype(int)
    return score_property(curves, classes, 2000, alpha, 0, min_probability_change)


def test_a_tiny_orderly_change_is_significant_but_not_relevant():
    # The paper's background case: p moves by 1e-5 in small, orderly steps.
    tiny = _score(0.9 + 1e-5 * np.linspace(0, 1, 11) ** 2)
    assert tiny.significant and not tiny.relevant
    assert tiny.probability_change == pytest.approx(1e-5)
    # With no minimal change, relevant is significant.
    assert _score(0.9 + 1e-5 * np.linspace(0, 1, 11) ** 2, 0.0).relevant


def test_a_large_orderly_change_is_relevant():
    big = _score(np.linspace(0.95, 0.05, 11))
    assert big.significant and big.relevant
    assert big.probability_change == pytest.approx(0.9)
    assert big.pearson_correlation == pytest.approx(-1.0)
    assert big.mutual_information > 0.5


def test_a_large_disorderly_change_is_not_relevant():
    # Big jumps in random order: a large effect the test cannot tie to the strength.
    curve = np.random.default_rng(4).permutation(np.linspace(0.1, 0.9, 11))
    jumpy = _score(curve)
    assert jumpy.probability_change == pytest.approx(0.8)
    assert not jumpy.significant and not jumpy.relevant


def test_probability_change_averages_over_samples():
    curves = np.stack([np.linspace(0.9, 0.5, 11), np.linspace(0.9, 0.7, 11)])
    assert _score(curves).probability_change == pytest.approx(0.3)
