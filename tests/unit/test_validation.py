"""The validation's pure pieces: the calibration probe, the downstream task's
accuracy, the bias table's expected pattern and the Markdown tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from propscope_server.triton_models.classifiers.cnn import normalise_uint8_hwc
from propscope_server.triton_models.classifiers.probe import CORNER, CornerProbe
from propscope_server.validation import bias_table, downstream, saliency
from propscope_server.validation.runner import PropertyRun, held_out_images
from propscope_server.validation.tables import markdown_table, mean_interval


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
