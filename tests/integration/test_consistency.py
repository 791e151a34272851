"""EvaluateConsistency (MeGe, ReCo) through the real stack: the quick validation on the
fold models (loaded on demand by the gateway), identical models giving MeGe = 1, the SDK's
result against the stream's counts, and the refusals, each before any forward pass."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from propscope import Client, PropscopeError
from propscope_dev.validation import consistency as validation
from tests.integration.conftest import inference_count, scene_png

FOLDS = list(validation.FOLD_MODELS)


def test_quick_validation_on_the_fold_models(live_stack) -> None:
    rows = {row["criterion"]: row for row in validation.validate(live_stack.gateway, quick=True)}
    identical = rows["identical models (one fold version twice): MeGe = 1 for every explainer"]
    assert identical["met"], identical
    # Sobol's maps of one image agree across folds far more than uniform noise does (0.65
    # against 0.50 in the quick run); the other explainers' rows are recorded.
    sobol = rows["sobol: MeGe above the random-map explainer's"]
    assert sobol["met"], sobol
    assert all(row["part"] == "MeGe/ReCo" for row in rows.values())


def test_the_result_counts_every_pair_and_random_maps_stay_near_mege_one_half(
    client: Client,
) -> None:
    images = validation.boundary_images(6)
    result = client.evaluate_consistency(
        images, FOLDS[:3], explainers=["random", "saliency"], seed=3
    )
    assert [e.explainer for e in result.explainers] == ["saliency", "random"]
    assert [m.version for m in result.models] == ["1", "2", "3"]
    predictions = np.array([m.predicted_classes for m in result.models])
    agree = sum(
        int(predictions[i, n] == predictions[j, n])
        for i in range(3)
        for j in range(i + 1, 3)
        for n in range(6)
    )
    for scores in result.explainers:
        assert scores.agreeing_pairs == agree
        assert scores.agreeing_pairs + scores.disagreeing_pairs + scores.undefined_pairs == 18
    # Uniform maps of 4 096 pixels: |rho| ~ 0.01, distance ~ 0.99, MeGe ~ 0.5.
    assert result.explainer("random").mege == pytest.approx(0.5, abs=0.02)
    # 1 prediction + 1 gradient pass per model and image (saliency; random runs none).
    assert result.passes == result.planned_passes == 3 * 6 * 2


def test_two_refs_of_one_model_give_mege_one_with_a_warning(client: Client) -> None:
    images = [scene_png(patch=True), scene_png(shape=1, hue_deg=200.0)]
    result = client.evaluate_consistency(
        images,
        ["synth_patch", "synth_patch"],
        explainers=["sobol", "gradient_x_input"],
        sobol_nb_design=4,
        sobol_grid=4,
    )
    assert [e.mege for e in result.explainers] == [1.0, 1.0]
    assert all(e.reco is None for e in result.explainers)
    assert any("same model 'synth_patch'" in w for w in result.warnings)
    assert any("ReCo is undefined" in w for w in result.explainers[0].warnings)


def test_refusals_name_the_field_and_compute_nothing(client: Client, triton) -> None:
    images = [scene_png(), scene_png(shape=1)]
    with pytest.raises(PropscopeError) as one_model:
        client.evaluate_consistency(images, ["synth_patch"])
    assert one_model.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "models has 1 models" in one_model.value.message

    before = inference_count(triton, "calibration_probe")
    with pytest.raises(PropscopeError) as black_box:
        client.evaluate_consistency(
            images, ["calibration_probe", "synth_patch"], explainers=["saliency"]
        )
    assert black_box.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "gradients" in black_box.value.message
    assert "calibration_probe" in black_box.value.message
    assert inference_count(triton, "calibration_probe") == before

    with pytest.raises(PropscopeError) as labels:
        client.evaluate_consistency(images, ["synth_patch", "synth_hue"], labels=[0])
    assert labels.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "labels has 1 values for 2 images" in labels.value.message
