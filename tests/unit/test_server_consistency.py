"""EvaluateConsistency's pure parts: request validation (each refusal names its field),
the events' messages (an undefined MeGe or ReCo stays unset, never a number), the pass
count, and the registry's capabilities per explainer."""

from __future__ import annotations

import asyncio
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from propscope.v1 import consistency_pb2 as cpb
from propscope.v1 import explain_pb2 as pb
from propscope_server import consistency_domain as cd
from propscope_server import methods
from propscope_server.api.convert_consistency import consistency_event, consistency_spec
from propscope_server.config import Limits, Settings
from propscope_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from propscope_server.inference import ModelDescription, Tensor
from propscope_server.methods.consistency import (
    Consistency,
    _choose_explainers,
    planned_passes,
    registry_name,
)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGES = [png(0), png(1)]
MODELS = [pb.ModelRef(name="synth_patch_folds", version=v) for v in ("1", "2")]


def request(**fields: object) -> cpb.EvaluateConsistencyRequest:
    values: dict[str, object] = {"images": IMAGES, "models": MODELS, **fields}
    return cpb.EvaluateConsistencyRequest(**values)


def test_defaults_and_explainers_in_the_contract_order() -> None:
    spec = consistency_spec(
        request(
            explainers=[
                cpb.CONSISTENCY_EXPLAINER_RANDOM,
                cpb.CONSISTENCY_EXPLAINER_SOBOL,
            ]
        ),
        Limits(),
    )
    assert spec.explainers == ("sobol", "random")
    assert [m.version for m in spec.models] == ["1", "2"]
    assert (spec.sobol.grid, spec.sobol.nb_design, spec.rise.nb_samples) == (8, 32, 4000)
    assert spec.labels is None and spec.target_score == "auto"
    assert len(spec.images) == 2 and spec.request_id


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"models": MODELS[:1]}, "models", "models has 1 models"),
        ({"models": [pb.ModelRef(name="")] * 2}, "models[0].name", "is required"),
        (
            {"models": [MODELS[0], pb.ModelRef(name="m", target_class=1)]},
            "models[1].target_class",
            "must stay unset",
        ),
        ({"images": IMAGES[:1]}, "images", "images has 1 images"),
        ({"labels": [0]}, "labels", "labels has 1 values for 2 images"),
        ({"explainers": [1, 1]}, "explainers[1]", "asked for twice"),
        ({"explainers": [0]}, "explainers[0]", "is not an explainer"),
        ({"sobol": {"nb_design": 3}}, "sobol.nb_design", "power of two"),
    ],
)
def test_refusals_name_the_field(fields: dict, field: str, words: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        consistency_spec(request(**fields), Limits())
    assert refused.value.field == field
    assert words in str(refused.value)


def test_more_models_than_the_limit_are_refused_naming_it() -> None:
    with pytest.raises(InvalidArgument, match="max_consistency_models"):
        consistency_spec(request(models=MODELS * 5), Limits(max_consistency_models=8))


def test_an_undefined_score_stays_unset_in_the_message() -> None:
    result = cd.ExplainerConsistency(
        explainer="saliency",
        mege=1.0,
        reco=None,
        mean_distance_agreeing=0.0,
        mean_distance_disagreeing=None,
        agreeing_pairs=4,
        disagreeing_pairs=0,
        both_wrong_pairs=0,
        undefined_pairs=0,
        seconds=0.5,
        warnings=("ReCo is undefined",),
    )
    message = consistency_event("r", cd.ConsistencyDone((result,), (), 8, 1.0, ())).done
    scores = message.explainers[0]
    assert scores.explainer == cpb.CONSISTENCY_EXPLAINER_SALIENCY
    assert scores.HasField("mege") and scores.mege == 1.0
    assert not scores.HasField("reco") and not scores.HasField("mean_distance_disagreeing")
    assert scores.HasField("mean_distance_agreeing") and scores.agreeing_pair_count == 4


def test_planned_passes_count_one_gradient_pass_for_both_gradient_explainers() -> None:
    spec = consistency_spec(request(images=IMAGES * 2, rise={"nb_samples": 10}), Limits())
    maps = 2 * 4  # models x images
    assert planned_passes(spec, ("random",), 0) == maps
    assert planned_passes(spec, ("saliency", "gradient_x_input"), 1) == 1 + maps * 2
    assert planned_passes(spec, ("sobol", "rise"), 0) == maps * (1 + 32 * 66 + 10)


BLACK_BOX = ModelDescription(
    name="clf",
    version="1",
    versions=("1",),
    role="classifier",
    inputs=(Tensor("IMAGE", "UINT8", [8, 8, 3]),),
    outputs=(Tensor("LOGITS", "FP32", [2]),),
    max_batch_size=8,
)


def test_gradient_explainers_need_gradients_and_the_others_forward_passes_only() -> None:
    assert "consistency" in methods.supported(BLACK_BOX)
    assert "saliency" not in methods.supported(BLACK_BOX)
    with pytest.raises(FailedPrecondition, match="gradients"):
        methods.require(registry_name("saliency"), BLACK_BOX)
    methods.require(registry_name("sobol"), BLACK_BOX)
    open_model = dataclasses.replace(BLACK_BOX, parameters={"propscope.capabilities": "gradients"})
    assert {"saliency", "gradient_x_input"} <= set(methods.supported(open_model))


def test_a_gradient_explainer_needs_the_gradient_tensors_not_only_the_capability() -> None:
    declared = dataclasses.replace(BLACK_BOX, parameters={"propscope.capabilities": "gradients"})
    spec = consistency_spec(request(explainers=[cpb.CONSISTENCY_EXPLAINER_SALIENCY]), Limits())
    with pytest.raises(FailedPrecondition, match="not declare GRADIENT_CLASS, INPUT_GRADIENT"):
        _choose_explainers(spec, [declared, declared])
    open_model = dataclasses.replace(
        declared,
        inputs=(*BLACK_BOX.inputs, Tensor("GRADIENT_CLASS", "INT32", [1], True)),
        outputs=(*BLACK_BOX.outputs, Tensor("INPUT_GRADIENT", "FP32", [8, 8, 3])),
    )
    assert _choose_explainers(spec, [open_model, open_model]) == (("saliency",), [])


class CountingInference:
    """Describes BLACK_BOX (no output kind declared: planning would detect it with a pass)
    and counts what planning asks of Triton."""

    def __init__(self) -> None:
        self.passes = 0
        self.readied = 0

    async def describe(self, name, version="", deadline=None):
        return dataclasses.replace(BLACK_BOX, name=name)

    async def require_ready(self, model, deadline):
        self.readied += 1  # a model loaded on demand (load_on_demand)

    async def infer(self, model, inputs, outputs, deadline):
        rows = len(next(iter(inputs.values())))
        self.passes += rows
        return {name: np.zeros((rows, 2), np.float32) for name in outputs}


def test_a_request_over_the_pass_budget_is_refused_before_any_model_is_loaded_or_run() -> None:
    spec = consistency_spec(
        request(explainers=[cpb.CONSISTENCY_EXPLAINER_SOBOL], sobol={"nb_design": 1024}),
        Limits(),
    )
    inference = CountingInference()
    method = Consistency(inference, Settings(limits={"max_consistency_passes": 1000}))
    with pytest.raises(ResourceExhausted, match="max_consistency_passes is 1000"):
        asyncio.run(method.plan(spec, None))
    assert inference.passes == 0 and inference.readied == 0


class TwoTasks(CountingInference):
    """Model "three" outputs three classes, every other model two."""

    async def describe(self, name, version="", deadline=None):
        classes = 3 if name == "three" else 2
        return dataclasses.replace(
            BLACK_BOX,
            name=name,
            outputs=(Tensor("LOGITS", "FP32", [classes]),),
            parameters={"propscope.output_kind": "logits"},
        )

    async def infer(self, model, inputs, outputs, deadline):
        rows = len(next(iter(inputs.values())))
        self.passes += rows
        return {name: np.zeros((rows, model.outputs[0].shape[0]), np.float32) for name in outputs}


def test_models_of_different_class_counts_are_refused_naming_models() -> None:
    """Agreement is by class index: a 2-class and a 3-class model are not one task."""
    spec = consistency_spec(
        request(
            models=[pb.ModelRef(name="two"), pb.ModelRef(name="three")],
            explainers=[cpb.CONSISTENCY_EXPLAINER_RANDOM],
        ),
        Limits(),
    )
    with pytest.raises(InvalidArgument, match="different numbers of classes") as refused:
        asyncio.run(Consistency(TwoTasks(), Settings()).plan(spec, None))
    assert refused.value.field == "models" and "'three' 3" in str(refused.value)
