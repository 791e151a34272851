"""The validation's pure pieces: the calibration probe and the calibration editor,
the adaptive null's summary, the adaptive/fixed agreement, the downstream task's
size calibration and accuracy, the bias table's expected pattern and the Markdown
tables."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from propscope_dev.validation import bias_table, downstream, honesty, saliency
from propscope_dev.validation.runner import PropertyRun, _no_op_run, held_out_images
from propscope_dev.validation.tables import markdown_table, mean_interval
from propscope_server.editor_contract import SCHEMA_PARAMETER, EditorSchema
from propscope_server.triton_models.classifiers.cnn import normalise_uint8_hwc
from propscope_server.triton_models.classifiers.probe import CORNER, CornerProbe
from propscope_server.triton_models.editors import calibration_noise

NOISE_CONFIG = (
    Path(__file__).parents[2]
    / "deploy"
    / "triton"
    / "models"
    / "calibration_noise"
    / "config.pbtxt"
)


def test_probe_sees_only_its_corner():
    images, _ = held_out_images(2, seed=1)
    probe = CornerProbe()
    changed = images.copy()
    changed[:, :-CORNER] = 255 - changed[:, :-CORNER]
    changed[:, :, :-CORNER] = 0
    before, after = (probe(normalise_uint8_hwc(x)) for x in (images, changed))
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    noisy = images.copy()
    noisy[:, -CORNER:, -CORNER:] = np.random.default_rng(0).integers(0, 256, (4, CORNER, CORNER, 3))
    assert not torch.equal(probe(normalise_uint8_hwc(noisy)), before)


def test_test_set_is_balanced_and_patch_free():
    images, labels = held_out_images(5)
    assert images.shape == (10, 64, 64, 3) and sorted(labels.tolist()) == [0] * 5 + [1] * 5
    # The patch's colours never appear in the top-left corner.
    assert (images[:, 3:17, 3:17] == images[:, :1, :1]).all()


@pytest.mark.parametrize(
    ("values", "labels", "expected"),
    [
        ([0.1, 0.2, 0.8, 0.9], [False, False, True, True], 1.0),
        ([0.9, 0.8, 0.2, 0.1], [False, False, True, True], 0.5),  # only "larger is changed"
        ([0.1, 0.5, 0.5, 0.9], [False, True, False, True], 0.75),  # a tie splits nothing
        ([0.3, 0.3, 0.3], [True, True, False], 2 / 3),  # constant predictions count
    ],
)
def test_best_threshold_accuracy(values, labels, expected):
    assert downstream.best_threshold_accuracy(values, labels) == pytest.approx(expected)


def _run(model: str, prop: str, curve, classes=None, score=0.1, significant=True, relevant=True):
    curve = np.asarray(curve, dtype=float)
    return PropertyRun(
        model=model,
        image_index=0,
        property_name=prop,
        score=score,
        score_per_unit_strength=score * (len(curve) - 1),
        p_value=0.001 if significant else 0.5,
        significant=significant,
        relevant=relevant,
        flipped=classes is not None and len(set(classes)) > 1,
        probability_change=float(np.ptp(curve)),
        pearson_correlation=None,
        mutual_information=0.1,
        curve=curve,
        predicted_classes=np.asarray(classes if classes is not None else [0] * len(curve)),
        last_image=None,
    )


def test_output_changed_is_a_flip_or_a_large_move():
    assert downstream.output_changed(_run("m", "p", [0.9, 0.8, 0.4], [0, 0, 1]))
    assert downstream.output_changed(_run("m", "p", [0.9, 0.85, 0.75]))
    assert not downstream.output_changed(_run("m", "p", [0.9, 0.5, 0.85]))


def _runs(shortcut_significant: bool, background_score: float) -> list[PropertyRun]:
    runs = []
    for model, shortcut in (("synth_hue", "object_hue"), ("synth_patch", "patch")):
        runs.append(
            _run(
                model,
                shortcut,
                [0.9, 0.1],
                [0, 1],
                0.09,
                shortcut_significant,
                shortcut_significant,
            )
        )
    for model in ("synth_unbiased", "synth_hue", "synth_patch"):
        runs.append(
            _run(model, "background_brightness", [0.9, 0.9], None, background_score, True, False)
        )
    return runs


def test_expected_pattern_passes_on_the_pattern():
    models = ["synth_unbiased", "synth_hue", "synth_patch"]
    checks = bias_table.expected_pattern(bias_table.cells(_runs(True, 1e-5), models))
    assert len(checks) == 2 * 3 + 3 * 2 and all(c.passed for c in checks)


def test_expected_pattern_fails_where_the_pattern_breaks():
    models = ["synth_unbiased", "synth_hue", "synth_patch"]
    checks = bias_table.expected_pattern(bias_table.cells(_runs(False, 0.05), models))
    failed = {c.name for c in checks if not c.passed}
    assert "synth_hue / object_hue: significant" in failed
    assert "synth_patch / patch: relevant" in failed
    assert "synth_unbiased / background_brightness: score" in failed
    assert "synth_hue / object_hue: flips" not in failed


def test_markdown_table_escapes_pipes():
    text = markdown_table(("E|∇X|", "n"), [("a|b", 1)])
    assert text.splitlines() == ["| E\\|∇X\\| | n |", "|---|---|", "| a\\|b | 1 |"]


def test_mean_interval_brackets_the_mean():
    mean, low, high = mean_interval(np.random.default_rng(0).normal(1.0, 0.1, 200))
    assert low < mean < high and high - low < 0.05
    assert mean_interval([0.5, 0.5]) == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("method", list(saliency.METHODS))
def test_every_saliency_baseline_gives_one_finite_map_per_image(method):
    model = saliency.served_classifier("synth_patch")
    images, _ = held_out_images(1, seed=3)
    maps = saliency.attribution_maps(method, model, images, np.array([0, 1]))
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and np.abs(maps).max() > 0


def test_map_change_is_zero_for_identical_maps():
    maps = np.random.default_rng(0).random((3, 8, 8))
    assert saliency.map_change(maps, maps).tolist() == [0.0, 0.0, 0.0]
    assert saliency.map_change(maps, maps + 2.0) == pytest.approx([4.0, 4.0, 4.0])


def _noise_schema() -> EditorSchema:
    for line in NOISE_CONFIG.read_text().splitlines():
        if SCHEMA_PARAMETER in line:
            literal = line.split("string_value: ", 1)[1].rsplit(" }", 2)[0]
            return EditorSchema.from_json(ast.literal_eval(literal))
    raise AssertionError("no propscope.parameters in calibration_noise's config.pbtxt")


def test_calibration_noise_declares_its_flavours_and_reads_the_probes_corner():
    parameters = _noise_schema().resolve({})
    assert parameters == {"flavour": "continuous", "minority": "0.1"}
    assert calibration_noise.CORNER == CORNER
    assert "editor" in NOISE_CONFIG.read_text()


def test_calibration_noise_imports_no_torch():
    code = (
        "import sys; import propscope_server.triton_models.editors.calibration_noise; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("flavour", calibration_noise.FLAVOURS)
def test_calibration_noise_redraws_only_the_corner_per_strength_and_seed(flavour):
    image = held_out_images(1, seed=2)[0][0]
    strengths = np.arange(1, 21, dtype=np.float32) / 20
    parameters = {"flavour": flavour, "minority": "0.5"}
    path = calibration_noise.edit_path(image, strengths, parameters, seed=11)
    assert path.shape == (20, *image.shape) and path.dtype == np.uint8
    assert (path[:, :-CORNER] == image[:-CORNER]).all()
    assert (path[:, :, :-CORNER] == image[:, :-CORNER]).all()
    # The same strength gives the same corner at any path length (1/10 == 2/20).
    shorter = calibration_noise.edit_path(
        image, np.arange(1, 11, dtype=np.float32) / 10, parameters, seed=11
    )
    assert (shorter == path[1::2]).all()
    other_seed = calibration_noise.edit_path(image, strengths, parameters, seed=12)
    assert not (other_seed == path).all()
    original = calibration_noise.null_original(image, 11, flavour, 0.5)
    corners = np.concatenate([original[None], path])[:, -CORNER:, -CORNER:]
    distinct = np.unique(corners.reshape(len(corners), -1), axis=0)
    if flavour == "continuous":
        assert len(distinct) == 21
    else:
        assert len(distinct) == 2
        low, high = sorted(distinct.astype(int), key=lambda c: c.sum())
        assert (high - low == calibration_noise.TIE_OFFSET).all()


def test_tied_corners_take_the_second_texture_at_the_minority_rate():
    picks = [
        calibration_noise.corner_texture(seed, 0.0, "tied", 0.1).astype(int).sum()
        for seed in range(2000)
    ]
    bases = [
        calibration_noise.corner_texture(seed, 0.0, "tied", 0.0).astype(int).sum()
        for seed in range(2000)
    ]
    share = np.mean(np.array(picks) != np.array(bases))
    assert 0.08 < share < 0.12


def test_calibration_noise_refuses_an_unknown_flavour():
    with pytest.raises(ValueError, match="flavour"):
        calibration_noise.corner_texture(0, 0.5, "plaid", 0.1)


def _null(p_value, steps=10, edits=10, decision="not_significant"):
    return honesty.NullRun(p_value, steps, edits, decision)


def test_null_calibration_counts_no_ops_apart_and_summarises_lengths():
    runs = [_null(p, 10) for p in np.linspace(0.001, 1, 90)] + [
        _null(None, 10, 10, honesty.NO_OP) for _ in range(10)
    ]
    runs[0] = _null(0.005, 40, 70, "relevant")
    result = honesty.null_calibration(runs, "tied", "adaptive")
    assert (result.requests, result.decided) == (100, 90)
    assert result.false_positive_rate == pytest.approx(1 / 90)
    assert result.steps_used == {10: 99, 40: 1}  # no-ops included: they cost N = 10
    assert result.decisions[honesty.NO_OP] == 10 and result.max_edits == 70


def test_one_sided_ks_accepts_conservative_and_rejects_liberal_p_values():
    rng = np.random.default_rng(0)
    conservative = [_null(p) for p in np.minimum(1.0, rng.uniform(size=500) * 1.5)]
    liberal = [_null(p) for p in rng.uniform(size=500) ** 1.5]
    assert honesty.null_calibration(conservative, "tied", "fixed").ks_greater_p_value > 0.5
    assert honesty.null_calibration(liberal, "tied", "fixed").ks_greater_p_value < 1e-3


def _decided(model, prop, index, decision, edits, steps=10):
    run = _run(model, prop, [0.9, 0.1], relevant=decision == "relevant")
    return dataclasses.replace(run, image_index=index, decision=decision, edits=edits, steps=steps)


def test_agreement_compares_each_image_with_its_reference():
    reference = [_decided("m", "patch", i, "relevant", 100, 100) for i in range(4)]
    adaptive = [
        _decided("m", "patch", 0, "relevant", 10),
        _decided("m", "patch", 1, "relevant", 30, 20),
        _decided("m", "patch", 2, "not_significant", 10),
        _decided("m", "patch", 3, "relevant", 10),
    ]
    (cell,) = bias_table.agreement(reference, list(reversed(adaptive)), ["m"])
    assert cell.decision_agreement == 0.75 and cell.relevant_agreement == 0.75
    assert cell.mean_edits_adaptive == 15 and cell.steps_used == {10: 3, 20: 1}
    summary = bias_table.summarise(reference, adaptive)
    assert summary.edit_ratio == pytest.approx(100 / 15)
    (differing,) = bias_table.disagreements(reference, adaptive)
    assert (differing.image_index, differing.adaptive_decision) == (2, "not_significant")
    with pytest.raises(ValueError, match="not the reference"):
        bias_table.summarise(reference, adaptive[:3])


def test_common_level_clips_one_level_to_what_each_property_can_reach():
    aims = downstream.common_level({"a": (0.0, 1.0), "b": (0.0, 0.2), "c": (0.9, 1.0)}, 0.5)
    assert aims["b"] == 0.2 and aims["c"] == 0.9
    assert aims["a"] == pytest.approx(0.4, abs=1e-6)
    assert np.mean(list(aims.values())) == pytest.approx(0.5, abs=1e-6)
    unreachable = downstream.common_level({"a": (0.0, 0.3), "b": (0.0, 0.1)}, 0.5)
    assert unreachable == pytest.approx({"a": 0.3, "b": 0.1})


def test_size_ranges_span_the_flip_point_and_leave_out_what_never_changes():
    grid = downstream.GRID
    flip = (np.arange(1, grid + 1) > grid // 2).astype(float)  # changes past half the axis
    changes = {"object_hue": flip, "patch": np.zeros(grid)}
    ranges = downstream.size_ranges(changes)
    assert not ranges["patch"].included
    hue = ranges["object_hue"]
    assert hue.included and hue.target_rate == pytest.approx(0.5, abs=1e-6)
    assert hue.expected_rate == pytest.approx(0.5)
    assert hue.smallest < 0.5 < hue.largest
    drawn = downstream.random_interventions(200, seed=1, ranges=ranges)
    assert all(set(d) == {"object_hue"} for d in drawn)
    amounts = [float(d["object_hue"].rsplit("=", 1)[1]) for d in drawn]
    assert 180 * hue.smallest <= min(amounts) and max(amounts) <= 180 * hue.largest
    assert np.mean(np.array(amounts) > 90) == pytest.approx(0.5, abs=0.1)


def test_signed_axes_draw_both_ways_and_every_axis_has_a_probe():
    axis = downstream.AXES["object_size"]
    assert axis.spec(1.0, negative=True) == "procedural:operation=scale,amount=-0.9500"
    assert axis.describe(0.0, 1.0) == "amount 0..1 or 0..-0.95"
    drawn = downstream.random_interventions(100, seed=0)
    signs = {d["background_brightness"].rsplit("=", 1)[1].startswith("-") for d in drawn}
    assert signs == {True, False}
    paths, singles = downstream.calibration_properties(grid=4)
    assert set(paths) == {"object_hue+", "background_brightness+", "background_brightness-"} | {
        "object_size+",
        "object_size-",
    }
    assert set(singles) == {f"patch@{k}" for k in range(1, 5)}
    assert singles["patch@4"].endswith("patch_size=56")  # the middle of (52.5, 64]


def test_change_by_size_reads_each_cells_middle_on_a_path_and_every_single_size():
    # 2 x 4 steps: x_1, x_3, x_5, x_7 are the middles of the 4 cells.
    curve = [0.9, 0.9, 0.9, 0.5, 0.5, 0.1, 0.1, 0.9, 0.9]
    hue = _run("m", "object_hue+", curve, [0, 0, 0, 0, 0, 1, 1, 0, 0])
    patches = [
        dataclasses.replace(_run("m", f"patch@{k}", [0.9, curve_end]), image_index=0)
        for k, curve_end in ((1, 0.9), (2, 0.9), (3, 0.2), (4, 0.1))
    ]
    changes = downstream.change_by_size([hue], patches, grid=4)
    assert changes["object_hue"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert changes["patch"].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_a_no_op_edit_is_a_constant_unchanged_path():
    sibling = _run("m", "object_hue", [0.8, 0.3, 0.1], [1, 0, 0])
    original = np.zeros((4, 4, 3), np.uint8)
    run = _no_op_run("patch", sibling, original, steps=2, keep_last_image=True)
    assert run.property_name == "patch" and run.curve.tolist() == [0.8, 0.8, 0.8]
    assert not downstream.output_changed(run) and run.score == 0.0 and run.p_value == 1.0
    assert (run.last_image == original).all() and run.decision == "no-op"
