"""propscope SDK: properties, their text syntax, request building and the CLI's argument errors."""

import pytest
from typer.testing import CliRunner

from propscope import Property, parse_property
from propscope._requests import build_explain_request, call_options, normalize_properties
from propscope.cli import app
from propscope.v1 import explain_pb2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "object_hue=procedural:operation=hue,region=object,degrees=180",
            Property(
                "object_hue",
                "procedural",
                {"operation": "hue", "region": "object", "degrees": "180"},
            ),
        ),
        ("blur=gaussian", Property("blur", "gaussian")),
        (" blur = gaussian @ 2 ", Property("blur", "gaussian", editor_version="2")),
        ("b=ed@1:sigma=2", Property("b", "ed", {"sigma": "2"}, editor_version="1")),
        ("b=ed: sigma = 2 , k=v", Property("b", "ed", {"sigma": " 2 ", "k": "v"})),
        # Values keep '=', ':' and commas that are not followed by key=.
        ("u=ed:url=http://x/y?a=b", Property("u", "ed", {"url": "http://x/y?a=b"})),
        (
            "p=diffusion:prompt=a red car, at night,steps=4",
            Property("p", "diffusion", {"prompt": "a red car, at night", "steps": "4"}),
        ),
    ],
)
def test_parse_property_valid(text, expected):
    assert parse_property(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("object_hue", "missing '='"),
        ("", "missing '='"),
        ("=procedural", "empty name"),
        ("hue=", "empty editor"),
        ("hue=:a=b", "empty editor"),
        ("hue=ed@", "empty editor version"),
        ("hue=ed:", "no parameters"),
        ("hue=ed:operation", "'operation' is not key=value"),
        ("hue=ed:=hue", "is not key=value"),
        ("hue=ed:a=1,a=2", "'a' given twice"),
        ("hue=ed:a=1,", "empty parameter"),
        ("hue=ed:a=1,,b=2", "empty parameter"),
    ],
)
def test_parse_property_invalid(text, message):
    with pytest.raises(ValueError, match="invalid property") as info:
        parse_property(text)
    assert message in str(info.value)


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
