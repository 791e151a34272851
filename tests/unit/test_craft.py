"""CRAFT concepts (methods/craft.py, scoring/craft.py) on a tiny known open network, a
numpy fake of the open-model contract (ACTIVATION_LAYER -> ACTIVATIONS,
REPLACE_LAYER + REPLACE_ACTIVATION):

    f0 = 2x2 average pool of the image / 255 (minus 0.5 in the "signed" variant)
         3 channels on a 4 x 4 map
    f1 = relu(M f0 + b) per position                      4 channels on 4 x 4
    logits = V mean(f1) + c                               linear after pooling

so h after f1 is linear after pooling: the logit shares are exact and the Sobol
importance of a concept follows its logit contribution."""

from __future__ import annotations

import asyncio
import dataclasses
import weakref
from contextlib import aclosing

import numpy as np
import pytest

from propscope_server.cache.artefacts import InMemoryArtefactCache
from propscope_server.concepts_domain import (
    BankRef,
    ConceptBank,
    ConceptsAccepted,
    ConceptsProgress,
    ConceptsSpec,
    DecomposeSpec,
    MapsSpec,
)
from propscope_server.config import PreprocessingConfig, Settings
from propscope_server.domain import ClassifierRef
from propscope_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from propscope_server.inference import Layer, ModelDescription, Tensor
from propscope_server.methods import craft as craft_method
from propscope_server.methods.craft import Craft, load_bank
from propscope_server.orchestration.runner import run_method
from propscope_server.scoring import craft as scoring

M = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0]])
B = np.zeros(4)
V = np.array([[2.0, -1.0, 0.5, 1.0], [-2.0, 1.0, -0.5, -1.0]])
C = np.array([0.1, -0.1])
OPTIONAL = [
    Tensor("ACTIVATION_LAYER", "INT32", [1], True),
    Tensor("REPLACE_LAYER", "INT32", [1], True),
    Tensor("REPLACE_ACTIVATION", "FP32", [-1], True),
]
OPEN = ModelDescription(
    name="tiny",
    version="1",
    versions=("1",),
    role="classifier",
    inputs=(Tensor("IMAGE", "UINT8", [8, 8, 3]), *OPTIONAL),
    outputs=(Tensor("LOGITS", "FP32", [2]), Tensor("ACTIVATIONS", "FP32", [-1])),
    max_batch_size=16,
    parameters={"propscope.capabilities": "activations,interventions,gradients"},
    preprocessing=PreprocessingConfig(output_kind="logits"),
    layers=(Layer("f0", 3), Layer("f1", 4)),
)
BLACK_BOX = dataclasses.replace(
    OPEN,
    inputs=(Tensor("IMAGE", "UINT8", [8, 8, 3]),),
    outputs=(Tensor("LOGITS", "FP32", [2]),),
    parameters={},
    layers=(),
)

NO_REPLACE = dataclasses.replace(OPEN, inputs=OPEN.inputs[:2])


class FakeOpenModel:
    def __init__(self, model: ModelDescription = OPEN, signed: bool = False) -> None:
        self.model = model
        self.signed = signed
        self.passes = 0

    async def describe(self, name, version="", deadline=None):
        return self.model

    async def require_ready(self, model, deadline):
        return None

    async def infer(self, model, inputs, outputs, deadline):
        images = inputs["IMAGE"].astype(np.float64) / 255.0
        rows = len(images)
        assert rows <= model.max_batch_size
        self.passes += rows
        f0 = images.reshape(rows, 4, 2, 4, 2, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2)
        if self.signed:
            f0 = f0 - 0.5
        maps = [f0]
        replace = inputs.get("REPLACE_LAYER")
        for layer in (0, 1):
            if replace is not None:
                for r in np.flatnonzero(replace[:, 0] == layer):
                    shape = maps[layer].shape[1:]
                    maps[layer][r] = inputs["REPLACE_ACTIVATION"][r].reshape(shape)
            if layer == 0:
                f1 = np.einsum("kc,bchw->bkhw", M, maps[0]) + B[None, :, None, None]
                maps.append(np.maximum(f1, 0.0))
        logits = maps[1].mean(axis=(2, 3)) @ V.T + C
        answer = {"LOGITS": logits.astype(np.float32)}
        if "ACTIVATIONS" in outputs:
            (layer,) = set(inputs["ACTIVATION_LAYER"][:, 0].tolist())
            answer["ACTIVATIONS"] = maps[layer].reshape(rows, -1).astype(np.float32)
        return {name: answer[name] for name in outputs}


def images(count: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return tuple(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(count))


def spec(**changes) -> ConceptsSpec:
    values = dict(
        request_id="r",
        images=images(),
        classifier=ClassifierRef("tiny", target_class=0),
        rank=3,
        nb_design=16,
        top_crops=2,
    )
    values.update(changes)
    return ConceptsSpec(**values)


def run(request, fake=None, settings=None, cache=None):
    fake = fake or FakeOpenModel()
    cache = cache or InMemoryArtefactCache(1 << 26)

    async def collect():
        method = Craft(fake, cache, settings or Settings())
        async with aclosing(run_method(method, "craft", request, None)) as events:
            return [event async for event in events]

    return asyncio.run(collect()), fake, cache


def test_crop_boxes_slide_at_a_stride_of_0_8_patch_and_fit_inside():
    boxes = scoring.crop_boxes(64, 64, 16)
    assert scoring.stride_of(16) == 13
    assert len(boxes) == 16 and boxes[1] == (13, 0, 16, 16) and boxes[-1] == (39, 39, 16, 16)
    assert all(left + w <= 64 and top + h <= 64 for left, top, w, h in boxes)
    with pytest.raises(ValueError):
        scoring.crop_boxes(8, 8, 9)


def test_nmf_recovers_an_exact_low_rank_factorisation():
    rng = np.random.default_rng(1)
    data = rng.random((60, 3)) @ rng.random((3, 12))
    u, w, error = scoring.fit_nmf(data, 3, seed=0)
    assert u.shape == (60, 3) and w.shape == (3, 12) and error < 0.02
    assert np.abs(scoring.coefficients(data[:5], w) @ w - data[:5]).max() < 0.05


def test_nmf_takes_any_uint64_seed_of_the_request():
    # Fuzzing found it: a seed of 2**32 or more was scikit-learn's InvalidParameterError,
    # FitConcepts' INTERNAL.
    data = np.random.default_rng(2).random((20, 6))
    for seed in (2**32, 2**64 - 1):
        u, w, _ = scoring.fit_nmf(data, 2, seed=seed)
        assert u.shape == (20, 2) and w.shape == (2, 6)
    assert np.array_equal(scoring.fit_nmf(data, 2, 2**32 + 5)[1], scoring.fit_nmf(data, 2, 5)[1])


def test_logit_shares_are_exact_only_when_the_head_is_additive():
    contributions, shares, additive = scoring.logit_shares(np.array([1.0, 2.0, 4.0, 5.0]))
    assert contributions.tolist() == [1.0, 3.0] and additive
    assert shares.sum() == pytest.approx(1.0)
    assert not scoring.logit_shares(np.array([1.0, 2.0, 4.0, 9.0]))[2]


def test_deletion_masks_remove_concepts_cumulatively_in_order():
    masks = scoring.deletion_masks(np.array([2, 0, 1]))
    assert masks.tolist() == [[1, 1, 1], [1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_a_fit_streams_the_plan_progress_and_a_ranked_bank_with_its_pass_counts():
    events, fake, cache = run(spec())
    accepted, bank = events[0], events[-1]
    assert isinstance(accepted, ConceptsAccepted) and isinstance(bank, ConceptBank)
    assert any(isinstance(e, ConceptsProgress) for e in events)
    assert accepted.layer == "f1" and accepted.crops == 4 * 16 and accepted.patch_size == 2
    # g: a pass per crop and per image; h: per image N (r + 2), and r + 2 for the shares.
    assert bank.g_passes == 64 + 4 and bank.h_passes == 4 * 16 * 5 + 5
    assert fake.passes == bank.g_passes + bank.h_passes == accepted.planned_passes
    importances = [c.sobol_total_importance for c in bank.concepts]
    assert importances == sorted(importances, reverse=True)
    assert sorted(c.index for c in bank.concepts) == [0, 1, 2]
    assert bank.basis.shape == (3, 4) and bank.reconstruction_error < 0.15
    assert bank.logit_share_exact
    assert sum(c.logit_share for c in bank.concepts) == pytest.approx(1.0)
    crop = bank.concepts[0].top_crops[0]
    assert crop.png.startswith(b"\x89PNG") and (crop.width, crop.height) == (2, 2)


def test_sobol_importance_ranks_the_concepts_as_their_logit_contributions():
    events, _, _ = run(spec(rank=3, nb_design=64, images=images(8, seed=3)))
    bank = events[-1]
    by_contribution = sorted(bank.concepts, key=lambda c: -abs(c.logit_contribution))
    assert by_contribution[0].index == bank.concepts[0].index


def test_the_bank_is_stored_and_read_back_and_a_refit_gives_the_same_id():
    events, _, cache = run(spec())
    bank = events[-1]
    stored = asyncio.run(load_bank(cache, "default", bank.bank_id))
    assert stored.bank.concepts == bank.concepts
    assert np.allclose(stored.bank.basis, bank.basis)
    assert stored.coefficients.shape == (64, 3) and stored.origins.shape == (64, 5)
    again, _, _ = run(spec())
    assert again[-1].bank_id == bank.bank_id
    with pytest.raises(NotFound, match="FitConcepts"):
        asyncio.run(load_bank(cache, "another-tenant", bank.bank_id))


def test_a_bank_on_another_model_version_is_stale_and_an_unknown_id_not_found():
    events, fake, cache = run(spec())
    bank = events[-1]
    method = Craft(FakeOpenModel(dataclasses.replace(OPEN, version="2")), cache, Settings())
    with pytest.raises(FailedPrecondition, match="stale bank \\(fitted on version 1"):
        asyncio.run(method.bank(BankRef(bank.bank_id, ClassifierRef("tiny")), None))
    with pytest.raises(NotFound):
        asyncio.run(method.bank(BankRef("cb_" + "0" * 32, None), None))
    image = images(1)[0]
    with pytest.raises(FailedPrecondition, match="stale"):
        asyncio.run(method.maps(MapsSpec(bank.bank_id, image, None), None))


def test_concept_maps_give_each_concept_a_map_at_the_image_size():
    events, fake, cache = run(spec())
    bank = events[-1]
    method = Craft(fake, cache, Settings())
    maps = asyncio.run(method.maps(MapsSpec(bank.bank_id, images(1)[0], None), None))
    assert (maps.grid_height, maps.grid_width) == (4, 4) and len(maps.maps) == 3
    assert [m.concept for m in maps.maps] == [c.index for c in bank.concepts]
    assert maps.maps[0].values.shape == (8, 8) and (maps.maps[0].grid >= 0).all()


def test_concept_maps_too_large_to_answer_are_refused_before_any_pass(monkeypatch):
    # Unchecked, a rank-64 bank on a 4096 x 4096 image was 1 Gi floats in the gateway.
    events, fake, cache = run(spec())
    bank = events[-1]
    monkeypatch.setattr(craft_method, "MAX_MAP_VALUES", 3 * 8 * 8 - 1)
    before = fake.passes
    method = Craft(fake, cache, Settings())
    with pytest.raises(ResourceExhausted, match="3 maps of 64 values"):
        asyncio.run(method.maps(MapsSpec(bank.bank_id, images(1)[0], None), None))
    assert fake.passes == before
    monkeypatch.setattr(craft_method, "MAX_MAP_VALUES", 3 * 8 * 8)
    assert len(asyncio.run(method.maps(MapsSpec(bank.bank_id, images(1)[0], None), None)).maps) == 3


def test_a_concept_decomposes_at_the_earlier_layer_on_the_crops_it_marks_most():
    events, fake, cache = run(spec(images=images(8)))
    bank = events[-1]
    concept = bank.concepts[0].index
    decompose = DecomposeSpec("d", bank.bank_id, concept, images(8), None, rank=2, nb_design=8)
    before = fake.passes
    child_events, _, _ = run(decompose, fake, cache=cache)
    child = child_events[-1]
    assert child.layer == "f0" and child.parent_bank_id == bank.bank_id
    assert child.parent_concept == concept and child.rank == 2
    # The 1 / r of the 128 crops the concept marks most, each one image and one crop.
    assert child.images == child.crops == 43  # ceil(128 / 3): 1 / r of the crops
    assert child.g_passes == child.images and child.h_passes == child.images * 8 * 4 + 4
    assert fake.passes - before == child.g_passes + child.h_passes
    assert all(crop.width == 2 for c in child.concepts for crop in c.top_crops)
    wrong = DecomposeSpec("d", bank.bank_id, concept, images(8, seed=9), None, rank=2)
    with pytest.raises(InvalidArgument, match="digest"):
        run(wrong, fake, cache=cache)


@pytest.mark.parametrize(
    ("fake", "changes", "settings", "error", "words"),
    [
        (FakeOpenModel(BLACK_BOX), {}, None, FailedPrecondition, "activations, interventions"),
        # Declares the capabilities but not every tensor CRAFT sends.
        (FakeOpenModel(NO_REPLACE), {}, None, FailedPrecondition, "not declare REPLACE_LAYER"),
        (FakeOpenModel(), {"rank": 64, "images": images(1)}, None, InvalidArgument, "rank 64"),
        (FakeOpenModel(), {"layer": "f9"}, None, InvalidArgument, "f0, f1"),
        (
            FakeOpenModel(),
            {},
            Settings(limits={"max_concept_passes": 100}),
            ResourceExhausted,
            "max_concept_passes",
        ),
        (FakeOpenModel(), {"patch_size": 9}, None, InvalidArgument, "patch_size"),
    ],
)
def test_refusals_come_before_any_forward_pass(fake, changes, settings, error, words):
    with pytest.raises(error, match=words):
        run(spec(**changes), fake, settings)
    assert fake.passes == 0


def test_negative_activations_are_refused_naming_a_layer_that_works():
    fake = FakeOpenModel(signed=True)
    with pytest.raises(FailedPrecondition, match="negative activations.*f1"):
        run(spec(layer="f0"), fake)
    assert fake.passes <= 4 + 1  # the images' g passes and one probe of f1


@pytest.mark.parametrize(("rank", "nb_design"), [(10, 16), (10, 32), (5, 8)])
def test_no_concept_is_left_out_of_the_sobol_design(rank, nb_design):
    """Unscrambled, factor 8 of r = 10 at N = 16 has A == B: its index would be 0."""
    masks = scoring.importance_masks(nb_design, rank, seed=0)
    a, b = masks[:nb_design], masks[nb_design : 2 * nb_design]
    assert (((a - b) ** 2).mean(axis=0) > 0.03).all()
    assert np.array_equal(masks, scoring.importance_masks(nb_design, rank, seed=0))


def test_the_crops_go_through_g_one_batch_at_a_time(monkeypatch):
    """A small patch_size makes many crops: their model inputs are never all alive at once
    (the memory estimate counts one batch of them), and the bank is the same."""
    live, peak = [0], [0]
    model_input = Craft._model_input

    def counted(classifier, pixels, size):
        array = model_input(classifier, pixels, size)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(array, lambda: live.__setitem__(0, live[0] - 1))
        return array

    small_batches = FakeOpenModel(dataclasses.replace(OPEN, max_batch_size=4))
    whole, _, _ = run(spec(patch_size=2), FakeOpenModel())
    monkeypatch.setattr(Craft, "_model_input", staticmethod(counted))
    events, fake, _ = run(spec(patch_size=2), small_batches)
    bank = events[-1]
    assert bank.crops == 4 * 16 and fake.passes == bank.g_passes + bank.h_passes
    # The images' own inputs, one batch of crops and the one before it (bound until the
    # next is built): not the 64 crops at once.
    assert peak[0] <= 4 + 2 * 4
    assert np.allclose(bank.basis, whole[-1].basis)
