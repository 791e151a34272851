"""The attribution method's pure parts: the geometry between the image and the model's
view, the design's own bias warning, RISE masks independent of the batch size, the
perturbation batch bound and the baselines (pure logic; the method through Triton is
tests/integration/test_attribution.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from propscope_server.backends.preprocessing import InputLayout, map_to_image, map_to_view
from propscope_server.config import PreprocessingConfig
from propscope_server.domain import RiseSpec, SobolSpec
from propscope_server.errors import FailedPrecondition
from propscope_server.inference import ModelDescription, Tensor
from propscope_server.methods.attribution import (
    baseline_image,
    design_warning,
    perturbation_batch,
    rise_masks,
)
from propscope_server.orchestration.classifier import (
    PlannedClassifier,
    Target,
    check_target_score,
    target_scores,
)


def classifier(datatype: str = "UINT8", mean=None, size=(64, 64)) -> PlannedClassifier:
    model = ModelDescription(
        name="m",
        version="1",
        versions=("1",),
        role="classifier",
        inputs=(Tensor("IMAGE", datatype, [*size, 3]),),
        outputs=(Tensor("LOGITS", "FP32", [2]),),
        max_batch_size=64,
    )
    return PlannedClassifier(
        model=model,
        layout=InputLayout("IMAGE", datatype, False, size[0] or None, size[1] or None),
        output="LOGITS",
        classes=2,
        preprocessing=PreprocessingConfig(mean=mean, output_kind="logits"),
        preprocessing_sources=(),
        warnings=(),
        class_labels=(),
    )


def test_squash_maps_back_onto_the_whole_image():
    view = np.zeros((32, 32), np.float32)
    view[:, :16] = 1.0
    image = map_to_image(view, 60, 100, "squash")
    assert image.shape == (60, 100)
    assert image[:, :40].min() > 0.9 and image[:, 60:].max() < 0.1


def test_center_crop_leaves_zero_where_the_model_never_looked():
    image = map_to_image(np.ones((32, 32), np.float32), 60, 120, "center_crop")
    # The model sees the central 60 x 60 of a 60 x 120 image.
    assert image.shape == (60, 120)
    assert np.all(image[:, :25] == 0) and np.all(image[:, 95:] == 0)
    assert np.allclose(image[:, 35:85], 1.0, atol=1e-3)


def test_letterbox_drops_the_padding_and_round_trips():
    view = np.zeros((32, 32), np.float32)
    view[8:24] = np.linspace(0, 1, 32, dtype=np.float32)  # the image occupies rows 8..23
    image = map_to_image(view, 50, 100, "letterbox")
    assert image.shape == (50, 100)
    assert image[:, 0].max() < 0.1 and image[:, -1].min() > 0.8  # the ramp, not the padding
    back = map_to_view(image, 32, 32, "letterbox")
    assert np.all(back[:8] == 0) and np.all(back[24:] == 0)


def test_the_default_design_names_the_cells_it_biases_and_a_long_one_none():
    warning = design_warning(SobolSpec(grid=8, nb_design=32), seed=0)
    assert "9 (row 1, column 1) x0.20" in warning and "42 (row 5, column 2) x0.25" in warning
    assert "sobol.scrambled" in warning
    assert design_warning(SobolSpec(grid=8, nb_design=256), seed=0) == ""
    assert design_warning(RiseSpec(), seed=0) == ""


@pytest.mark.parametrize("batch", [1, 48, 64, 100])
def test_rise_masks_do_not_depend_on_the_batch_size(batch):
    method = RiseSpec(grid=4, nb_samples=150, preservation=0.5)
    whole = rise_masks(method, 3, 0, 150, 16, 20)
    pieces = np.concatenate(
        [
            rise_masks(method, 3, start, min(start + batch, 150), 16, 20)
            for start in range(0, 150, batch)
        ]
    )
    assert pieces.shape == (150, 16, 20, 1)
    assert np.array_equal(whole, pieces)
    assert not np.array_equal(whole, rise_masks(method, 4, 0, 150, 16, 20))


def test_a_large_view_is_perturbed_in_smaller_batches():
    assert perturbation_batch(classifier(), np.zeros((64, 64, 3), np.float32)) == 64
    assert perturbation_batch(classifier(size=(0, 0)), np.zeros((2048, 2048, 3), np.float32)) == 1


def test_input_zero_is_the_declared_mean_even_for_a_model_that_normalises_inside():
    view = np.full((4, 4, 3), 100, np.float32)
    assert np.all(baseline_image(view, "input_zero", 0.0, classifier()) == 0)
    declared = classifier(mean=(0.5, 0.25, 0.0))
    assert np.allclose(baseline_image(view, "input_zero", 0.0, declared)[0, 0], [127.5, 63.75, 0])
    assert np.allclose(baseline_image(view, "mean_colour", 0.0, declared), 100)
    assert np.all(baseline_image(view, "black", 0.0, declared) == 0)


def test_log_odds_is_the_unsaturated_margin_of_softmax_outputs():
    """From float32-like probabilities where p_t rounds to 1, log-odds still recovers
    z_t - log sum_{j != t} exp(z_j) from the other classes' tiny probabilities."""
    logits = np.array([[30.0, 1.0, -2.0], [0.0, 0.5, 0.2]])
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    planned = dataclasses.replace(
        classifier(), preprocessing=PreprocessingConfig(output_kind="probabilities")
    )
    found = target_scores(planned, probabilities, Target(0, "log_odds"))
    expected = logits[:, 0] - np.log(np.exp(logits[:, 1:]).sum(axis=1))
    assert np.allclose(found, expected, rtol=1e-9)
    assert np.isfinite(
        target_scores(planned, np.array([[1.0, 0.0, 0.0]]), Target(0, "log_odds"))
    ).all()
    with pytest.raises(FailedPrecondition, match="LOG_ODDS"):
        check_target_score(planned, "logit")
