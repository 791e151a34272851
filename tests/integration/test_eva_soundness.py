"""EVA's verified bounds hold against perturbations drawn in the ball, through the real
stack: the map from the gateway (SDK), the points evaluated by direct Triton calls to the
same model (300 uniform points, 100 box vertices and a 10-step PGD attack on the margin,
every region perturbed, then two regions held fixed against their own bounds), and the same
sampler exceeds a hybrid's bound, which is not a guarantee. The full
count (10^4 uniform points per model and eps) runs in `make validate`
(bench/validate_eva.py)."""

from __future__ import annotations

import numpy as np
import pytest

from propscope_dev.validation import eva

EPSILON = 8 / 255


@pytest.mark.parametrize("model", ["synth_patch", "synth_hue_fp32"])
def test_no_point_of_the_ball_exceeds_the_verified_bound(client, triton, model):
    found = eva.soundness(client, triton, model, EPSILON, eva.TEST, modes=[("crown", "")])
    everywhere, regions = found.all_perturbed["crown"], found.regions["crown"]
    assert everywhere.points == eva.TEST.random + eva.TEST.vertices + eva.TEST.pgd_starts * (
        eva.TEST.pgd_steps + 1
    )
    assert regions.points > 0
    assert everywhere.violations == 0, (everywhere.by_source, everywhere.largest_excess)
    assert regions.violations == 0, (regions.by_source, regions.largest_excess)
    # The sampler is not idle: the attack moved the overlap off the centre's.
    assert everywhere.best[0] > found.centre_overlaps[0]
    assert np.isfinite(found.bounds["crown"][0])


def test_the_same_sampler_finds_points_above_a_hybrid_bound(client, triton):
    """The check has teeth: a hybrid from the last layer with 16 samples per row (a sampled
    box, not a guarantee) is exceeded by the attack's points."""
    found = eva.soundness(
        client,
        triton,
        "synth_patch",
        EPSILON,
        eva.TEST,
        modes=[("crown", "features.2")],
        samples=16,
    )
    mode = eva.mode_name("crown", "features.2")
    exceeded = found.all_perturbed[mode].violations + found.regions[mode].violations
    assert exceeded > 0
