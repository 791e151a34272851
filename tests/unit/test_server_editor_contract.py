"""Editor parameter schemas: parsing, checking a request, canonical spelling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from propscope_server.editor_contract import (
    SCHEMA_PARAMETER,
    EditorSchema,
    EditRequest,
    InvalidParameters,
    ParameterSpec,
    SeedBySeed,
    canonical_parameters,
)

PROCEDURAL_CONFIG = (
    Path(__file__).resolve().parents[2] / "deploy/triton/models/procedural/config.pbtxt"
)

SCHEMA = EditorSchema.from_json(
    json.dumps(
        [
            {"name": "mode", "type": "choice", "choices": ["a", "b"], "default": "a"},
            {"name": "target", "description": "required"},
            {"name": "scale", "type": "float", "default": "1.5", "minimum": 0, "maximum": 10},
            {"name": "count", "type": "int", "default": "3", "minimum": 1},
            {"name": "amount", "type": "float", "default": ""},
        ]
    )
)


def test_from_json_fields():
    mode, target, scale, count, _ = SCHEMA.parameters
    assert mode == ParameterSpec("mode", "choice", default="a", choices=("a", "b"))
    assert target == ParameterSpec("target", "string", description="required")
    assert (scale.minimum, scale.maximum, count.minimum, count.maximum) == (0, 10, 1, None)


def test_defaults_are_filled():
    assert SCHEMA.resolve({"target": "x"}) == {
        "mode": "a",
        "target": "x",
        "scale": "1.5",
        "count": "3",
        "amount": "",
    }


@pytest.mark.parametrize(
    "given",
    [
        {"mode": "b", "scale": "0", "count": "1", "amount": "-2.5"},
        {"scale": "10", "count": "1000", "amount": "1e3"},
        {"scale": "2.", "count": " 7 ", "amount": ""},
    ],
)
def test_valid_values_are_kept(given):
    resolved = SCHEMA.resolve({"target": "t", **given})
    assert {k: resolved[k] for k in given} == given


def test_unknown_parameter_names_it_and_the_accepted_ones():
    with pytest.raises(InvalidParameters) as info:
        SCHEMA.resolve({"target": "x", "colour": "red"})
    message = str(info.value)
    assert "'colour'" in message
    assert "amount, count, mode, scale, target" in message


def test_editor_without_parameters_accepts_none():
    with pytest.raises(InvalidParameters, match="accepts: none"):
        EditorSchema().resolve({"x": "1"})
    assert EditorSchema().resolve({}) == {}


T = {"target": "t"}


@pytest.mark.parametrize(
    ("given", "needle"),
    [
        ({}, "'target' is required"),
        ({**T, "mode": "c"}, "'mode' must be one of a, b; got 'c'"),
        ({**T, "scale": "abc"}, "'scale' must be a number"),
        ({**T, "scale": ""}, "'scale' must be a number"),
        ({**T, "count": "2.5"}, "'count' must be an integer"),
        ({**T, "scale": "-0.1"}, "'scale' must be >= 0"),
        ({**T, "scale": "10.01"}, "'scale' must be <= 10"),
        ({**T, "count": "0"}, "'count' must be >= 1"),
        ({**T, "scale": "nan"}, "'scale' must be finite"),
        ({**T, "scale": "inf"}, "'scale' must be finite"),
        ({**T, "amount": "-1e400"}, "'amount' must be finite"),
    ],
)
def test_refusals(given, needle):
    with pytest.raises(InvalidParameters) as info:
        SCHEMA.resolve(given)
    assert needle in str(info.value)


def test_canonical_parameters_ignore_order():
    one = canonical_parameters({"b": "1", "a": "x y"})
    assert one == canonical_parameters({"a": "x y", "b": "1"}) == '{"a":"x y","b":"1"}'
    assert canonical_parameters({"a": "1"}) != canonical_parameters({"a": "2"})


def test_procedural_config_schema_resolves():
    config = text_format.Parse(PROCEDURAL_CONFIG.read_text(), model_config_pb2.ModelConfig())
    schema = EditorSchema.from_json(config.parameters[SCHEMA_PARAMETER].string_value)
    assert schema.resolve({"operation": "hue"}) == {
        "operation": "hue",
        "region": "all",
        "amount": "",
        "position": "fixed",
        "patch_x": "0.05",
        "patch_y": "0.05",
        "patch_size": "0.22",
    }
    with pytest.raises(InvalidParameters, match="'operation' must be one of"):
        schema.resolve({"operation": "rotate"})
    with pytest.raises(InvalidParameters, match="'operation' is required"):
        schema.resolve({})


MODELS = PROCEDURAL_CONFIG.parents[1]
DIFFUSION_EDITORS = ("ip2p", "sdedit", "ledits")


def model_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("editor", DIFFUSION_EDITORS)
def test_gpu_variant_differs_from_the_cpu_one_only_in_where_and_how_it_runs(editor):
    cpu = model_config(MODELS / editor / "config.pbtxt")
    gpu = model_config(MODELS / editor / "configs" / "gpu.pbtxt")
    assert cpu.name == gpu.name == editor
    assert cpu.input == gpu.input and cpu.output == gpu.output
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    assert (cpu.parameters["dtype"].string_value, gpu.parameters["dtype"].string_value) == (
        "fp32",
        "fp16",
    )
    assert cpu.parameters["weights"].string_value.startswith("../../pipelines/tiny-")
    assert Path(gpu.parameters["weights"].string_value).is_absolute()
    schemas = [
        EditorSchema.from_json(c.parameters[SCHEMA_PARAMETER].string_value) for c in (cpu, gpu)
    ]
    assert [p.name for p in schemas[0].parameters] == [p.name for p in schemas[1].parameters]


@pytest.mark.parametrize(
    ("editor", "required"),
    [("ip2p", "instruction"), ("sdedit", "target_prompt"), ("ledits", "editing_prompt")],
)
def test_diffusion_editor_schemas_need_their_prompt_and_default_the_rest(editor, required):
    config = model_config(MODELS / editor / "config.pbtxt")
    schema = EditorSchema.from_json(config.parameters[SCHEMA_PARAMETER].string_value)
    with pytest.raises(InvalidParameters, match=f"'{required}' is required"):
        schema.resolve({})
    resolved = schema.resolve({required: "a snowy background"})
    assert resolved[required] == "a snowy background"
    assert int(resolved.get("num_inference_steps", resolved.get("num_inversion_steps"))) >= 1


def test_seed_by_seed_stacks_one_path_per_seed_and_checks_in_between():
    checks = []

    def edit_path(image, strengths, parameters, seed):
        if parameters.get("broken"):
            raise InvalidParameters("broken")
        return np.stack([image + seed for _ in strengths])

    editor = SeedBySeed(edit_path)
    image, strengths = np.zeros((2, 2, 3), np.uint8), np.ones(4, np.float32)
    paths, broken = editor.edit_many(
        [
            EditRequest(image, strengths, {}, [1, 5], lambda: checks.append(1)),
            EditRequest(image, strengths, {"broken": "yes"}, [1]),
        ]
    )
    assert paths.shape == (2, 4, 2, 2, 3)
    assert paths[0].max() == 1 and paths[1].max() == 5
    assert len(checks) == 2
    assert isinstance(broken, InvalidParameters)
