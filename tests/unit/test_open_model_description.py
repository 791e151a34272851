"""An open model's description (issue 17): optional inputs, declared layers and
channel means read from its config; the image is the classifier's one required input."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from propscope_server.api.memory import ANY_CLASSIFIER, classifier_input
from propscope_server.backends.triton import (
    CHANNEL_MEANS_PARAMETER,
    LAYERS_PARAMETER,
    _description,
)
from propscope_server.config import Settings
from propscope_server.domain import ClassifierRef
from propscope_server.errors import FailedPrecondition, InvalidArgument
from propscope_server.inference import Layer
from propscope_server.methods.base import require_inputs
from propscope_server.orchestration.classifier import plan_classifier


def metadata_and_config(parameters: dict[str, str]) -> tuple[dict, dict]:
    metadata = {
        "name": "open",
        "versions": ["1"],
        "inputs": [
            {"name": "IMAGE", "datatype": "UINT8", "shape": ["-1", "8", "8", "3"]},
            {"name": "INTERVENE_LAYER", "datatype": "INT32", "shape": ["-1", "1"]},
        ],
        "outputs": [{"name": "LOGITS", "datatype": "FP32", "shape": ["-1", "2"]}],
    }
    config = {
        "max_batch_size": 8,
        "input": [
            {"name": "IMAGE", "data_type": "TYPE_UINT8", "dims": ["8", "8", "3"]},
            {"name": "INTERVENE_LAYER", "data_type": "TYPE_INT32", "dims": ["1"], "optional": True},
        ],
        "parameters": {k: {"string_value": v} for k, v in parameters.items()},
    }
    return metadata, config


def describe(parameters: dict[str, str]):
    return _description(*metadata_and_config(parameters), "")


def test_optional_inputs_layers_and_means_are_read_in_declared_order():
    model = describe(
        {
            LAYERS_PARAMETER: json.dumps({"b.1": 2, "a.0": 3}),
            CHANNEL_MEANS_PARAMETER: json.dumps({"a.0": [0.5, 1, -2.0]}),
        }
    )
    assert model.config_problem == ""
    assert [t.optional for t in model.inputs] == [False, True]
    assert [t.name for t in model.required_inputs] == ["IMAGE"]
    assert model.layers == (Layer("b.1", 2), Layer("a.0", 3))  # network order, not sorted
    assert model.channel_means == {"a.0": (0.5, 1.0, -2.0)}


def test_a_model_without_declarations_has_no_layers():
    model = describe({})
    assert model.layers == () and model.channel_means == {} and model.config_problem == ""


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({LAYERS_PARAMETER: "[16, 32]"}, LAYERS_PARAMETER),
        ({LAYERS_PARAMETER: '{"f.0": 0}'}, LAYERS_PARAMETER),
        ({LAYERS_PARAMETER: '{"f.0": 2.5}'}, LAYERS_PARAMETER),
        ({LAYERS_PARAMETER: "{"}, LAYERS_PARAMETER),
        ({LAYERS_PARAMETER: '{"f.0": 2}', CHANNEL_MEANS_PARAMETER: '{"f.0": [1]}'}, "f.0"),
        ({LAYERS_PARAMETER: '{"f.0": 2}', CHANNEL_MEANS_PARAMETER: '{"g": [1, 2]}'}, "'g'"),
        ({LAYERS_PARAMETER: '{"f.0": 1}', CHANNEL_MEANS_PARAMETER: '{"f.0": [NaN]}'}, "finite"),
        ({LAYERS_PARAMETER: '{"f.0": 1}', CHANNEL_MEANS_PARAMETER: "[1]"}, CHANNEL_MEANS_PARAMETER),
    ],
)
def test_a_malformed_declaration_is_a_config_problem_naming_it(parameters, named):
    model = describe(parameters)
    assert named in model.config_problem
    assert (CHANNEL_MEANS_PARAMETER in model.config_problem) or (
        LAYERS_PARAMETER in model.config_problem
    )


class OneModel:
    def __init__(self, model):
        self.model = model

    async def describe(self, name, version="", deadline=None):
        return self.model

    async def require_ready(self, model, deadline):
        return None

    async def infer(self, model, inputs, outputs, deadline):
        return {"LOGITS": np.zeros((len(inputs["IMAGE"]), 2), np.float32)}


def test_the_classifier_and_the_memory_budget_take_the_one_required_input():
    model = describe({"propscope.output_kind": "logits"})
    planned = asyncio.run(
        plan_classifier(
            OneModel(model), ClassifierRef("open"), np.zeros((8, 8, 3), np.uint8), Settings(), None
        )
    )
    assert planned.layout.name == "IMAGE"
    assert classifier_input(model) != ANY_CLASSIFIER
    assert classifier_input(model).datatype == "UINT8"


def test_two_required_inputs_are_refused():
    metadata, config = metadata_and_config({})
    config["input"][1]["optional"] = False
    model = _description(metadata, config, "")
    with pytest.raises(InvalidArgument, match="2 required inputs"):
        asyncio.run(
            plan_classifier(
                OneModel(model),
                ClassifierRef("open"),
                np.zeros((8, 8, 3), np.uint8),
                Settings(),
                None,
            )
        )
    assert classifier_input(model) == ANY_CLASSIFIER


@pytest.mark.parametrize("output", ["CHANNEL_MEANS", "ACTIVATIONS", "INPUT_GRADIENT"])
def test_an_open_models_optional_output_is_refused_as_the_class_scores(output):
    metadata, config = metadata_and_config({"propscope.output_kind": "logits"})
    metadata["outputs"].append({"name": output, "datatype": "FP32", "shape": ["-1", "112"]})
    model = _description(metadata, config, "")
    with pytest.raises(InvalidArgument, match=f"model.output '{output}'.*'LOGITS'") as caught:
        asyncio.run(
            plan_classifier(
                OneModel(model),
                ClassifierRef("open", output=output),
                np.zeros((8, 8, 3), np.uint8),
                Settings(),
                None,
            )
        )
    assert caught.value.field == "model.output"


def test_a_method_is_refused_the_open_tensors_a_model_does_not_declare():
    model = describe({})
    require_inputs(model, ["INTERVENE_LAYER", "LOGITS"], "a test")
    with pytest.raises(FailedPrecondition) as refused:
        require_inputs(
            model, ["INTERVENE_LAYER", "REPLACE_LAYER", "REPLACE_ACTIVATION"], "CRAFT importance"
        )
    message = str(refused.value)
    assert "'open' does not declare REPLACE_LAYER, REPLACE_ACTIVATION" in message
    assert "CRAFT importance" in message and "docs/own-models.md" in message
    assert "INTERVENE_LAYER" not in message
    assert refused.value.field == "model"
