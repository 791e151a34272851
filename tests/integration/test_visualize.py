"""Visualize (MACO) through the real stack (gateway, Triton's open classifiers, the SDK):
a class picture raises its class's logit and probability over the starting picture, the
same seed gives the same picture (another seed another), a channel objective raises its
channel, and the refusals name the field or the capability before any pass. Small
settings (steps and crops) keep it cheap; the paper's defaults run in `make validate`."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest

from propscope import Client, PropscopeError
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import visualization_pb2 as vpb
from propscope.v1 import visualization_pb2_grpc
from propscope_dev.validation import maco as maco_validation
from tests.integration.conftest import inference_count

SMALL = {"steps": 24, "crops": 8}


@pytest.fixture(scope="module")
def stub(channel) -> visualization_pb2_grpc.VisualizationServiceStub:
    return visualization_pb2_grpc.VisualizationServiceStub(channel)


def refused(stub, request: vpb.VisualizeRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Visualize(request, timeout=60))
    return caught.value


def test_a_class_picture_raises_its_class_and_is_deterministic_for_a_seed(client: Client):
    progress = []
    first = client.visualize(
        "synth_hue", class_index=0, seed=3, on_progress=progress.append, **SMALL
    )
    assert first.objective > first.start_objective
    start = client.visualize("synth_hue", class_index=0, seed=3, steps=1, crops=1)
    assert first.probability(0) > start.probability(0) or first.probability(0) > 0.99
    assert first.picture.size == (64, 64) and first.alpha.shape == (64, 64)
    assert 0.0 <= first.alpha.min() and first.alpha.max() == pytest.approx(1.0)
    assert first.spectrum_source == "natural_1_over_f"
    assert progress and progress[-1].steps_done == progress[-1].steps_total == SMALL["steps"]
    again = client.visualize("synth_hue", class_index=0, seed=3, **SMALL)
    assert again.picture_png == first.picture_png
    np.testing.assert_array_equal(again.alpha, first.alpha)
    other = client.visualize("synth_hue", class_index=0, seed=4, **SMALL)
    assert other.picture_png != first.picture_png


def test_the_passes_triton_counts_are_the_plan_s(client: Client, triton):
    before = inference_count(triton, "synth_patch")
    found = client.visualize("synth_patch", class_index=1, steps=4, crops=3)
    assert found.passes == 4 * 3 + 2
    assert inference_count(triton, "synth_patch") - before >= 4 * 3 + 2
    # Four steps rarely reach the class; whichever it is, the result says so exactly then.
    missed = [w for w in found.warnings if "not class 1" in w]
    assert len(missed) == (found.predicted_class != 1), found.warnings
    assert len(found.warnings) == len(set(found.warnings))


def test_spectrum_images_set_the_magnitude(client: Client, tmp_path):
    from tests.integration.conftest import scene_png

    images = [scene_png(hue_deg=float(h)) for h in (0, 90, 180)]
    found = client.visualize("synth_hue", class_index=1, spectrum_images=images, steps=4, crops=4)
    assert found.spectrum_source == "images"
    written = found.save(tmp_path / "square.png")
    assert all(path.stat().st_size > 0 for path in written)


def test_a_black_box_model_is_refused_naming_gradients(stub, triton):
    before = inference_count(triton, "calibration_probe")
    error = refused(
        stub, vpb.VisualizeRequest(model=pb.ModelRef(name="calibration_probe"), class_index=0)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "gradients" in error.details() and "calibration_probe" in error.details()
    assert inference_count(triton, "calibration_probe") == before


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"class_index": 7}, "class_index"),
        ({"channel": vpb.ChannelObjective(layer="features.9", channel=0)}, "channel.layer"),
        ({"channel": vpb.ChannelObjective(layer="features.0", channel=16)}, "channel.channel"),
        ({"class_index": 0, "steps": 100_000}, "steps"),
        ({"class_index": 0, "crops": 100_000}, "crops"),
        ({"class_index": 0, "size_px": 4096}, "size_px"),
        ({"class_index": 0, "noise": 2.0}, "noise"),
        ({"class_index": 0, "placement": "corner"}, "placement"),
        ({}, "objective"),
    ],
)
def test_out_of_range_requests_are_refused_naming_the_field(stub, fields, field):
    error = refused(stub, vpb.VisualizeRequest(model=pb.ModelRef(name="synth_hue"), **fields))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()


def test_the_sdk_refuses_two_objectives_before_sending(client: Client):
    with pytest.raises(ValueError, match="exactly one objective"):
        client.visualize("synth_hue", class_index=0, layer="features.0", channel=1)
    with pytest.raises(PropscopeError):
        client.visualize("no_such_model", class_index=0, steps=1, crops=1)


def test_a_channel_picture_raises_its_channel(client: Client):
    found = client.visualize("synth_hue", layer="features.2", channel=5, seed=1, **SMALL)
    assert found.objective_description == "channel features.2[5]"
    assert found.objective > found.start_objective


def test_an_unknown_concept_bank_is_not_found_naming_fit_concepts(stub):
    error = refused(
        stub,
        vpb.VisualizeRequest(
            model=pb.ModelRef(name="synth_hue"),
            concept=vpb.ConceptObjective(bank_id="cb_" + "0" * 32, concept=0),
        ),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "FitConcepts" in error.details()


def test_the_quick_validation_rows(live_stack):
    """validate(quick=True) on the real stack: every row well formed, and the rows that
    hold at 64 steps x 16 crops (docs/maco.md lists what does not)."""
    rows = {row["criterion"]: row for row in maco_validation.validate(live_stack.gateway, True)}
    assert all(
        set(row) >= {"part", "criterion", "target", "measured", "met"} for row in rows.values()
    )
    for model in ("synth_unbiased", "synth_hue", "synth_patch"):
        for class_index in (0, 1):
            name = f"{model} class {class_index} picture classified as its class"
            assert rows[f"{name} (natural spectrum)"]["met"]
    assert rows["synth_hue class-0 picture's mean hue in the model's class-0 hue range"]["met"]


def test_the_cli_names_the_capability_and_the_option_it_refuses(live_stack, tmp_path):
    """A black-box model: the pre-flight refusal says maco needs gradients; an empty
    --spectrum folder is refused naming --spectrum. Exit 2 for both, nothing drawn."""
    base = [sys.executable, "-m", "propscope", "visualize", "--target", live_stack.gateway]
    out = ["--class", "0", "--steps", "4", "-o", str(tmp_path / "v.png"), "--no-progress"]
    black_box = subprocess.run(
        [*base, "-m", "calibration_probe", *out], capture_output=True, text=True, timeout=120
    )
    assert black_box.returncode == 2, black_box.stderr
    assert "maco needs an open model" in black_box.stderr and "gradients" in black_box.stderr
    (tmp_path / "empty").mkdir()
    spectrum = subprocess.run(
        [*base, "-m", "synth_hue", "--spectrum", str(tmp_path / "empty"), *out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert spectrum.returncode == 2 and "--spectrum" in spectrum.stderr, spectrum.stderr
    assert not (tmp_path / "v.png").exists()
