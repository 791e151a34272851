"""End to end through real gRPC -> real Triton -> real Redis."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import propscope
from propscope import Accepted, Done, Progress, PropertyResult
from tests.integration.conftest import SAMPLE, inference_count, scene_png

HUE = "object_hue=procedural:operation=hue,region=object"
PATCH = "patch=procedural:operation=blend"
BACKGROUND = "background_brightness=procedural:operation=brightness,region=background,amount=0.2"
CLASSIFIERS = ("synth_unbiased", "synth_hue", "synth_patch")


def results(events: list) -> dict[str, PropertyResult]:
    return {e.property_name: e for e in events if isinstance(e, PropertyResult)}


def explain(client: propscope.Client, image: bytes, model: str, properties: list[str], **kwargs):
    return list(client.explain(image, model, properties, **kwargs))


def test_stream_order_and_plan(client):
    events = explain(
        client,
        SAMPLE.read_bytes(),
        "synth_unbiased",
        [HUE, BACKGROUND],
        steps=8,
        request_id="order-1",
    )
    assert isinstance(events[0], Accepted)
    assert isinstance(events[-1], Done)
    assert all(e.request_id == "order-1" for e in events)
    assert events[0].property_names == ("object_hue", "background_brightness")
    assert events[0].planned_edits == 2 * 8
    assert events[0].planned_classifications == 2 * 9
    assert sorted(results(events)) == ["background_brightness", "object_hue"]
    assert sum(isinstance(e, PropertyResult) for e in events) == 2
    assert any(isinstance(e, Progress) for e in events[1:-1])
    for result in results(events).values():
        assert result.error is None
        assert len(result.samples) == 1
        assert len(result.samples[0].prediction_curve) == 9
    assert events[-1].properties_failed == 0
    assert events[-1].total_ms > 0


@pytest.mark.parametrize("hue_deg", [5.0, 350.0, 185.0])
def test_hue_bias_is_found_in_the_hue_model_only(client, hue_deg):
    image = scene_png(hue_deg=hue_deg, shape=0 if hue_deg != 185.0 else 1)
    scores = {
        m: results(explain(client, image, m, [HUE], steps=10))["object_hue"] for m in CLASSIFIERS
    }
    hue_model = scores["synth_hue"]
    assert hue_model.significant
    assert hue_model.prediction_flipped
    assert hue_model.score > 2 * scores["synth_unbiased"].score
    assert not scores["synth_unbiased"].prediction_flipped


def test_patch_model_flips_when_the_patch_is_blended_in(client):
    image = scene_png(hue_deg=120.0, shape=0)
    patch_model = results(explain(client, image, "synth_patch", [PATCH], steps=10))["patch"]
    unbiased = results(explain(client, image, "synth_unbiased", [PATCH], steps=10))["patch"]
    assert patch_model.prediction_flipped
    assert patch_model.significant
    assert patch_model.samples[0].predicted_classes[0] == 0
    assert patch_model.samples[0].predicted_classes[-1] == 1
    assert not unbiased.prediction_flipped
    assert patch_model.score > 2 * unbiased.score


def test_background_brightness_stays_small_for_every_model(client):
    image = scene_png(hue_deg=5.0, shape=0)
    hue_score = results(explain(client, image, "synth_hue", [HUE], steps=10))["object_hue"].score
    for model in CLASSIFIERS:
        background = results(explain(client, image, model, [BACKGROUND], steps=10))
        result = background["background_brightness"]
        assert not result.prediction_flipped, model
        assert result.score < hue_score / 5, model


def test_second_classifier_reuses_the_cached_path(client, triton):
    image = scene_png(hue_deg=77.0, radius_px=12.0)
    editor_calls = inference_count(triton, "procedural")
    first = results(
        explain(client, image, "synth_unbiased", [HUE], steps=6, samples=2, path_mode="fixed")
    )["object_hue"]
    assert (first.cache_hits, first.cache_misses) == (0, 2)
    assert inference_count(triton, "procedural") == editor_calls + 1  # both samples, one call
    second = results(
        explain(client, image, "synth_hue", [HUE], steps=6, samples=2, path_mode="fixed")
    )["object_hue"]
    assert (second.cache_hits, second.cache_misses) == (2, 0)
    assert all(s.cache_hit for s in second.samples)
    assert inference_count(triton, "procedural") == editor_calls + 1


def test_uint8_hwc_and_fp32_nchw_deployments_score_alike(client):
    image = scene_png(hue_deg=20.0)
    uint8 = results(
        explain(client, image, "synth_hue", [HUE, BACKGROUND], steps=10, path_mode="fixed")
    )
    fp32 = results(
        explain(client, image, "synth_hue_fp32", [HUE, BACKGROUND], steps=10, path_mode="fixed")
    )
    for name in uint8:
        np.testing.assert_allclose(
            uint8[name].samples[0].prediction_curve,
            fp32[name].samples[0].prediction_curve,
            atol=1e-4,
        )
        assert uint8[name].score == pytest.approx(fp32[name].score, abs=1e-4)
        assert uint8[name].significant == fp32[name].significant


def test_same_seed_gives_identical_results(client):
    image = scene_png(hue_deg=300.0)
    first = results(explain(client, image, "synth_hue", [HUE, PATCH], steps=12, samples=3, seed=7))
    second = results(explain(client, image, "synth_hue", [HUE, PATCH], steps=12, samples=3, seed=7))
    for name in first:
        assert first[name].score == second[name].score
        assert first[name].p_value == second[name].p_value
        assert (first[name].score_ci_low, first[name].score_ci_high) == (
            second[name].score_ci_low,
            second[name].score_ci_high,
        )


def test_samples_report_a_confidence_interval(client):
    image = scene_png(hue_deg=10.0)
    random_patch = "patch=procedural:operation=blend,position=random"
    result = results(explain(client, image, "synth_patch", [random_patch], steps=8, samples=4))[
        "patch"
    ]
    scores = [s.score for s in result.samples]
    assert len(set(s.seed for s in result.samples)) == 4
    assert result.score == pytest.approx(np.mean(scores))
    assert min(scores) <= result.score_ci_low <= result.score <= result.score_ci_high <= max(scores)


def test_path_images_come_back_when_asked(client):
    image = SAMPLE.read_bytes()
    result = results(
        explain(
            client, image, "synth_hue", [HUE], steps=5, return_path_images=True, path_mode="fixed"
        )
    )["object_hue"]
    frames = [np.asarray(Image.open(io.BytesIO(data))) for data in result.samples[0].path_images]
    assert len(frames) == 6
    np.testing.assert_array_equal(frames[0], np.asarray(Image.open(SAMPLE).convert("RGB")))
    assert not np.array_equal(frames[-1], frames[0])


def test_a_provided_path_calls_no_editor(client, triton):
    original = np.asarray(Image.open(SAMPLE).convert("RGB"))
    frames = []
    for alpha in np.linspace(0.2, 1.0, 5):
        frame = original.astype(np.float32)
        frame[:, :, :] = (1 - alpha) * frame + alpha * np.array([0, 255, 255])
        buffer = io.BytesIO()
        Image.fromarray(frame.astype(np.uint8)).save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    property_ = propscope.Property(name="cyan_wash", provided_path=frames)
    editor_calls = inference_count(triton, "procedural")
    result = results(explain(client, SAMPLE.read_bytes(), "synth_hue", [property_]))["cyan_wash"]
    assert result.error is None
    assert len(result.samples[0].prediction_curve) == 6
    assert inference_count(triton, "procedural") == editor_calls


def test_list_models_describes_classifiers_and_editors(client):
    models = {m.name: m for m in client.list_models()}
    assert set(CLASSIFIERS) | {"procedural", "synth_hue_fp32"} <= set(models)
    editor = models["procedural"]
    assert editor.role == propscope.ModelRole.EDITOR
    operation = {p.name: p for p in editor.editor_parameters}["operation"]
    assert "hue" in operation.choices and "blend" in operation.choices
    classifier = models["synth_hue"]
    assert classifier.role == propscope.ModelRole.CLASSIFIER
    assert classifier.inputs[0].datatype == "UINT8"
    assert classifier.max_batch_size > 0
