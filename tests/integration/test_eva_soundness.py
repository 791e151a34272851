"""EVA's verified bounds hold against perturbations drawn in the ball, through the real
stack: the map from the gateway (SDK), the points evaluated by direct Triton calls to the
same model (300 uniform points, 100 box vertices and a 10-step PGD attack on the margin,
every region perturbed, then two regions held fixed against their own bounds), and the
model's own attack (the sampled overlap) reaches what the sampler reaches. The full
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


def test_the_model_attack_holds_up_against_the_sampler_and_the_check_has_teeth(client, triton):
    """A hybrid from the last layer with 16 samples per row: its box now holds the model's
    own PGD iterates, and the same sampler no longer exceeds it (before the attack it did,
    90 of 832 points). The check still has teeth: against the centre's own overlap (the
    old uniform sampled overlap, a 'bound' any stronger point breaks) it counts the points
    above; and the model's attack gets as far as the sampler's."""
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
    everywhere = found.all_perturbed[mode]
    too_low = eva.Tally()
    too_low.add({"best": np.array(everywhere.best)}, found.centre_overlaps[0])
    assert too_low.violations > 0
    assert found.service_sampled[0] > found.centre_overlaps[0]
    assert found.service_sampled[0] <= found.bounds[mode][0]
    assert found.service_sampled[0] >= everywhere.best[0] - 1.0
