"""propscope SDK: properties, their text syntax, request building and the CLI's argument errors."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from propscope import Box, Mask, Preprocessing, Property, parse_property, split_property
from propscope._requests import build_explain_request, call_options, normalize_properties
from propscope.cli import app
from propscope.v1 import explain_pb2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# The syntax cases the Node client's tests read too (client/node/test/properties.test.ts).
SYNTAX_CASES = json.loads(
    (
        Path(__file__).resolve().parents[2] / "client/node/test/property-syntax-cases.json"
    ).read_text()
)


@pytest.mark.parametrize(("text", "expected"), SYNTAX_CASES["valid"])
def test_split_property_matches_the_shared_cases(text, expected):
    assert split_property(text).to_dict() == expected


@pytest.mark.parametrize(("text", "words"), SYNTAX_CASES["invalid"])
def test_split_property_refuses_the_shared_malformed_cases(text, words):
    with pytest.raises(ValueError, match="invalid property") as info:
        split_property(text)
    assert words in str(info.value)


def test_parse_property_builds_editor_properties():
    assert parse_property("b=ed@1:sigma=2") == Property(
        "b", "ed", {"sigma": "2"}, editor_version="1"
    )
    boxed = parse_property("h=procedural:operation=hue;box_px=1,2,30,40")
    assert boxed.region == Box(1, 2, 30, 40, pixels=True)
    assert boxed.to_proto().region == explain_pb2.Region(
        box=explain_pb2.Box(left=1, top=2, right=30, bottom=40, pixels=True)
    )


def _png_file(path: Path, value: int, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    image = Image.new(mode, (4, 3), (value,) * len(mode))
    image.save(path, format=fmt)
    return path.read_bytes()


def test_parse_property_reads_masks_relative_to_base(tmp_path):
    png = _png_file(tmp_path / "mask.png", 255, "L")
    prop = parse_property("h=procedural;mask=@mask.png", base=tmp_path)
    assert prop.region == Mask(png)
    assert prop.to_proto().region.mask == png
    _png_file(tmp_path / "mask.webp", 200, "RGBA", "WEBP")
    converted = parse_property("h=procedural;mask=mask.webp", base=tmp_path).region
    assert converted.image.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(converted.image)) as decoded:
        assert decoded.mode == "RGBA"  # the alpha channel is what the service reads
    with pytest.raises(ValueError, match="cannot read mask"):
        parse_property("h=procedural;mask=missing.png", base=tmp_path)
    (tmp_path / "notes.txt").write_text("no image")
    with pytest.raises(ValueError, match="not an image"):
        parse_property("h=procedural;mask=notes.txt", base=tmp_path)


def test_parse_property_reads_a_folder_in_natural_order(tmp_path):
    folder = tmp_path / "path"
    folder.mkdir()
    images = {n: _png_file(folder / f"x_{n}.png", n) for n in (10, 2, 1)}
    _png_file(folder / ".hidden.png", 0)
    (folder / "readme.md").write_text("left out")
    prop = parse_property("real=@path/", base=tmp_path)
    assert prop.provided_path == (images[1], images[2], images[10])
    assert prop.to_proto().WhichOneof("source") == "provided_path"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        parse_property("real=@empty", base=tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        parse_property("real=@nowhere", base=tmp_path)


@pytest.mark.parametrize(
    ("region", "expected"),
    [
        ({"box": [0.1, 0.2, 0.6, 0.9]}, Box(0.1, 0.2, 0.6, 0.9)),
        ({"box_px": (0, 0, 64, 32)}, Box(0, 0, 64, 32, pixels=True)),
        (Box(0, 0, 1, 1), Box(0, 0, 1, 1)),
        ({"mask": np.ones((2, 2), dtype=bool)}, Mask(np.full((2, 2), 255, dtype=np.uint8))),
    ],
)
def test_property_takes_a_structured_region(region, expected):
    assert Property("h", "procedural", region=region).region == expected


@pytest.mark.parametrize(
    ("region", "message"),
    [
        ({"box": [0.5, 0, 0.1, 1]}, "LEFT < RIGHT"),
        ({"box": [0, 0, 2, 1]}, "fractions in"),
        ({"box": [0, 0, 1]}, "4 numbers"),
        ({"circle": 1}, "exactly one of the keys"),
        ({"mask": np.zeros((2, 2, 3), dtype=np.uint8)}, "HxW"),
    ],
)
def test_property_refuses_a_bad_region(region, message):
    with pytest.raises(ValueError, match=message):
        Property("h", "procedural", region=region)


def test_a_region_only_applies_to_editors():
    with pytest.raises(ValueError, match="only apply to editors"):
        Property("p", provided_path=[b"x"], region=Box(0, 0, 1, 1))


def test_parse_property_rejects_non_str():
    with pytest.raises(TypeError):
        parse_property(b"a=b")  # type: ignore[arg-type]


def test_property_editor_to_proto():
    prop = Property("hue", "procedural", {"degrees": "90"}, editor_version="3")
    msg = prop.to_proto()
    assert msg.WhichOneof("source") == "editor"
    assert msg == explain_pb2.Property(
        name="hue",
        editor=explain_pb2.EditorIntervention(
            model="procedural", version="3", parameters={"degrees": "90"}
        ),
    )


def test_property_provided_path_to_proto():
    prop = Property("real", provided_path=[b"png1", bytearray(b"png2")])
    assert prop.provided_path == (b"png1", b"png2")
    msg = prop.to_proto()
    assert msg.WhichOneof("source") == "provided_path"
    assert list(msg.provided_path.images) == [b"png1", b"png2"]


def test_property_is_immutable_and_hashable():
    params = {"a": "1"}
    prop = Property("p", "ed", params)
    params["a"] = "2"
    assert prop.parameters == {"a": "1"}
    with pytest.raises(TypeError):
        prop.parameters["a"] = "3"  # type: ignore[index]
    assert hash(prop) == hash(Property("p", "ed", {"a": "1"}))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": "p"}, ValueError),
        ({"name": "p", "editor": "ed", "provided_path": [b"x"]}, ValueError),
        ({"name": "", "editor": "ed"}, ValueError),
        ({"name": "p", "editor": ""}, ValueError),
        ({"name": "p", "provided_path": []}, ValueError),
        ({"name": "p", "provided_path": [b"x"], "parameters": {"a": "b"}}, ValueError),
        ({"name": "p", "provided_path": ["not bytes"]}, TypeError),
        ({"name": "p", "editor": "ed", "parameters": {"degrees": 90}}, TypeError),
    ],
)
def test_property_validation(kwargs, error):
    with pytest.raises(error):
        Property(**kwargs)


def test_normalize_properties_accepts_objects_and_strings():
    props = normalize_properties([Property("a", "ed"), "b=ed:x=1"])
    assert [p.name for p in props] == ["a", "b"]
    assert normalize_properties("c=ed") == [Property("c", "ed")]
    with pytest.raises(ValueError, match="at least one"):
        normalize_properties([])
    with pytest.raises(ValueError, match="given twice"):
        normalize_properties(["a=ed", "a=other"])
    with pytest.raises(TypeError):
        normalize_properties([42])  # type: ignore[list-item]


def _png() -> bytes:
    return PNG_MAGIC + b"rest-of-png"


def test_build_explain_request_defaults_to_predicted_class():
    request = build_explain_request(_png(), "resnet", ["hue=procedural:operation=hue"])
    assert request.model.WhichOneof("target") == "predicted_class"
    assert request.model.predicted_class is True
    assert request.image == _png()
    assert request.properties[0].editor.parameters["operation"] == "hue"
    assert (request.steps, request.samples, request.permutations, request.alpha) == (0, 0, 0, 0)


def test_build_explain_request_fields():
    request = build_explain_request(
        _png(),
        "resnet",
        [Property("a", "ed")],
        steps=12,
        samples=3,
        seed=2**40,
        permutations=500,
        alpha=0.05,
        return_path_images=True,
        target_class=0,
        model_version="2",
        model_output="logits",
        request_id="req-1",
    )
    assert request.model.WhichOneof("target") == "target_class"
    assert request.model.target_class == 0
    assert (request.model.name, request.model.version, request.model.output) == (
        "resnet",
        "2",
        "logits",
    )
    assert (request.steps, request.samples, request.seed, request.permutations) == (
        12,
        3,
        2**40,
        500,
    )
    assert request.alpha == 0.05
    assert request.return_path_images
    assert request.request_id == "req-1"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": -1},
        {"samples": -2},
        {"seed": -1},
        {"permutations": -1},
        {"alpha": -0.1},
        {"target_class": -1},
    ],
)
def test_build_explain_request_rejects_negative_values(kwargs):
    with pytest.raises(ValueError, match="must be >= 0"):
        build_explain_request(_png(), "resnet", ["a=ed"], **kwargs)


def test_build_explain_request_needs_a_model():
    with pytest.raises(ValueError, match="model"):
        build_explain_request(_png(), "", ["a=ed"])


def test_call_options_merge():
    assert call_options(default_timeout=5.0, default_metadata=(), timeout=None, metadata=None) == {
        "timeout": 5.0,
        "metadata": None,
    }
    merged = call_options(
        default_timeout=5.0,
        default_metadata=[("authorization", "x")],
        timeout=1.0,
        metadata=[("x-trace", "t")],
    )
    assert merged == {"timeout": 1.0, "metadata": [("authorization", "x"), ("x-trace", "t")]}


# The CLI checks its arguments before it connects: no server is needed here.

runner = CliRunner()


def test_cli_malformed_property_exits_2(tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(_png())
    result = runner.invoke(
        app,
        ["explain", str(image), "--model", "m", "--property", "object_hue", "--target", "nohost:1"],
    )
    assert result.exit_code == 2
    assert "propscope: error: invalid property 'object_hue': missing '='" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_cli_duplicate_property_names_exit_2(tmp_path):
    image = tmp_path / "x.png"
    image.write_bytes(_png())
    result = runner.invoke(
        app, ["explain", str(image), "-m", "m", "-p", "a=ed", "-p", "a=ed2", "--target", "x:1"]
    )
    assert result.exit_code == 2
    assert "given twice" in result.stderr


def test_cli_unreadable_image_exits_2(tmp_path):
    result = runner.invoke(
        app, ["explain", str(tmp_path / "missing.png"), "-m", "m", "-p", "a=ed", "--target", "x:1"]
    )
    assert result.exit_code == 2
    assert "cannot read image" in result.stderr
    assert "Traceback" not in result.output


def test_cli_not_an_image_exits_2(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    result = runner.invoke(app, ["explain", str(text), "-m", "m", "-p", "a=ed", "--target", "x:1"])
    assert result.exit_code == 2
    assert "not an image" in result.stderr


def test_build_explain_request_preprocessing_labels_and_paths():
    request = build_explain_request(
        _png(),
        "resnet",
        ["a=ed"],
        steps=10,
        max_steps=40,
        preprocessing=Preprocessing(
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), output_kind="probabilities"
        ),
        class_labels=["cat", "dog"],
    )
    assert list(request.model.preprocessing.std) == pytest.approx([0.229, 0.224, 0.225])
    assert (
        request.model.preprocessing.output_kind
        == explain_pb2.Preprocessing.OUTPUT_KIND_PROBABILITIES
    )
    assert request.model.preprocessing.resize == explain_pb2.Preprocessing.RESIZE_MODE_UNSPECIFIED
    assert list(request.model.class_labels) == ["cat", "dog"]
    assert (request.path_mode, request.max_steps) == (explain_pb2.PATH_MODE_UNSPECIFIED, 40)
    fixed = build_explain_request(_png(), "resnet", ["a=ed"], path_mode="fixed")
    assert fixed.path_mode == explain_pb2.PATH_MODE_FIXED
    assert not fixed.model.HasField("preprocessing")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mean": (0.5, 0.5)}, "mean must be 3 numbers"),
        ({"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        ({"std": (0.2, float("nan"), 0.2)}, "std must be finite"),
        ({"output_kind": "softmax"}, "output_kind must be one of logits, probabilities"),
        ({"resize": "crop"}, "resize must be one of squash, center_crop, letterbox"),
    ],
)
def test_preprocessing_is_checked_locally(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocessing(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path_mode": "fixed", "max_steps": 40}, "only applies to adaptive paths"),
        ({"steps": 20, "max_steps": 10}, "must be at least steps"),
        ({"path_mode": "long"}, "path_mode must be one of adaptive, fixed"),
    ],
)
def test_path_options_are_checked_locally(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_explain_request(_png(), "resnet", ["a=ed"], **kwargs)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--mean", "0.5,0.5"], "--mean must be 3 comma-separated numbers"),
        (["--std", "0.2,0,0.2"], "--std must be positive"),
        (["--output-kind", "softmax"], "--output-kind must be one of logits, probabilities"),
        (["--resize", "crop"], "--resize must be one of"),
        (["--fixed-steps", "--max-steps", "40"], "--max-steps applies to adaptive paths"),
        (["-p", "b=ed;box=0,0,2,1"], "fractions in [0, 1]"),
        (["-p", "b=ed;mask=missing.png"], "cannot read mask"),
        (["-p", "b=@missing/"], "is not a folder"),
    ],
)
def test_cli_bad_preprocessing_paths_and_regions_exit_2(tmp_path, arguments, message):
    image = tmp_path / "x.png"
    image.write_bytes(_png())
    result = runner.invoke(
        app, ["explain", str(image), "-m", "m", "-p", "a=ed", *arguments, "--target", "x:1"]
    )
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
