"""A finished MACO picture says what it failed to reach (methods/maco.outcome_warnings)."""

from __future__ import annotations

import numpy as np

from propscope_server.methods.maco import outcome_warnings
from propscope_server.scoring import maco

SETTINGS = maco.Settings()


def test_a_reached_class_with_a_rising_objective_has_no_warning():
    assert outcome_warnings(1, -7.5, 2.1, np.array([0.004, 0.996]), SETTINGS) == []


def test_a_class_picture_classified_as_another_class_says_so_and_names_the_fix():
    (warning,) = outcome_warnings(1, -7.5, -1.3, np.array([0.75, 0.25]), SETTINGS)
    assert "classified as class 0 (p = 0.75), not class 1 (p = 0.25)" in warning
    assert f"{SETTINGS.box_start:g} -> {SETTINGS.box_end:g}" in warning
    assert "box_start 1.0, box_end 0.5" in warning


def test_an_objective_that_did_not_rise_says_so_for_any_objective():
    (warning,) = outcome_warnings(None, 3.0, 2.5, np.array([0.5, 0.5]), SETTINGS)
    assert "did not rise (3 -> 2.5)" in warning
