"""EVA through the Attribute method and its API conversion, against a fake open model
whose network is linear, so that its margin bounds (and so the map) are exact: the
rows the gateway sends, the map, the cache, and every refusal before a bound row
(through the real Triton stack: tests/integration/test_eva.py)."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
from PIL import Image

from propscope.v1 import attribution_pb2 as apb
from propscope.v1 import explain_pb2 as pb
from propscope_server import domain, errors, methods
from propscope_server.api import convert_attribution
from propscope_server.backends.preprocessing import InputLayout
from propscope_server.cache import InMemoryArtefactCache
from propscope_server.config import Limits, PreprocessingConfig, Settings
from propscope_server.inference import ModelDescription, Tensor
from propscope_server.methods import eva as eva_method
from propscope_server.methods.attribution import Attribution
from propscope_server.open_contract import (
    BOUND,
    BOUND_ATTACK_PASSES,
    BOUND_CROWN,
    BOUND_OUTPUTS,
    CAPABILITIES_PARAMETER,
    OPTIONAL_INPUTS,
    Layer,
)
from propscope_server.orchestration.classifier import PlannedClassifier
from propscope_server.scoring import eva as scoring

SIZE, CLASSES = 8, 3
UNSUPPORTED = (
    "bound propagation does not support layer 'head.softmax' (torch.nn.Softmax); supported: "
    "Conv2d, Linear"
)


def open_model(capabilities: str = "activations,interventions,gradients,bounds", **changes):
    inputs = [Tensor("IMAGE", "UINT8", [SIZE, SIZE, 3])]
    inputs += [Tensor(n, OPTIONAL_INPUTS[n][0][5:], [-1], optional=True) for n in BOUND]
    outputs = [Tensor("LOGITS", "FP32", [CLASSES])] + [
        Tensor(n, "FP32", [-1]) for n in BOUND_OUTPUTS
    ]
    model = ModelDescription(
        name="linear",
        version="1",
        versions=("1",),
        role="classifier",
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        max_batch_size=5,
        parameters={CAPABILITIES_PARAMETER: capabilities},
        layers=(Layer("features.0", 4), Layer("features.1", 4)),
        class_labels=("zero", "one", "two"),
        preprocessing=PreprocessingConfig(output_kind="logits"),
    )
    return dataclasses.replace(model, **changes)


class LinearOpenModel:
    """logits = W x on the uint8 pixels (HWC); BOUND_MARGIN the exact max of
    (w_c - w_y) . x' over the box clip(x +- r, 0, 255); SAMPLED_MARGIN the centre's."""

    def __init__(self, model: ModelDescription, fail: str = "") -> None:
        self.model = model
        self.fail = fail
        self.weights = np.random.default_rng(0).normal(size=(CLASSES, SIZE * SIZE * 3))
        self.weights[:, : SIZE * SIZE * 3 // 2] *= 0.01  # the top half hardly matters
        self.calls: list[dict[str, np.ndarray]] = []

    async def describe(self, name, version, deadline):
        return self.model

    async def require_ready(self, model, deadline):
        return None

    async def infer(self, model, inputs, outputs, deadline):
        self.calls.append(inputs)
        x = inputs["IMAGE"].reshape(len(inputs["IMAGE"]), -1).astype(np.float64)
        answer = {"LOGITS": (x @ self.weights.T).astype(np.float32)}
        if "BOUND_RADIUS" not in inputs:
            return {name: answer[name] for name in outputs}
        if self.fail:
            raise errors.BackendError(f"model 'linear' failed: {self.fail}")
        radius = inputs["BOUND_RADIUS"].astype(np.float64)
        low, high = np.clip(x - radius, 0, 255), np.clip(x + radius, 0, 255)
        target = inputs["BOUND_CLASS"][:, 0]
        difference = self.weights[None] - self.weights[target][:, None]  # [rows, K, n]
        upper = np.maximum(difference * low[:, None], difference * high[:, None]).sum(-1)
        centre = np.einsum("rkn,rn->rk", difference, x)
        answer["BOUND_MARGIN"] = upper.astype(np.float32)
        answer["SAMPLED_MARGIN"] = centre.astype(np.float32)
        return {name: answer[name] for name in outputs}

    def bound_rows(self) -> dict[str, np.ndarray]:
        """Every BOUND input the method sent after the probe, concatenated."""
        calls = [c for c in self.calls if "BOUND_RADIUS" in c][1:]
        return {name: np.concatenate([c[name] for c in calls]) for name in BOUND}


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = np.random.default_rng(1).integers(20, 230, (SIZE, SIZE, 3), dtype=np.uint8)


def spec(method: domain.EvaSpec | None = None) -> domain.AttributeSpec:
    return domain.AttributeSpec(
        request_id="r",
        image=IMAGE,
        classifier=domain.ClassifierRef("linear", target_class=0),
        method=method or domain.EvaSpec(grid=4, samples=16),
        target_score="auto",
        perturbation=domain.PerturbationSpec(),
        seed=3,
    )


async def attribute(backend, method=None, cache=None):
    attribution = Attribution(backend, cache or InMemoryArtefactCache(1 << 20), Settings())
    plan = await attribution.plan(spec(method), None)
    return [event async for event in attribution.run(plan)]


async def test_the_map_is_how_much_each_held_cell_lowers_the_exact_bound():
    backend = LinearOpenModel(open_model())
    events = await attribute(backend)
    accepted, outcome = events[0], events[-1]
    assert isinstance(accepted, domain.AttributionAccepted)
    assert accepted.planned_forward_passes == 17
    assert accepted.planned_forward_passes_total == 17 + 2  # the original and the probe
    assert "verified from the input" in accepted.perturbation_description
    progress = [e for e in events if isinstance(e, domain.PassesProgress)]
    assert progress[-1] == domain.PassesProgress(17, 17)
    found = outcome.eva
    assert found.guaranteed and found.bound == "crown" and found.bound_passes == 17
    assert found.epsilon_input == pytest.approx((8.0, 8.0, 8.0))
    assert found.sample_passes == 16 + BOUND_ATTACK_PASSES
    assert len(found.region_bounds) == 16
    assert outcome.grid == pytest.approx(
        (found.overlap_bound - np.array(found.region_bounds)).reshape(4, 4), abs=1e-6
    )
    # The bottom half of the image (cells 8..15) carries the model's weight.
    assert outcome.grid[2:].sum() > 10 * abs(outcome.grid[:2].sum())
    assert max(found.region_bounds) <= found.overlap_bound
    assert found.sampled_overlap <= found.overlap_bound
    assert found.adversary_label == ("zero", "one", "two")[found.adversary_class]
    assert found.adversary_class != 0
    assert found.certified == (found.overlap_bound < 0)
    assert outcome.map.shape == IMAGE.shape[:2] and outcome.warnings == ()
    assert outcome.target_score == "logit"


async def test_the_rows_sent_hold_each_cell_and_sample_only_the_first():
    backend = LinearOpenModel(open_model())
    await attribute(backend)
    rows = backend.bound_rows()
    radius = rows["BOUND_RADIUS"]
    assert radius.shape == (17, SIZE * SIZE * 3)
    assert (radius[0] == 8.0).all() and (radius[1:] == 0).sum() == SIZE * SIZE * 3
    assert rows["BOUND_SAMPLES"][:, 0].tolist() == [16] + [0] * 16
    assert (rows["BOUND_CLASS"] == 0).all() and (rows["BOUND_LAYER"] == -1).all()
    assert (rows["BOUND_METHOD"] == BOUND_CROWN).all()
    assert len(set(rows["BOUND_SEED"][:, 0].tolist())) == 17  # a seed of each row's own
    probe = next(c for c in backend.calls if "BOUND_RADIUS" in c)
    assert (probe["BOUND_RADIUS"] == 0).all() and len(probe["BOUND_RADIUS"]) == 1


async def test_a_hybrid_samples_every_row_and_says_it_is_not_guaranteed():
    backend = LinearOpenModel(open_model())
    events = await attribute(backend, domain.EvaSpec(grid=2, hybrid_layer="features.1", samples=4))
    rows = backend.bound_rows()
    assert (rows["BOUND_LAYER"] == 1).all() and (rows["BOUND_SAMPLES"] == 4).all()
    outcome = events[-1]
    assert not outcome.eva.guaranteed and outcome.eva.sample_passes == 5 * (4 + BOUND_ATTACK_PASSES)
    (warning,) = outcome.warnings
    assert "not guaranteed" in warning and "'features.1'" in warning and "4 sampled" in warning
    assert any("not guaranteed" in w for w in events[0].classifier.warnings)


async def test_a_repeat_is_a_cache_hit_with_the_same_bounds():
    cache = InMemoryArtefactCache(1 << 20)
    first = (await attribute(LinearOpenModel(open_model()), cache=cache))[-1]
    backend = LinearOpenModel(open_model())
    second = (await attribute(backend, cache=cache))[-1]
    assert second.cache_hit and second.forward_passes == 0 and not first.cache_hit
    assert second.eva == first.eva
    np.testing.assert_array_equal(second.grid, first.grid)
    assert len(backend.calls) == 2  # the original and the probe, no bound row
    other = (await attribute(backend, domain.EvaSpec(grid=4, samples=16, bound="ibp"), cache))[-1]
    assert not other.cache_hit  # every EVA option is in the key


async def test_a_flat_map_is_said_and_not_cached():
    backend = LinearOpenModel(open_model())
    backend.weights[:] = 0.0
    cache = InMemoryArtefactCache(1 << 20)
    outcome = (await attribute(backend, cache=cache))[-1]
    assert any("carries no information" in w for w in outcome.warnings)
    assert not (await attribute(backend, cache=cache))[-1].cache_hit


async def test_an_unsupported_layer_is_refused_naming_it_before_any_bound_row():
    backend = LinearOpenModel(open_model(), fail=UNSUPPORTED)
    with pytest.raises(errors.FailedPrecondition, match="'head.softmax'") as caught:
        await attribute(backend)
    assert caught.value.field == "method"
    assert sum("BOUND_RADIUS" in c for c in backend.calls) == 1  # the probe only


async def test_another_model_failure_in_the_probe_stays_a_backend_error():
    with pytest.raises(errors.BackendError, match="out of memory"):
        await attribute(LinearOpenModel(open_model(), fail="CUDA out of memory"))


@pytest.mark.parametrize(
    ("model", "field", "words"),
    [
        (open_model(capabilities=""), "method", "needs bounds"),
        (
            open_model(outputs=(Tensor("LOGITS", "FP32", [CLASSES]),)),
            "model",
            "BOUND_MARGIN, SAMPLED_MARGIN",
        ),
        (
            open_model(preprocessing=PreprocessingConfig(output_kind="probabilities")),
            "model",
            "returns probabilities",
        ),
    ],
)
async def test_a_model_that_cannot_bound_is_refused_before_any_row(model, field, words):
    backend = LinearOpenModel(model)
    with pytest.raises(errors.FailedPrecondition, match=words) as caught:
        await attribute(backend)
    assert caught.value.field == field
    assert not any("BOUND_RADIUS" in c for c in backend.calls)


async def test_an_undeclared_hybrid_layer_is_refused_naming_the_declared_ones():
    backend = LinearOpenModel(open_model())
    with pytest.raises(errors.InvalidArgument, match="features.0, features.1") as caught:
        await attribute(backend, domain.EvaSpec(grid=2, hybrid_layer="head"))
    assert caught.value.field == "eva.hybrid_layer"


# --- the API conversion ---


def request(**eva) -> apb.AttributeRequest:
    return apb.AttributeRequest(
        image=png(IMAGE), model=pb.ModelRef(name="linear"), eva=apb.EvaOptions(**eva)
    )


def test_unset_options_are_the_defaults():
    method = convert_attribution.attribute_spec(request(), Limits()).method
    assert method == domain.EvaSpec(grid=8, epsilon=8 / 255, bound="crown", samples=256)
    ibp = convert_attribution.attribute_spec(request(bound=apb.BOUND_METHOD_IBP), Limits())
    assert ibp.method.bound == "ibp"


def test_an_epsilon_reads_as_the_caller_wrote_it():
    """The proto's float32 0.001 is 0.0010000000474974513 as a double: results say 0.001."""
    for epsilon in (0.001, 0.02, 1.0):
        method = convert_attribution.attribute_spec(request(epsilon=epsilon), Limits()).method
        assert method.epsilon == epsilon


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"epsilon": 0.0}, "eva.epsilon"),
        ({"epsilon": 2.0}, "eva.epsilon"),
        ({"epsilon": math.nan}, "eva.epsilon"),
        ({"grid_size": 1}, "eva.grid_size"),
        ({"grid_size": 33}, "eva.grid_size"),
        ({"grid_size": 9}, "eva.grid_size"),  # finer than the 8 x 8 image
        ({"samples": 65537}, "eva.samples"),
        ({"bound": 7}, "eva.bound"),
    ],
)
def test_options_out_of_range_are_refused_naming_the_field(options, field):
    with pytest.raises(errors.InvalidArgument) as caught:
        convert_attribution.attribute_spec(request(**options), Limits())
    assert caught.value.field == field


def test_a_target_score_other_than_logit_is_refused():
    message = request()
    message.target_score = apb.TARGET_SCORE_PROBABILITY
    with pytest.raises(errors.InvalidArgument, match="logit margins") as caught:
        convert_attribution.attribute_spec(message, Limits())
    assert caught.value.field == "target_score"
    message.target_score = apb.TARGET_SCORE_LOGIT
    assert convert_attribution.attribute_spec(message, Limits()).target_score == "logit"


def test_the_sampled_passes_budget_is_refused_naming_samples_and_the_limit():
    limits = Limits(max_eva_sample_passes=1000)
    convert_attribution.attribute_spec(request(samples=1000 - BOUND_ATTACK_PASSES), limits)
    with pytest.raises(errors.ResourceExhausted, match="max_eva_sample_passes is 1000") as caught:
        convert_attribution.attribute_spec(
            request(samples=100, grid_size=4, hybrid_layer="features.1"), limits
        )
    assert caught.value.field == "eva.samples"


def test_stability_takes_eva_and_its_budget():
    message = apb.EvaluateAttributionRequest(
        image=png(IMAGE),
        model=pb.ModelRef(name="linear"),
        stability=apb.StabilityOptions(nb_samples=3, eva=apb.EvaOptions(grid_size=2)),
    )
    ((name, options),) = convert_attribution.evaluate_spec(message, Limits()).metrics
    assert name == "stability" and options.method == domain.EvaSpec(grid=2)
    message.stability.eva.epsilon = 0.0
    with pytest.raises(errors.InvalidArgument) as caught:
        convert_attribution.evaluate_spec(message, Limits())
    assert caught.value.field == "stability.eva.epsilon"
    message.stability.eva.ClearField("epsilon")
    with pytest.raises(errors.ResourceExhausted):
        convert_attribution.evaluate_spec(
            message, Limits(max_eva_sample_passes=(256 + BOUND_ATTACK_PASSES) * 3)
        )


async def test_the_events_carry_the_options_and_the_bounds():
    events = await attribute(LinearOpenModel(open_model()))
    accepted = convert_attribution.attribute_event("r", events[0]).accepted
    assert accepted.method == "eva" and accepted.HasField("eva")
    assert events[0].perturbation is None and not accepted.HasField("perturbation")
    assert accepted.eva.grid_size == 4 and accepted.eva.bound == apb.BOUND_METHOD_CROWN
    assert accepted.eva.epsilon == pytest.approx(8 / 255) and accepted.eva.samples == 16
    result = convert_attribution.attribute_event("r", events[-1]).result
    outcome = events[-1].eva
    assert result.HasField("eva") and result.eva.guaranteed
    assert result.eva.overlap_bound == outcome.overlap_bound
    assert list(result.eva.region_bounds) == list(outcome.region_bounds)
    assert result.eva.bound_passes == 17 and result.eva.adversary_label == outcome.adversary_label
    assert list(result.eva.epsilon_input) == pytest.approx([8.0] * 3)


def test_a_sobol_result_has_no_eva():
    outcome = domain.AttributionOutcome(
        map=np.zeros((2, 2), np.float32),
        grid=np.zeros((2, 2), np.float32),
        channel_grid=None,
        forward_passes=1,
        cache_hit=False,
        original_score=0.0,
        target_class=0,
        target_label="",
        target_score="logit",
        total_s=0.0,
    )
    assert not convert_attribution.attribute_event("r", outcome).result.HasField("eva")


def test_region_bounds_come_from_the_rows_in_order():
    bound = np.array([[0.0, 5.0], [0.0, 1.0], [0.0, 4.0]])
    found = scoring.eva_bounds(bound, bound, 0)
    assert found.region_bounds.tolist() == [1.0, 4.0] and found.importance.tolist() == [4.0, 1.0]


def test_listmodels_offers_eva_only_to_a_model_declaring_bounds():
    assert "eva" in methods.supported(open_model())
    assert "eva" not in methods.supported(open_model(capabilities="activations,gradients"))


def test_only_a_verified_negative_bound_is_certified():
    planned = PlannedClassifier(
        model=open_model(),
        layout=InputLayout("IMAGE", "UINT8", False, SIZE, SIZE),
        output="LOGITS",
        classes=CLASSES,
        preprocessing=PreprocessingConfig(output_kind="logits"),
        preprocessing_sources=(),
        warnings=(),
        class_labels=("zero", "one", "two"),
    )
    below = scoring.eva_bounds(np.array([[0.0, -1.0, -2.0]] * 5), np.full((5, 3), -3.0), 0)
    verified = eva_method.eva_outcome(domain.EvaSpec(grid=2), below, planned)
    hybrid = eva_method.eva_outcome(
        domain.EvaSpec(grid=2, hybrid_layer="features.1"), below, planned
    )
    assert verified.certified and verified.guaranteed
    assert not hybrid.certified and not hybrid.guaranteed
    assert verified.adversary_label == "one"
    for overlap in (0.0, np.inf):
        above = scoring.eva_bounds(np.array([[0.0, overlap, -2.0]] * 5), np.zeros((5, 3)), 0)
        assert not eva_method.eva_outcome(domain.EvaSpec(grid=2), above, planned).certified


@pytest.mark.parametrize(
    ("method", "rows_per_call"),
    [
        # A hybrid samples 2000 + the attack's passes on every row: two rows a call.
        (domain.EvaSpec(grid=2, hybrid_layer="features.1", samples=2000), [2, 2, 1]),
        # More than the cap on one row: a row a call, never none.
        (domain.EvaSpec(grid=2, hybrid_layer="features.1", samples=8000), [1, 1, 1, 1, 1]),
        # Verified: row 0 alone (its samples fill a call), the rest by max_batch_size.
        (domain.EvaSpec(grid=2, samples=4096), [1, 4]),
        (domain.EvaSpec(grid=2, samples=16), [5]),
    ],
)
async def test_calls_sample_at_most_the_cap_so_a_cancel_frees_the_model_soon(method, rows_per_call):
    backend = LinearOpenModel(open_model())
    await attribute(backend, method)
    calls = [c for c in backend.calls if "BOUND_RADIUS" in c][1:]  # after the probe
    assert [len(c["BOUND_RADIUS"]) for c in calls] == rows_per_call
    for call in calls:
        samples = call["BOUND_SAMPLES"][:, 0]
        passes = ((samples + BOUND_ATTACK_PASSES) * (samples > 0)).sum()
        assert len(samples) == 1 or passes <= eva_method.SAMPLE_PASSES_PER_CALL


async def test_a_letterboxed_image_keeps_the_padding_bars_fixed():
    model = open_model(preprocessing=PreprocessingConfig(output_kind="logits", resize="letterbox"))
    backend = LinearOpenModel(model)
    attribution = Attribution(backend, InMemoryArtefactCache(1 << 20), Settings())
    wide = dataclasses.replace(spec(), image=np.full((4, 8, 3), 120, np.uint8))
    events = [event async for event in attribution.run(await attribution.plan(wide, None))]
    assert "letterbox padding held fixed" in events[0].perturbation_description
    radii = backend.bound_rows()["BOUND_RADIUS"].reshape(-1, SIZE, SIZE, 3)
    # The 8 x 4 image sits in rows 2..5 of the 8 x 8 input; rows 0, 1, 6, 7 are padding.
    assert (radii[:, [0, 1, 6, 7]] == 0).all()
    assert (radii[0, 2:6] == 8.0).all()
