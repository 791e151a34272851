"""Adaptive paths, decisions, detected output kinds, regions and no-op edits in the
orchestration, with the fake backend of test_server_orchestration (pure logic)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from propscope_server.cache import InMemoryArtefactCache
from propscope_server.config import PreprocessingConfig, Settings
from propscope_server.domain import Accepted, EditorRef, Progress, PropertyOutcome, PropertySpec
from propscope_server.editor_contract import EditorSchema
from propscope_server.errors import FailedPrecondition, InvalidArgument, NotFound
from propscope_server.orchestration.explain import Explainer
from propscope_server.scoring.property_gradient import Decision
from tests.unit.test_server_orchestration import CLASSIFIER, EDITOR, FakeBackend, spec


class LateJumpBackend(FakeBackend):
    """The class flips only when the brightening edit is nearly complete: a jump in
    the last tenth of the path, as a desaturation that bites at the very end."""

    def __init__(self, probabilities: bool = False) -> None:
        super().__init__()
        self.probabilities = probabilities
        self.strengths_asked: list[int] = []

    async def edit(self, editor, image, strengths, parameters, seeds, deadline, progress=None):
        self.strengths_asked.append(len(strengths))
        return await super().edit(editor, image, strengths, parameters, seeds, deadline)

    async def classify(self, model, batch):
        brightness = batch.reshape(len(batch), -1).mean(axis=1) / 255.0
        logit = 60.0 * (brightness - 0.95)
        logits = np.stack([np.zeros_like(logit), logit], axis=1)
        if self.probabilities:
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            return exp / exp.sum(axis=1, keepdims=True)
        return logits


async def explain(backend, request, classifier=CLASSIFIER) -> list:
    async def describe(name, version="", deadline=None):
        return classifier if name == "clf" else await FakeBackend.describe(backend, name)

    backend.describe = describe
    explainer = Explainer(backend, InMemoryArtefactCache(100_000_000), Settings())
    plan = await explainer.plan(request)
    return [event async for event in explainer.run(plan)]


def outcome_of(events: list) -> PropertyOutcome:
    (outcome,) = [e for e in events if isinstance(e, PropertyOutcome)]
    return outcome


async def test_a_late_jump_cannot_decide_at_fixed_n_and_says_so():
    events = await explain(LateJumpBackend(), dataclasses.replace(spec(), max_steps=10))
    outcome = outcome_of(events)
    assert outcome.score.decision is Decision.CANNOT_REACH_ALPHA
    assert not outcome.score.relevant and outcome.score.probability_change > 0.5
    assert "N = 10" in outcome.score.decision_detail


async def test_an_adaptive_path_doubles_until_the_test_decides():
    backend = LateJumpBackend()
    request = dataclasses.replace(spec(), adaptive=True, max_steps=80)
    events = await explain(backend, request)
    outcome = outcome_of(events)
    assert outcome.score.decision is Decision.RELEVANT, outcome.score.decision_detail
    assert backend.strengths_asked[0] == 10 and outcome.steps == backend.strengths_asked[-1] > 10
    assert backend.strengths_asked == [10 * 2**k for k in range(len(backend.strengths_asked))]
    assert outcome.edits == sum(backend.strengths_asked)
    assert len(outcome.samples[0].prediction_curve) == outcome.steps + 1
    accepted = events[0]
    assert isinstance(accepted, Accepted) and accepted.adaptive and accepted.max_steps == 80


async def test_an_adaptive_paths_edit_progress_grows_its_total_with_each_extension():
    events = await explain(
        LateJumpBackend(), dataclasses.replace(spec(), adaptive=True, max_steps=40)
    )
    progress = [
        (e.completed, e.total) for e in events if isinstance(e, Progress) and e.stage == "edit"
    ]
    assert progress == [(0, 10), (10, 10), (10, 30), (30, 30), (30, 70), (70, 70)]
    assert outcome_of(events).edits == 70


async def test_an_adaptive_path_stops_at_max_steps_and_keeps_the_reason():
    backend = LateJumpBackend()
    events = await explain(backend, dataclasses.replace(spec(), adaptive=True, max_steps=20))
    outcome = outcome_of(events)
    assert backend.strengths_asked == [10, 20]
    assert outcome.steps == 20


async def test_a_property_that_decides_at_once_is_not_extended():
    backend = LateJumpBackend()
    request = dataclasses.replace(spec(), adaptive=True, max_steps=80, min_probability_change=1.0)
    outcome = outcome_of(await explain(backend, request))
    assert outcome.score.decision is Decision.CHANGE_TOO_SMALL
    assert backend.strengths_asked == [10]


async def test_an_undeclared_output_kind_is_detected_and_said():
    undeclared = dataclasses.replace(CLASSIFIER, preprocessing=PreprocessingConfig())
    for probabilities, kind in ((True, "probabilities"), (False, "logits")):
        events = await explain(LateJumpBackend(probabilities), spec(), undeclared)
        accepted = events[0]
        assert accepted.preprocessing.output_kind == kind
        assert "output_kind: detected from the outputs" in accepted.preprocessing_sources
        assert any("declares no output kind" in w for w in accepted.warnings)


async def test_probabilities_and_their_logits_give_the_same_change():
    undeclared = dataclasses.replace(CLASSIFIER, preprocessing=PreprocessingConfig())
    changes = []
    for probabilities in (True, False):
        outcome = outcome_of(await explain(LateJumpBackend(probabilities), spec(), undeclared))
        changes.append(outcome.score.probability_change)
    assert abs(changes[0] - changes[1]) < 1e-9


async def test_an_edit_that_changes_nothing_fails_the_property_clearly():
    class NoOp(FakeBackend):
        async def edit(self, editor, image, strengths, parameters, seeds, deadline, progress=None):
            return np.stack([np.stack([image] * len(strengths))] * len(seeds))

    outcome = outcome_of(await explain(NoOp(), spec()))
    assert isinstance(outcome.error, FailedPrecondition)
    assert "equal to the original" in str(outcome.error)


async def test_a_region_confines_the_edit_to_its_pixels():
    region = np.zeros((8, 8), np.float32)
    region[2:5, 3:6] = 1.0
    request = spec()
    prop = dataclasses.replace(request.properties[0], region=region)
    request = dataclasses.replace(request, properties=(prop,), return_path_images=True)
    outcome = outcome_of(await explain(FakeBackend(), request))
    path = outcome.samples[0].path
    changed = np.any(path != path[:1], axis=(0, 3))
    assert changed.any() and not changed[region == 0].any()


async def test_the_requests_own_warnings_come_first_in_accepted():
    cut_short = "adaptive paths can grow only to N = 10, not the default 80"
    events = await explain(LateJumpBackend(), dataclasses.replace(spec(), warnings=(cut_short,)))
    assert events[0].warnings == (cut_short,)


CHOOSY_EDITOR = dataclasses.replace(
    EDITOR,
    editor_schema=EditorSchema.from_json(
        '[{"name": "operation", "type": "choice", "choices": ["hue", "scale"]},'
        ' {"name": "num_inference_steps", "type": "int", "default": "10", "minimum": 1}]'
    ),
)


async def plan_with(describe, editor: EditorRef) -> None:
    """Plans a request whose second property is edited by `editor`."""
    backend = LateJumpBackend()

    async def described(name, version="", deadline=None):
        return CLASSIFIER if name == "clf" else await describe(name)

    backend.describe = described
    provided = PropertySpec(name="given", provided_path=(np.zeros((8, 8, 3), np.uint8),) * 10)
    request = dataclasses.replace(
        spec(), properties=(provided, PropertySpec(name="hue", editor=editor))
    )
    await Explainer(backend, InMemoryArtefactCache(1000), Settings()).plan(request)


@pytest.mark.parametrize(
    ("parameters", "field", "needle"),
    [
        ({"operaton": "hue"}, "'operaton'", "unknown parameter(s) 'operaton' (did you mean"),
        ({"operation": "hu"}, "'operation'", "got 'hu' (did you mean 'hue'?)"),
        ({"operation": "hue", "num_inference_steps": "0"}, "'num_inference_steps'", ">= 1"),
        ({}, "'operation'", "'operation' is required"),
    ],
)
async def test_an_editor_parameter_refusal_names_the_parameters_field(parameters, field, needle):
    async def describe(name):
        return CHOOSY_EDITOR

    with pytest.raises(InvalidArgument) as info:
        await plan_with(describe, EditorRef("ed", parameters=parameters))
    assert info.value.field == f"properties[1].editor.parameters[{field}]"
    assert needle in str(info.value)


async def test_an_editor_typo_names_the_property_and_its_model_field():
    async def describe(name):
        raise NotFound(f"model {name!r} is not served by Triton; did you mean 'ed'?")

    with pytest.raises(NotFound) as info:
        await plan_with(describe, EditorRef("edd"))
    assert info.value.field == "properties[1].editor.model"
    assert str(info.value).startswith("property 'hue' (properties[1].editor.model): model 'edd'")
