"""Interactions at the gateway, pure logic: every refusal of the request (naming its
field and the fix), defaults, InteractionDesign, the events' messages, the memory
estimate, and the composition with a fake backend (prefixes shared, the order of
edits, regions, the composed-image cache). The real stack is
tests/integration/test_interactions.py."""

from __future__ import annotations

import asyncio
import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from propscope.v1 import attribution_pb2 as apb
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import interactions_pb2 as ipb
from propscope_server.api import memory
from propscope_server.api.convert_interactions import (
    design_response,
    design_rows,
    design_spec,
    interactions_event,
    interactions_spec,
)
from propscope_server.backends.triton import ModelDescription, Tensor
from propscope_server.cache import InMemoryArtefactCache
from propscope_server.config import Limits, PreprocessingConfig, Settings
from propscope_server.domain import ClassifierRef, EditorRef, PropertySpec
from propscope_server.editor_contract import EditorSchema
from propscope_server.errors import BackendError, FailedPrecondition, InvalidArgument
from propscope_server.interactions_domain import (
    InteractionsAccepted,
    InteractionsOutcome,
    InteractionsProgress,
    InteractionsSpec,
)
from propscope_server.methods import BY_NAME
from propscope_server.methods.base import Capability
from propscope_server.methods.interactions import Composer, Interactions, effective
from propscope_server.scoring.interactions import (
    IndicesEstimate,
    Interval,
    edit_schedule,
    estimate_indices,
    interaction_design,
)

SIDE = 8


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = np.full((SIDE, SIDE, 3), 100, np.uint8)
PNG = png(IMAGE)


def editor(name: str, **parameters: str) -> pb.Property:
    return pb.Property(
        name=name, editor=pb.EditorIntervention(model="ed", parameters=parameters or {"op": "add"})
    )


def request(**fields) -> ipb.InteractionsRequest:
    values = dict(
        image=PNG,
        model=pb.ModelRef(name="clf"),
        properties=[editor("a"), editor("b")],
        design_size=8,
    )
    values.update(fields)
    return ipb.InteractionsRequest(**values)


def refused(message: ipb.InteractionsRequest, limits: Limits | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        interactions_spec(message, limits or Limits())
    return caught.value


def test_defaults_are_filled_in_and_the_properties_keep_their_order():
    spec = interactions_spec(
        request(design_size=0, properties=[editor("z"), editor("a")]), Limits()
    )
    assert (spec.design_size, spec.bootstrap, spec.confidence) == (32, 1000, 0.95)
    assert spec.target_score == "probability"  # unspecified: the probability, unlike Attribute
    assert spec.names == ("z", "a") and spec.pair is None
    assert spec.properties[0].editor.parameters == {"op": "add"}
    assert spec.request_id  # made up when empty
    logit = interactions_spec(request(target_score=apb.TARGET_SCORE_LOGIT), Limits())
    assert logit.target_score == "logit"


PATH_IMAGE = pb.ProvidedPath(images=[PNG])
REGION = pb.Region(box=pb.Box(left=0, top=0, right=0.5, bottom=0.5))


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"model": pb.ModelRef()}, "model.name", "model.name is required"),
        ({"properties": [editor("a")]}, "properties", "at least two properties"),
        ({"properties": []}, "properties", "at least two properties"),
        ({"properties": [editor("a"), editor("a")]}, "properties", "repeated: a"),
        ({"properties": [editor("a"), pb.Property()]}, "properties[1].name", "needs a name"),
        ({"design_size": 48}, "design_size", "use 32 or 64"),
        ({"design_size": 2}, "design_size", "use at least 4"),
        ({"design_size": 2048}, "design_size", "use at most 1024"),
        ({"second_order_pair": ["a"]}, "second_order_pair", "names 1 properties"),
        ({"second_order_pair": ["a", "c"]}, "second_order_pair", "'c', which is no property"),
        ({"second_order_pair": ["a", "a"]}, "second_order_pair", "'a' twice"),
        ({"bootstrap": 5}, "bootstrap", "bootstrap must be in 100..100000"),
        ({"bootstrap": 10**6}, "bootstrap", "bootstrap must be in 100..100000"),
        ({"confidence": 1.5}, "confidence", "confidence must be in (0, 1)"),
        ({"confidence": float("nan")}, "confidence", "confidence must be in (0, 1)"),
        ({"target_score": 99}, "target_score", "not a known value"),
        (
            {"properties": [editor("a"), pb.Property(name="b", provided_path=PATH_IMAGE)]},
            "properties[1].provided_path",
            "cannot compose",
        ),
        (
            {"properties": [editor("a"), pb.Property(name="b")]},
            "properties[1].editor",
            "has no editor",
        ),
        (
            {"provided_design": ipb.ProvidedDesign(images=[PNG])},
            "properties[0].editor",
            "carry names only",
        ),
        (
            {
                "properties": [pb.Property(name="a"), pb.Property(name="b", region=REGION)],
                "provided_design": ipb.ProvidedDesign(images=[PNG]),
            },
            "properties[1].region",
            "carry names only",
        ),
        (
            {
                "properties": [pb.Property(name="a"), pb.Property(name="b")],
                "provided_design": ipb.ProvidedDesign(images=[PNG] * 3),
            },
            "provided_design.images",
            "has 32 rows",
        ),
        (
            {
                "properties": [pb.Property(name="a"), pb.Property(name="b")],
                "provided_design": ipb.ProvidedDesign(
                    images=[PNG] * 31 + [png(np.zeros((4, 4, 3), np.uint8))]
                ),
            },
            "provided_design.images[31]",
            "the image's size 8x8",
        ),
    ],
)
def test_each_refusal_names_its_field_and_the_fix(fields, field, needle):
    error = refused(request(**fields))
    assert error.field == field, error
    assert needle in str(error), error


def test_a_design_over_the_images_limit_names_the_design_size_that_fits():
    # 3 properties: N (P + 2) = 5 N rows; 100 images fit N = 16 (80), not 32.
    message = request(properties=[editor("a"), editor("b"), editor("c")], design_size=64)
    error = refused(message, Limits(max_interaction_images=100))
    assert error.field == "design_size"
    assert "320 composed images" in str(error) and "max_interaction_images of 100" in str(error)
    assert "use design_size 16 (the largest that fits)" in str(error)


def test_the_edit_budget_counts_shared_prefixes_and_names_the_size_that_fits():
    design = interaction_design(2, 32, 0, None)
    edits = sum(stage.edits for stage in edit_schedule(np.unique(design.rows, axis=0)))
    # Stage 1 edits A's and B's first strengths (2 N); stage 2 every distinct row.
    assert edits == 2 * 32 + 4 * 32
    error = refused(request(design_size=32), Limits(max_edits=edits - 1))
    assert error.field == "design_size"
    assert f"{edits} edited images" in str(error) and "use design_size 16" in str(error)
    interactions_spec(request(design_size=32), Limits(max_edits=edits))


def test_a_design_over_the_pixel_budget_names_the_size_that_fits_and_a_smaller_image():
    error = refused(request(design_size=32), Limits(max_path_pixels=SIDE * SIDE * 100))
    assert error.field == "design_size"
    assert "max_path_pixels" in str(error) and "(the largest that fits), a smaller image" in str(
        error
    )
    rows = refused(request(design_size=64), Limits(max_interaction_images=100))
    assert "a smaller image" not in str(rows)  # a row budget: the image's size does not help


def test_an_image_too_large_for_even_the_smallest_design_names_the_image():
    error = refused(request(), Limits(max_path_pixels=SIDE * SIDE * 10))
    assert error.field == "image"
    assert "send a smaller image" in str(error)


def test_forward_passes_over_the_limit_are_refused_naming_the_size():
    error = refused(request(design_size=64), Limits(max_forward_passes=200))
    assert error.field == "design_size" and "max_forward_passes of 200" in str(error)
    assert "use design_size 32" in str(error)


def test_a_provided_design_is_decoded_row_by_row_with_names_only():
    rows = 4 * 8
    images = [png(np.full((SIDE, SIDE, 3), i, np.uint8)) for i in range(rows)]
    spec = interactions_spec(
        request(
            properties=[pb.Property(name="a"), pb.Property(name="b")],
            provided_design=ipb.ProvidedDesign(images=images),
        ),
        Limits(),
    )
    assert spec.provided_design is not None and len(spec.provided_design) == rows
    assert spec.provided_design[5][0, 0, 0] == 5
    assert all(p.editor is None for p in spec.properties)


def test_interaction_design_answers_the_rows_interactions_uses():
    spec = design_spec(
        ipb.InteractionDesignRequest(properties=3, design_size=8, second_order_pair=[2, 0], seed=5),
        Limits(),
    )
    response = design_response(design_rows(spec))
    assert len(response.rows) == 8 * 6
    assert list(response.row_kinds[::8]) == ["A", "B", "C1", "C2", "C3", "C13"]
    design = interaction_design(3, 8, 5, (0, 2))
    assert np.array_equal(
        np.array([list(r.strengths) for r in response.rows], np.float32), design.rows
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"properties": 1}, "properties"),
        ({"properties": 2, "design_size": 12}, "design_size"),
        ({"properties": 2, "second_order_pair": [0, 0]}, "second_order_pair"),
        ({"properties": 2, "second_order_pair": [0, 2]}, "second_order_pair"),
        ({"properties": 2, "second_order_pair": [0]}, "second_order_pair"),
    ],
)
def test_interaction_design_refuses_what_interactions_would(fields, field):
    with pytest.raises(InvalidArgument) as caught:
        design_spec(ipb.InteractionDesignRequest(**fields), Limits())
    assert caught.value.field == field


def interval(value: float) -> Interval:
    return Interval(value, value - 0.1, value + 0.1)


def test_the_events_messages_carry_every_figure():
    accepted = interactions_event(
        "r",
        InteractionsAccepted("1", ("a", "b"), 8, 1000, 0.95, "log_odds", 24, 40, 25, ("w",)),
    ).accepted
    assert list(accepted.composition_order) == ["a", "b"]
    assert accepted.target_score == apb.TARGET_SCORE_LOG_ODDS
    assert (accepted.planned_images, accepted.planned_edits) == (24, 40)
    progress = interactions_event("r", InteractionsProgress("edit", 3, 40)).progress
    assert (progress.stage, progress.completed, progress.total) == ("edit", 3, 40)
    estimate = IndicesEstimate(
        first=(interval(0.5), interval(0.2)),
        total=(interval(0.7), interval(0.3)),
        interaction=(interval(0.2), interval(0.1)),
        second_order=interval(0.15),
        share=interval(0.3),
        significant=True,
        variance=0.04,
        mean=0.5,
        warnings=("estimator",),
    )
    event = interactions_event(
        "r",
        InteractionsOutcome(
            estimate, ("a", "b"), ("a", "b"), 1, "one", "probability", 20, 4, 40, 25, ("plan",)
        ),
    )
    result = event.result
    assert event.request_id == "r"
    assert [i.property_name for i in result.indices] == ["a", "b"]
    assert result.indices[0].total_order.value == pytest.approx(0.7)
    assert result.indices[1].interaction.ci_high == pytest.approx(0.2)
    assert list(result.second_order.property_names) == ["a", "b"]
    assert result.second_order.index.value == pytest.approx(0.15)
    assert result.interaction_significant and result.interaction_share.ci_low == pytest.approx(0.2)
    assert (result.cache_hits, result.cache_misses, result.edits) == (20, 4, 40)
    assert list(result.warnings) == ["estimator", "plan"]
    assert result.target_label == "one" and result.target_score == apb.TARGET_SCORE_PROBABILITY
    assert not result.negligible_variance
    flat = interactions_event(
        "r",
        InteractionsOutcome(
            replace(estimate, significant=False, variance=5e-11, negligible_variance=True),
            ("a", "b"),
            ("a", "b"),
            1,
            "one",
            "probability",
            20,
            4,
            40,
            25,
            (),
        ),
    ).result
    assert flat.negligible_variance and not flat.interaction_significant


def test_the_registry_serves_interactions_with_editors():
    info = BY_NAME["interactions"]
    assert info.rpc == "Interactions"
    assert info.needs == Capability.FORWARD | Capability.EDITORS


def test_the_memory_estimate_grows_with_the_design():
    settings = Settings()
    small = memory.estimate_bytes(request(design_size=8), settings)
    large = memory.estimate_bytes(request(design_size=256), settings)
    assert large > small > memory.REQUEST_OVERHEAD_BYTES
    # 4 x 256 rows composed of an 8 x 8 image: at least the composed images' bytes.
    assert large - small >= memory.COMPOSED_BYTES_PER_PIXEL * 2 * 4 * (256 - 8) * SIDE * SIDE


def test_trailing_zero_strengths_are_their_prefixes_image():
    assert effective((0.5, 0.0, 0.0)) == (0.5,)
    assert effective((0.0, 0.5)) == (0.0, 0.5)
    assert effective((0.0,)) == ()


# The composition through a fake backend.

CLASSIFIER = ModelDescription(
    name="clf",
    version="1",
    versions=("1",),
    role="classifier",
    inputs=(Tensor("IMAGE", "UINT8", [SIDE, SIDE, 3]),),
    outputs=(Tensor("LOGITS", "FP32", [2]),),
    max_batch_size=16,
    preprocessing=PreprocessingConfig(output_kind="logits"),
)
OTHER = ModelDescription(**{**CLASSIFIER.__dict__, "name": "clf2"})
EDITOR = ModelDescription(
    name="ed",
    version="1",
    versions=("1",),
    role="editor",
    inputs=(),
    outputs=(),
    max_batch_size=0,
    editor_schema=EditorSchema.from_json('[{"name": "op", "type": "string", "default": "add"}]'),
)


class FakeBackend:
    """Editors that do not commute: "add" raises channel 0 by 100 s, "scale" multiplies it
    by 1 - s, "none" changes nothing. The classifier's logit of class 1 is channel 0's
    mean over 255 (class 0's is 0.5), so the edits move the prediction."""

    def __init__(self) -> None:
        self.edit_calls: list[tuple[str, list[float]]] = []
        self.classified = 0

    async def describe(self, name: str, version: str = "", deadline=None) -> ModelDescription:
        return {"clf": CLASSIFIER, "clf2": OTHER, "ed": EDITOR}[name]

    async def require_ready(self, model, deadline) -> None:
        return None

    async def edit(self, editor, image, strengths, parameters, seeds, deadline, progress=None):
        op = json.loads(parameters)["op"]
        self.edit_calls.append((op, [float(s) for s in strengths]))
        if op == "fail":
            raise BackendError("editor broke")
        return np.stack([edit(op, image, float(s)) for s in strengths])[None]

    async def infer(self, model, inputs, outputs, deadline):
        batch = inputs[model.inputs[0].name]
        self.classified += len(batch)
        red = batch[..., 0].reshape(len(batch), -1).mean(axis=1) / 255.0
        return {outputs[0]: np.stack([np.full_like(red, 0.5), red], axis=1)}


def edit(op: str, image: np.ndarray, strength: float) -> np.ndarray:
    out = image.astype(np.float64)
    if op == "add":
        out[..., 0] += 100 * strength
    elif op == "scale":
        out[..., 0] *= 1 - strength
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def spec(
    ops: tuple[str, ...] = ("scale", "add"),
    model: str = "clf",
    region: np.ndarray | None = None,
    **fields,
) -> InteractionsSpec:
    values = dict(
        request_id="r",
        image=IMAGE,
        classifier=ClassifierRef(name=model, target_class=1),
        properties=tuple(
            PropertySpec(
                name=f"{op}{i}",
                editor=EditorRef("ed", parameters={"op": op}),
                region=region if i == 0 else None,
            )
            for i, op in enumerate(ops)
        ),
        design_size=8,
        pair=None,
        bootstrap=200,
        confidence=0.9,
        target_score="logit",
        seed=3,
    )
    values.update(fields)
    return InteractionsSpec(**values)


async def events_of(method: Interactions, request_spec: InteractionsSpec) -> list:
    plan = await method.plan(request_spec, None)
    return [event async for event in method.run(plan)]


async def test_rows_share_prefixes_compose_in_order_and_a_second_classifier_edits_nothing():
    backend = FakeBackend()
    method = Interactions(backend, InMemoryArtefactCache(50_000_000), Settings())
    events = await events_of(method, spec())
    accepted, outcome = events[0], events[-1]
    design = interaction_design(2, 8, 3, None)
    stages = edit_schedule(np.unique(design.rows, axis=0))
    assert len(backend.edit_calls) == sum(stage.editor_calls for stage in stages)
    assert accepted.planned_edits == outcome.edits == sum(stage.edits for stage in stages)
    assert accepted.planned_images == outcome.cache_misses == 4 * 8
    assert outcome.cache_hits == 0 and outcome.forward_passes == 4 * 8 + 1
    # Stage 1 is one call on the image with every distinct first strength.
    assert backend.edit_calls[0] == ("scale", sorted({float(s) for s in design.rows[:, 0]}))
    # Every row's image is edit 2 (edit 1 (image, s1), s2), whatever prefixes it shared.
    direct = [edit("add", edit("scale", IMAGE, a), b)[..., 0].mean() / 255 for a, b in design.rows]
    assert outcome.estimate == estimate_indices(
        design, np.array(direct), 200, 0.9, 3, outcome.composition_order
    )
    stages_seen = [e.stage for e in events if isinstance(e, InteractionsProgress)]
    assert stages_seen[0] == "edit" and stages_seen[-1] == "classify"

    calls, classified = len(backend.edit_calls), backend.classified
    again = (await events_of(method, spec(model="clf2")))[-1]
    assert len(backend.edit_calls) == calls  # no editor call
    assert (again.cache_hits, again.cache_misses, again.edits) == (32, 0, 0)
    assert backend.classified - classified == 32 + 1
    assert again.estimate == outcome.estimate


async def test_the_order_of_edits_is_the_request_order():
    backend = FakeBackend()
    method = Interactions(backend, InMemoryArtefactCache(50_000_000), Settings())
    scale_first = (await events_of(method, spec(("scale", "add"), design_size=64)))[-1]
    add_first = (await events_of(method, spec(("add", "scale"), design_size=64)))[-1]
    # Scale then add: red is 100 (1 - s1) + 100 s2, additive. Add then scale: (100 + 100 s1)
    # (1 - s2), whose product term makes the two properties interact.
    assert abs(scale_first.estimate.share.value) < 0.05
    assert add_first.estimate.share.value > 0.05
    assert add_first.composition_order == ("add0", "scale1")


async def test_a_region_keeps_its_edit_inside_and_is_part_of_the_key():
    backend = FakeBackend()
    cache = InMemoryArtefactCache(50_000_000)
    method = Interactions(backend, cache, Settings())
    region = np.zeros((SIDE, SIDE), np.float32)
    region[:, : SIDE // 2] = 1.0
    outcome = (await events_of(method, spec(("add", "add"), region=region)))[-1]
    assert outcome.cache_hits == 0
    # The whole-image run shares no composed image with the region's.
    whole = (await events_of(method, spec(("add", "add"))))[-1]
    assert whole.cache_hits == 0
    # With the first edit on half the image, the first property moves red half as much.
    first = outcome.estimate.first
    assert first[0].value < first[1].value


async def test_an_edit_that_changes_nothing_fails_naming_the_property():
    method = Interactions(FakeBackend(), InMemoryArtefactCache(50_000_000), Settings())
    with pytest.raises(FailedPrecondition) as caught:
        await events_of(method, spec(("add", "none")))
    assert caught.value.field == "properties[1]" and "'none1'" in str(caught.value)


async def test_an_edit_that_changes_nothing_is_refused_again_however_warm_the_cache():
    """Its images are not cached: cached, they once let the same request pass unchecked."""
    method = Interactions(FakeBackend(), InMemoryArtefactCache(50_000_000), Settings())
    for _ in range(2):
        with pytest.raises(FailedPrecondition) as caught:
            await events_of(method, spec(("none", "add")))
        assert caught.value.field == "properties[0]" and "'none0'" in str(caught.value)


async def test_a_failing_editor_ends_the_call_with_its_error_and_caches_nothing_after():
    backend = FakeBackend()
    cache = InMemoryArtefactCache(50_000_000)
    method = Interactions(backend, cache, Settings())
    with pytest.raises(BackendError, match="editor broke"):
        await events_of(method, spec(("add", "fail")))
    # The first stage's images were stored: a retry with a working second editor edits
    # only the second stage.
    calls = len(backend.edit_calls)
    outcome = (await events_of(method, spec(("add", "scale"))))[-1]
    assert backend.edit_calls[calls][0] == "scale"
    assert outcome.edits == outcome.cache_misses == 4 * 8


async def test_a_provided_design_is_classified_row_by_row_without_an_editor():
    backend = FakeBackend()
    method = Interactions(backend, InMemoryArtefactCache(50_000_000), Settings())
    design = interaction_design(2, 8, 3, (0, 1))
    images = tuple(edit("add", edit("scale", IMAGE, a), b) for a, b in design.rows)
    provided = spec(
        properties=(PropertySpec(name="scale0"), PropertySpec(name="add1")),
        provided_design=images,
        pair=(0, 1),
    )
    events = await events_of(method, provided)
    outcome = events[-1]
    assert backend.edit_calls == []
    assert events[0].planned_images == 5 * 8 and events[0].planned_edits == 0
    assert outcome.forward_passes == 5 * 8 + 1 and outcome.pair_names == ("scale0", "add1")
    assert outcome.estimate.second_order is not None
    composed = (await events_of(method, spec(pair=(0, 1))))[-1]
    # With two properties the pair's rows are B's: composed once, classified once.
    assert composed.cache_misses == 4 * 8
    assert composed.estimate == outcome.estimate


async def test_a_later_edits_region_keeps_the_previous_edits_output_outside():
    # Region on the second property: outside it the row's image is the first edit's output
    # (the edit's input), not the request's image, so the first property's effect survives.
    backend = FakeBackend()
    method = Interactions(backend, InMemoryArtefactCache(50_000_000), Settings())
    region = np.zeros((SIDE, SIDE), np.float32)
    region[:, : SIDE // 2] = 1.0
    request_spec = spec(
        ("add", "scale"),
        properties=(
            PropertySpec(name="add0", editor=EditorRef("ed", parameters={"op": "add"})),
            PropertySpec(
                name="scale1", editor=EditorRef("ed", parameters={"op": "scale"}), region=region
            ),
        ),
    )
    plan = await method.plan(request_spec, None)
    images, _, _ = await Composer(
        backend, InMemoryArtefactCache(50_000_000), Settings(), plan, lambda _: None
    ).compose()
    inside = region.astype(bool)[..., None]
    for row, image in zip(plan.rows, images, strict=True):
        first = edit("add", IMAGE, float(row[0]))
        np.testing.assert_array_equal(image, np.where(inside, edit("scale", first, row[1]), first))


async def test_cancelling_the_call_cancels_the_editor_calls_in_flight_and_starts_no_more():
    class Blocking(FakeBackend):
        """The second editor's calls never finish until cancelled."""

        def __init__(self) -> None:
            super().__init__()
            self.started = asyncio.Event()
            self.cancelled = 0

        async def edit(self, editor, image, strengths, parameters, seeds, deadline, progress=None):
            if json.loads(parameters)["op"] != "scale":
                return await super().edit(editor, image, strengths, parameters, seeds, deadline)
            self.edit_calls.append(("scale", [float(s) for s in strengths]))
            self.started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

    backend = Blocking()
    method = Interactions(backend, InMemoryArtefactCache(50_000_000), Settings())
    call = asyncio.create_task(events_of(method, spec(("add", "scale"))))
    await backend.started.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    started = len(backend.edit_calls)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(5):
        await asyncio.sleep(0)
    scale_calls = sum(1 for op, _ in backend.edit_calls if op == "scale")
    assert len(backend.edit_calls) == started
    assert backend.cancelled == scale_calls == Settings().interaction_concurrency
    assert backend.classified == 1  # the planning pass only: no row was classified
