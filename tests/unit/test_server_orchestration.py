"""The orchestration's control flow with a fake backend (pure logic; the real
Triton path is covered by tests/integration)."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from propscope_server.backends.triton import ModelDescription, Tensor
from propscope_server.cache import InMemoryArtefactCache
from propscope_server.config import PreprocessingConfig, Settings
from propscope_server.domain import (
    ClassifierRef,
    Done,
    EditorRef,
    ExplainSpec,
    Progress,
    PropertyOutcome,
    PropertySpec,
)
from propscope_server.editor_contract import EditorSchema
from propscope_server.errors import BackendError, FailedPrecondition, Unavailable
from propscope_server.orchestration.explain import EditProgress, Explainer, sample_seed

CLASSIFIER = ModelDescription(
    name="clf",
    version="1",
    versions=("1",),
    role="classifier",
    inputs=(Tensor("IMAGE", "UINT8", [8, 8, 3]),),
    outputs=(Tensor("LOGITS", "FP32", [2]),),
    max_batch_size=64,
    preprocessing=PreprocessingConfig(output_kind="logits"),
)
EDITOR = ModelDescription(
    name="ed",
    version="1",
    versions=("1",),
    role="editor",
    inputs=(),
    outputs=(),
    max_batch_size=0,
    editor_schema=EditorSchema.from_json('[{"name": "mode", "type": "string", "default": "ok"}]'),
)


class FakeBackend:
    """Edits brighten the image; the classifier's logit for class 1 is the mean brightness."""

    def __init__(self, classify_error: Exception | None = None, nan: bool = False) -> None:
        self.classify_error = classify_error
        self.nan = nan
        self.edit_calls: list[list[int]] = []  # the seeds of each editor call
        self.readiness_checked: list[str] = []

    async def describe(self, name: str, version: str = "", deadline=None) -> ModelDescription:
        return {"clf": CLASSIFIER, "ed": EDITOR}[name]

    async def require_ready(self, model, deadline) -> None:
        self.readiness_checked.append(model.name)

    async def edit(self, editor, image, strengths, parameters, seeds, deadline, progress=None):
        self.edit_calls.append(list(seeds))
        if '"fail"' in parameters:
            raise BackendError("editor broke")
        for done in range(1, len(seeds) if progress else 0):  # a unit per seed, as procedural's
            progress(done, len(seeds))
        path = np.stack([np.clip(image + int(255 * s), 0, 255).astype(np.uint8) for s in strengths])
        return np.stack([path] * len(seeds))

    async def infer(self, model, inputs, outputs, deadline):
        return {outputs[0]: await self.classify(model, inputs[model.inputs[0].name])}

    async def classify(self, model, batch):
        if self.classify_error:
            raise self.classify_error
        brightness = batch.reshape(len(batch), -1).mean(axis=1) / 255.0
        logits = np.stack([np.zeros_like(brightness), 8 * (brightness - 0.5)], axis=1)
        return np.full_like(logits, np.nan) if self.nan else logits


def spec(samples: int = 1, mode: str = "ok", properties: int = 1) -> ExplainSpec:
    return ExplainSpec(
        request_id="r",
        image=np.zeros((8, 8, 3), np.uint8),
        classifier=ClassifierRef(name="clf"),
        properties=tuple(
            PropertySpec(name=f"p{i}", editor=EditorRef("ed", parameters={"mode": mode}))
            for i in range(properties)
        ),
        steps=10,
        samples=samples,
        seed=0,
        permutations=500,
        alpha=0.01,
        min_probability_change=0.05,
        return_path_images=False,
    )


async def run(backend: FakeBackend, request: ExplainSpec) -> list:
    explainer = Explainer(backend, InMemoryArtefactCache(10_000_000), Settings())
    plan = await explainer.plan(request)
    return [event async for event in explainer.run(plan)]


async def test_a_brightening_path_is_significant():
    backend = FakeBackend()
    events = await run(backend, spec(properties=2))
    assert sorted(backend.readiness_checked) == ["clf", "ed"]  # each model once
    outcomes = [e for e in events if isinstance(e, PropertyOutcome)]
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert outcome.error is None
        assert outcome.score.significant and outcome.score.prediction_flipped


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("odd shape")])
async def test_an_unexpected_error_fails_the_property_not_the_stream(error):
    events = await asyncio.wait_for(run(FakeBackend(classify_error=error), spec(properties=2)), 5)
    outcomes = [e for e in events if isinstance(e, PropertyOutcome)]
    assert [o.error for o in outcomes] == [error, error]
    assert isinstance(events[-1], Done) and events[-1].properties_failed == 2


async def test_non_finite_classifier_outputs_fail_the_property():
    events = await run(FakeBackend(nan=True), spec())
    (outcome,) = [e for e in events if isinstance(e, PropertyOutcome)]
    assert isinstance(outcome.error, BackendError)
    assert "non-finite" in str(outcome.error)


async def test_all_samples_of_a_property_are_edited_in_one_call():
    backend = FakeBackend()
    events = await run(backend, spec(samples=3, properties=2))
    outcomes = [e for e in events if isinstance(e, PropertyOutcome)]
    assert all(o.error is None and o.cache_misses == 3 for o in outcomes)
    assert [len(seeds) for seeds in backend.edit_calls] == [3, 3]
    assert len({tuple(seeds) for seeds in backend.edit_calls}) == 1  # same sample seeds


async def test_only_the_samples_the_cache_lacks_are_edited():
    backend = FakeBackend()
    explainer = Explainer(backend, InMemoryArtefactCache(10_000_000), Settings())
    fewer = await explainer.plan(spec(samples=2))
    [event async for event in explainer.run(fewer)]
    more = await explainer.plan(spec(samples=5))
    events = [event async for event in explainer.run(more)]
    (outcome,) = [e for e in events if isinstance(e, PropertyOutcome)]
    assert (outcome.cache_hits, outcome.cache_misses) == (2, 3)
    assert backend.edit_calls[1] == [sample_seed(0, s) for s in (2, 3, 4)]


async def test_a_failed_editor_call_fails_the_property():
    backend = FakeBackend()
    events = await asyncio.wait_for(run(backend, spec(samples=3, mode="fail")), 5)
    (outcome,) = [e for e in events if isinstance(e, PropertyOutcome)]
    assert isinstance(outcome.error, BackendError)
    assert len(backend.edit_calls) == 1


async def test_a_classifier_without_batching_is_refused_before_any_work():
    backend = FakeBackend()
    unbatched = dataclasses.replace(CLASSIFIER, max_batch_size=0)
    backend.describe = lambda name, version="", deadline=None: asyncio.sleep(0, unbatched)
    explainer = Explainer(backend, InMemoryArtefactCache(10_000_000), Settings())
    with pytest.raises(FailedPrecondition, match="max_batch_size 0"):
        await explainer.plan(spec())
    assert backend.edit_calls == []


async def test_triton_unreachable_fails_the_call_not_one_property():
    backend = FakeBackend(classify_error=Unavailable("Triton is unreachable"))
    with pytest.raises(Unavailable):
        await asyncio.wait_for(run(backend, spec(properties=3)), 5)


def edit_progress(events: list) -> list[tuple[int, int]]:
    return [(e.completed, e.total) for e in events if isinstance(e, Progress) and e.stage == "edit"]


async def test_edit_progress_counts_images_as_the_cache_answers_and_the_editor_works():
    explainer = Explainer(FakeBackend(), InMemoryArtefactCache(10_000_000), Settings())
    one = [event async for event in explainer.run(await explainer.plan(spec(samples=1)))]
    three = [event async for event in explainer.run(await explainer.plan(spec(samples=3)))]
    again = [event async for event in explainer.run(await explainer.plan(spec(samples=3)))]
    assert edit_progress(one) == [(0, 10), (10, 10)]
    # sample 0 is cached; the editor reports the first of the two others done
    assert edit_progress(three) == [(10, 30), (20, 30), (30, 30)]
    assert edit_progress(again) == [(30, 30)]  # all cached: done at once
    progress = [e for e in three if isinstance(e, Progress)]
    assert [e.stage for e in progress] == ["edit", "edit", "edit", "classify"]


@pytest.mark.parametrize(
    ("reports", "before_the_answer"),
    [
        ([(3, 2)], [(0, 10), (5, 10)]),  # more units than in all: the last but one
        ([(2, 2)], [(0, 10), (5, 10)]),  # all units: the answer is the last
        ([(1, 2), (-1, 2)], [(0, 10), (5, 10)]),  # never backwards
        ([(1, 0)], [(0, 10)]),  # no units in all: nothing before the answer
    ],
)
def test_an_editors_reports_never_reach_or_pass_the_final_event(reports, before_the_answer):
    events = []
    progress = EditProgress(events.append, "hue", 0, 10)
    progress.report(0)
    report = progress.editor_reports(0, 10)
    for units, total in reports:
        report(units, total)
    assert edit_progress(events) == before_the_answer
    progress.report(10)
    assert edit_progress(events) == [*before_the_answer, (10, 10)]
