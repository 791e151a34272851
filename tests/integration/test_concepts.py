"""CRAFT concepts through the real stack (gateway, Triton's open classifiers, Redis): a
bank fitted, stored, shown and mapped through the SDK and the CLI, Triton's count of
passes against the bank's g and h passes, the refusals (before any pass where the input
alone decides), and the quick validation (tools/propscope_dev/validation/craft.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from propscope import Client, ConceptBank, PropscopeError
from propscope_dev.validation import craft as validation
from tests.integration import open_resnet
from tests.integration.conftest import inference_count, png, scene_png

SMALL = {"rank": 6, "nb_design": 8, "top_crops": 3}


@pytest.fixture(scope="module")
def squares() -> list[bytes]:
    return validation.class_images(6)


@pytest.fixture(scope="module")
def bank(client: Client, squares, triton) -> tuple[ConceptBank, int]:
    before = inference_count(triton, "synth_patch")
    fitted = client.fit_concepts(squares, "synth_patch", target_class=1, **SMALL)
    return fitted, counted(triton, "synth_patch", before, fitted.g_passes + fitted.h_passes)


def counted(triton, model: str, before: int, expected: int) -> int:
    """Triton's inferences of `model` since `before` (its statistics may lag the stream)."""
    deadline = time.monotonic() + 10.0
    while inference_count(triton, model) - before < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    return inference_count(triton, model) - before


def test_a_fitted_bank_ranks_its_concepts_and_counts_its_passes(bank):
    fitted, passes = bank
    assert fitted.model == "synth_patch" and fitted.layer == "features.2"
    assert fitted.target_class == 1 and fitted.target_label == "square"
    assert fitted.rank == 6 and fitted.basis.shape == (6, 64) and fitted.patch_size == 19
    assert fitted.crops == 6 * 16 and fitted.g_passes == fitted.crops + 6
    assert fitted.h_passes == 6 * 8 * (6 + 2) + 6 + 2
    assert passes == fitted.g_passes + fitted.h_passes
    importances = [c.sobol_total_importance for c in fitted.concepts]
    assert importances == sorted(importances, reverse=True) and importances[0] > 0
    assert fitted.logit_share_exact  # GAP then a linear head
    assert sum(c.logit_share for c in fitted.concepts) == pytest.approx(1.0)
    assert fitted.reconstruction_error < 0.15
    crop = fitted.concepts[0].top_crops[0]
    assert crop.png.startswith(b"\x89PNG") and crop.width == crop.height == 19


def test_the_stored_bank_is_shown_again_and_maps_an_image(client: Client, bank, squares):
    fitted, _ = bank
    again = client.concept_bank(fitted.bank_id, model="synth_patch")
    assert again.concepts == fitted.concepts
    assert np.allclose(again.basis, fitted.basis)
    maps = client.concept_maps(squares[0], fitted.bank_id)
    assert [m.concept for m in maps.maps] == [c.index for c in fitted.concepts]
    assert maps.maps[0].values.shape == (64, 64) and maps.maps[0].grid.shape == (8, 8)
    assert all((m.grid >= 0).all() for m in maps.maps)


def test_a_concept_decomposes_at_the_layer_before(client: Client, bank, squares):
    fitted, _ = bank
    concept = fitted.concepts[0].index
    child = client.decompose_concept(fitted.bank_id, concept, squares, rank=2, nb_design=8)
    assert child.layer == "features.1" and child.channels == 32 and child.rank == 2
    assert (child.parent_bank_id, child.parent_concept) == (fitted.bank_id, concept)
    assert child.images == child.crops == child.g_passes == 6 * 16 // 6  # 1 / r of the crops
    assert all(crop.width == 19 for c in child.concepts for crop in c.top_crops)
    with pytest.raises(PropscopeError) as caught:
        client.decompose_concept(fitted.bank_id, concept, squares[::-1], rank=2)
    assert (
        caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "digest" in caught.value.message
    )


def test_the_cli_shows_a_stored_bank_and_writes_its_crops(live_stack, bank, tmp_path):
    fitted, _ = bank
    shown = subprocess.run(
        [sys.executable, "-m", "propscope", "concepts", "show", fitted.bank_id]
        + ["--target", live_stack.gateway, "--format", "json", "--crops", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["bank_id"] == fitted.bank_id
    assert len(list(tmp_path.glob("concept*_*.png"))) == 6 * 3


@pytest.mark.parametrize(
    ("arguments", "code", "words"),
    [
        (("calibration_probe", {}), grpc.StatusCode.FAILED_PRECONDITION, "activations"),
        (("synth_patch", {"rank": 20}), grpc.StatusCode.INVALID_ARGUMENT, "rank 20 needs"),
        (
            ("synth_patch", {"rank": 64, "nb_design": 1024, "patch_size": 4}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "max_concept_passes",
        ),
    ],
)
def test_refusals_before_any_pass(client: Client, triton, arguments, code, words):
    model, options = arguments
    before = inference_count(triton, model)
    with pytest.raises(PropscopeError) as caught:
        client.fit_concepts([scene_png()], model, target_class=0, **options)
    assert caught.value.code == code and words in caught.value.message
    assert counted(triton, model, before, 0) == 0


def test_an_unknown_or_malformed_bank_id_is_refused(client: Client):
    with pytest.raises(PropscopeError) as caught:
        client.concept_bank("cb_" + "0" * 32)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND and "FitConcepts" in caught.value.message
    with pytest.raises(PropscopeError) as caught:
        client.concept_bank("nope")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bank_on_another_model_is_refused(client: Client, bank):
    fitted, _ = bank
    with pytest.raises(PropscopeError) as caught:
        client.concept_bank(fitted.bank_id, model="synth_unbiased")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_negative_activations_are_refused_naming_a_layer_that_works(
    client: Client, triton, tmp_path, monkeypatch
):
    # stage1.conv1: a convolution's output, before its batch norm and ReLU.
    monkeypatch.setattr(open_resnet, "LAYERS", {"stem": 8, "stage1.conv1": 8, "stage1": 8})
    folder = open_resnet.write_model(tmp_path / "repository", name="tiny_resnet_concepts")
    rng = np.random.default_rng(3)
    images = [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    with open_resnet.served(triton, folder) as name:
        with pytest.raises(PropscopeError) as caught:
            client.fit_concepts(images, name, target_class=0, layer="stage1.conv1", **SMALL)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "negative activations" in caught.value.message
    assert "non-negative on the first image: stem, stage1" in caught.value.message


def test_the_quick_validation_runs_on_the_stack(live_stack):
    rows = validation.validate(live_stack.gateway, quick=True)
    by_criterion = {row["criterion"]: row for row in rows}
    assert len(rows) == 8 and all(row["part"] == "CRAFT" for row in rows)
    for model in validation.MODELS:
        error = by_criterion[f"{model}: NMF relative reconstruction error at r = 10"]
        assert error["met"], error
    deletion = by_criterion["synth_patch: deletion curve in Sobol order below random orders"]
    assert deletion["met"], deletion


def test_a_bank_of_an_older_version_is_stale(client: Client, squares):
    """synth_patch_folds serves versions 1..4 (loaded when first named): a bank of version 1
    is refused once the latest (4) is the one named, and shown for version 1."""
    fitted = client.fit_concepts(
        squares[:2], "synth_patch_folds", model_version="1", target_class=1, **SMALL
    )
    with pytest.raises(PropscopeError) as caught:
        client.concept_bank(fitted.bank_id, model="synth_patch_folds")
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "stale bank (fitted on version 1" in caught.value.message
    again = client.concept_bank(fitted.bank_id, model="synth_patch_folds", model_version="1")
    assert again.bank_id == fitted.bank_id
