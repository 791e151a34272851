"""A small `make validate` through the real stack: the paper's two tables and the
test's calibration on a few images, asserting the qualitative pattern."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from propscope_dev.validation import bias_table, downstream, honesty
from propscope_dev.validation.runner import (
    SHORTCUTS,
    TEST_SET_SEED,
    explain_all,
    held_out_images,
    select,
)

FAST_METHODS = ["Grad-CAM", "Integrated Gradients", "DeepLift", "Occlusion"]


@pytest.fixture(scope="module")
def bias_runs(client):
    images, _ = held_out_images(3)
    return explain_all(client, images, SHORTCUTS, steps=50)


def test_bias_table_shows_the_pattern(bias_runs):
    table = bias_table.cells(bias_runs, list(SHORTCUTS))
    assert len(table) == 3 * 4 and all(cell.images == 6 for cell in table)
    failed = [c for c in bias_table.expected_pattern(table) if not c.passed]
    assert not failed, failed


def test_relevance_separates_where_significance_does_not(bias_runs):
    background = [r for r in bias_runs if r.property_name == "background_brightness"]
    # The paper's finding: tiny, orderly background effects are mostly significant ...
    assert np.mean([r.significant for r in background]) > 0.5
    assert max(r.probability_change for r in background) < 0.01
    # ... and the effect size keeps them from being called relevant.
    assert not any(r.relevant for r in background)
    for model, shortcut in SHORTCUTS.items():
        if shortcut is not None:
            assert all(r.relevant for r in select(bias_runs, model, shortcut))


def test_statistics_beside_the_score(bias_runs):
    (hue,) = [r for r in select(bias_runs, "synth_hue", "object_hue") if r.image_index == 0]
    assert hue.pearson_correlation is not None and abs(hue.pearson_correlation) > 0.5
    assert hue.mutual_information is not None and hue.mutual_information > 0.1
    assert hue.score_per_unit_strength == pytest.approx(hue.score * 50)


def test_adaptive_paths_decide_the_shortcuts_as_fixed_paths_do_for_fewer_edits(client, bias_runs):
    images, _ = held_out_images(3)
    adaptive = explain_all(client, images, SHORTCUTS, steps=10, path_mode="adaptive")
    assert {r.steps for r in adaptive} <= {10, 20, 40, 80}
    assert all(r.edits == 10 * (2 * r.steps // 10 - 1) for r in adaptive)
    summary = bias_table.summarise(bias_runs, adaptive)
    assert summary.relevant_agreement == 1.0 and summary.edit_ratio >= 2.0, summary
    failed = [
        c
        for c in bias_table.expected_pattern(bias_table.cells(adaptive, list(SHORTCUTS)))
        if not c.passed
    ]
    assert not failed, failed


def test_ours_predicts_output_changes_at_least_as_well_as_saliency(client):
    calibration_images, _ = held_out_images(1, TEST_SET_SEED + 300)
    images, _ = held_out_images(4, TEST_SET_SEED + 1)
    models = ["synth_hue", "synth_patch"]
    for model in models:
        ranges = downstream.size_ranges(downstream.calibrate(client, calibration_images, model))
        assert any(r.included for r in ranges.values())
        interventions = downstream.random_interventions(len(images), 0, ranges)
        runs = explain_all(
            client,
            images,
            [model],
            interventions.__getitem__,
            keep_last_image=True,
            no_op_unchanged=True,
        )
        result = downstream.predictor_accuracies(runs, images, model, FAST_METHODS)
        assert result.max_probability_gap < 1e-5  # the baselines explain the served model
        assert 0 < result.positive_rate < 1  # a real task, not a constant label
        ours = result.by_predictor[downstream.OURS]
        assert ours >= 0.9 and ours >= max(result.by_predictor[m] for m in FAST_METHODS)


def test_p_values_are_calibrated_under_an_exchangeable_null(client):
    images, _ = held_out_images(2, TEST_SET_SEED + 100)
    p_values = honesty.exchangeable_p_values(client, images, paths=200, steps=10, seed=1)
    result = honesty.calibration(p_values, steps=10)
    assert result.false_positive_rate <= 0.02
    assert result.ks_p_value > 0.01, result


def test_adaptive_paths_under_an_exchangeable_null(client):
    """The tied flavour of calibration_noise: curves of few values, which adaptive
    paths extend; every request completes with a p-value or as a no-op."""
    images, _ = held_out_images(2, TEST_SET_SEED + 100)
    runs = honesty.noise_null_runs(client, images, 20, "tied", seed=31_000)
    scored = [r for r in runs if r.p_value is not None]
    assert len(scored) >= 10
    assert all(0 < r.p_value <= 1 for r in scored)
    assert {r.steps for r in runs} <= {10, 20, 40, 80}
    assert max(r.steps for r in scored) > 10  # the rule really extends
    assert all(r.edits == 10 * (2 * r.steps // 10 - 1) for r in scored)
    continuous = honesty.noise_null_runs(client, images, 10, "continuous", seed=32_000)
    assert all(r.p_value is not None and 0 < r.p_value <= 1 for r in continuous)


def test_an_invisible_edit_is_never_significant(client):
    images, _ = held_out_images(3, TEST_SET_SEED + 100)
    runs = honesty.invariant_runs(client, images, steps=10)
    assert len(runs) == 12
    assert all(np.ptp(r.curve) == 0.0 and not r.significant and r.p_value == 1.0 for r in runs)


def test_cold_and_warm_cache_give_bit_identical_results(client):
    image = held_out_images(1, TEST_SET_SEED + 200)[0][0]
    properties = [
        "hue=procedural:operation=hue,region=object",
        "patch=procedural:operation=blend,position=random",
        "ip2p=ip2p:instruction=make it red",
    ]
    cold, warm = honesty.cold_and_warm(
        client, image, "synth_hue", properties, steps=5, samples=2, seed=424242
    )
    assert sum(r.cache_misses for r in cold) == 6 and sum(r.cache_hits for r in warm) == 6
    for first, second in zip(cold, warm, strict=True):
        assert honesty.comparable(first) == honesty.comparable(second)


def test_the_length_independent_score_holds_across_path_lengths(client):
    images, _ = held_out_images(1)
    runs = {
        steps: select(
            explain_all(client, images, ["synth_hue"], steps=steps),
            "synth_hue",
            "object_hue",
        )
        for steps in (10, 50)
    }
    for short, long in zip(runs[10], runs[50], strict=True):
        assert short.score / long.score == pytest.approx(5, rel=0.25)
        assert long.score_per_unit_strength == pytest.approx(
            short.score_per_unit_strength, rel=0.25
        )


@pytest.mark.parametrize(("minimum", "expected"), [(None, True), (0.0, True), (1.0, False)])
def test_the_minimal_relevant_change_is_per_request(client, minimum, expected):
    image = held_out_images(1)[0][0]
    events = list(
        client.explain(
            image,
            "synth_hue",
            ["hue=procedural:operation=hue,region=object"],
            steps=10,
            min_probability_change=minimum,
        )
    )
    accepted, result = events[0], events[-2]
    assert accepted.min_probability_change == (0.05 if minimum is None else minimum)
    assert result.significant and result.probability_change > 0.9
    assert result.relevant is expected


def test_the_attribution_table_on_a_few_images(live_stack, tmp_path):
    """bench/validate_attribution.py --quick (3 images) against the test stack."""
    script = Path(__file__).resolve().parents[2] / "bench" / "validate_attribution.py"
    command = [sys.executable, str(script), "--quick", "--target", live_stack.gateway]
    command += ["--redis-url", live_stack.redis_url, "--out", str(tmp_path)]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=900)
    data = json.loads((tmp_path / "attribution.json").read_text())
    assert "## Checks" in (tmp_path / "attribution.md").read_text()
    # The exit code says whether every check held, whatever three images gave.
    assert finished.returncode == (0 if all(c["passed"] for c in data["checks"]) else 1), (
        finished.stderr[-2000:]
    )
    truth = data["ground_truth"]["ground_truth"]
    assert truth["exact_zero_images"] == truth["images"] == 3 and truth["largest_unseen"] == 0
    assert truth["forward_passes"] == [2112] * 3
    (mean_colour,) = [
        row
        for row in data["localisation"]["localisation"]
        if (row["baseline"], row["target_score"]) == ("mean_colour", "probability")
    ]
    shares = {m["model"]: m["shares"] for m in mean_colour["models"]}
    assert min(shares["synth_patch"]) >= 0.5
    assert np.mean(shares["synth_patch"]) > np.mean(shares["synth_unbiased"])
    assert data["comparison"]["passes"] == {"Sobol (grid 8, N 32)": 2112, "RISE (2048 masks)": 2048}
    comparisons = data["comparison"]["comparisons"]
    assert sorted(comparisons) == ["10", "100"]
    assert all(0 < c["p_value"] <= 1 for found in comparisons.values() for c in found)
    metrics = data["metrics"]
    assert min(metrics["oracle"]["mu_fidelity"]) >= 0.9
    deletions = zip(metrics["oracle"]["deletion"], metrics["random"]["deletion"], strict=True)
    assert all(oracle < random for oracle, random in deletions)
    assert max(metrics["constant"]["mu_fidelity"]) < min(metrics["oracle"]["mu_fidelity"]) - 0.5
    determinism = data["determinism"]["determinism"]
    assert determinism["cold_passes"] == determinism["flushed_passes"] == 2112
    assert determinism["warm_cache_hit"]
    assert determinism["identical_warm"] and determinism["identical_flushed"]
