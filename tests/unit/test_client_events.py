"""propscope SDK: typed events from hand-built protos, image arguments and error translation."""

import base64
import io
import json

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from propscope import (
    Accepted,
    Decision,
    Done,
    ModelInfo,
    ModelRole,
    Preprocessing,
    Progress,
    PropertyResult,
    PropscopeError,
    SampleResult,
    encode_image,
    event_from_proto,
)
from propscope.v1 import explain_pb2

# --- events -----------------------------------------------------------------------------------


def test_accepted_from_proto():
    msg = explain_pb2.ExplainEvent(
        request_id="r1",
        accepted=explain_pb2.Accepted(
            property_names=["hue", "blur"],
            samples=2,
            steps=10,
            permutations=10000,
            alpha=0.01,
            model_version="3",
            planned_edits=40,
            planned_classifications=44,
            min_probability_change=0.05,
        ),
    )
    event = event_from_proto(msg)
    assert event == Accepted(
        request_id="r1",
        property_names=("hue", "blur"),
        samples=2,
        steps=10,
        permutations=10000,
        alpha=0.01,
        model_version="3",
        planned_edits=40,
        planned_classifications=44,
        min_probability_change=0.05,
    )
    assert event.to_dict()["property_names"] == ["hue", "blur"]


def test_progress_from_proto():
    msg = explain_pb2.ExplainEvent(
        request_id="r1",
        progress=explain_pb2.Progress(stage="edit", property_name="hue", completed=3, total=10),
    )
    assert event_from_proto(msg) == Progress("r1", "edit", "hue", 3, 10)


def _sample(seed: int, images: list[bytes] = ()) -> explain_pb2.SampleResult:
    return explain_pb2.SampleResult(
        seed=seed,
        score=0.25,
        p_value=0.001,
        prediction_curve=[0.9, 0.5, 0.1],
        predicted_classes=[1, 1, 2],
        cache_hit=seed % 2 == 0,
        path_images=images,
    )


def test_property_result_ok_from_proto():
    msg = explain_pb2.ExplainEvent(
        request_id="r2",
        property_result=explain_pb2.PropertyResult(
            property_name="hue",
            status=status_pb2.Status(code=0),
            score=0.25,
            score_per_unit_strength=0.5,
            score_ci_low=0.2,
            score_ci_high=0.3,
            p_value=0.001,
            significant=True,
            prediction_flipped=True,
            flip_rate=0.5,
            mean_signed_gradient=-0.4,
            target_class=1,
            samples=[_sample(7), _sample(8, [b"png0", b"png1", b"png2"])],
            cache_hits=1,
            cache_misses=1,
        ),
    )
    event = event_from_proto(msg)
    assert isinstance(event, PropertyResult)
    assert event.ok and event.error is None and event.status_code == grpc.StatusCode.OK
    assert event.request_id == "r2"
    assert (event.score, event.p_value, event.significant) == (0.25, 0.001, True)
    assert (event.cache_hits, event.cache_misses, event.target_class) == (1, 1, 1)
    first, second = event.samples
    assert isinstance(first, SampleResult)
    assert first.prediction_curve.dtype == np.float64
    np.testing.assert_allclose(first.prediction_curve, [0.9, 0.5, 0.1], rtol=1e-6)
    np.testing.assert_array_equal(first.predicted_classes, [1, 1, 2])
    assert not first.prediction_curve.flags.writeable
    assert first.path_images == ()
    assert second.path_images == (b"png0", b"png1", b"png2")
    # The same proto gives an equal event.
    assert event_from_proto(msg) == event

    data = event.to_dict()
    json.dumps(data)  # JSON-ready
    assert data["ok"] is True and data["status_code"] == "OK" and data["error"] is None
    assert data["samples"][0]["prediction_curve"] == [0.9, 0.5, 0.1]  # float32 spelled short
    assert data["samples"][0]["predicted_classes"] == [1, 1, 2]
    assert "path_images" not in data["samples"][0]
    images = data["samples"][1]["path_images"]
    assert [base64.b64decode(s) for s in images] == [b"png0", b"png1", b"png2"]


def test_property_result_without_status_is_ok():
    event = PropertyResult.from_proto(explain_pb2.PropertyResult(property_name="p"), "r")
    assert event.ok and event.error is None


def test_failed_property_result():
    msg = explain_pb2.ExplainEvent(
        request_id="r3",
        property_result=explain_pb2.PropertyResult(
            property_name="blur",
            status=status_pb2.Status(code=3, message="unknown editor parameter 'sigmaa'"),
        ),
    )
    event = event_from_proto(msg)
    assert isinstance(event, PropertyResult)
    assert not event.ok
    assert event.status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert event.error == "unknown editor parameter 'sigmaa'"
    assert event.samples == ()
    data = event.to_dict()
    assert data["ok"] is False
    assert data["status_code"] == "INVALID_ARGUMENT"
    assert data["error"] == "unknown editor parameter 'sigmaa'"


def test_failed_property_result_without_message_uses_code_name():
    event = PropertyResult.from_proto(
        explain_pb2.PropertyResult(property_name="p", status=status_pb2.Status(code=14))
    )
    assert event.status_code == grpc.StatusCode.UNAVAILABLE
    assert event.error == "UNAVAILABLE"


def test_done_from_proto_and_nan_in_json():
    msg = explain_pb2.ExplainEvent(
        request_id="r4",
        done=explain_pb2.Done(
            total_ms=120.5,
            edit_ms=60,
            classify_ms=40,
            score_ms=10,
            cache_ms=float("nan"),
            properties_failed=1,
        ),
    )
    event = event_from_proto(msg)
    assert isinstance(event, Done)
    assert (event.request_id, event.total_ms, event.properties_failed) == ("r4", 120.5, 1)
    data = event.to_dict()
    assert data["cache_ms"] is None  # strict JSON has no NaN
    json.dumps(data, allow_nan=False)


def test_event_from_proto_without_event():
    with pytest.raises(ValueError, match="no known event"):
        event_from_proto(explain_pb2.ExplainEvent(request_id="r"))


def test_model_info_from_proto():
    msg = explain_pb2.ModelInfo(
        name="procedural",
        versions=["1", "2"],
        role=explain_pb2.ModelInfo.ROLE_EDITOR,
        state="READY",
        inputs=[explain_pb2.TensorInfo(name="IMAGE", datatype="UINT8", shape=[-1, -1, 3])],
        outputs=[explain_pb2.TensorInfo(name="EDITED", datatype="UINT8", shape=[-1, -1, 3])],
        max_batch_size=8,
        editor_parameters=[
            explain_pb2.EditorParameter(
                name="operation", description="what", default_value="hue", choices=["hue", "blur"]
            )
        ],
        description="procedural edits",
    )
    info = ModelInfo.from_proto(msg)
    assert info.role is ModelRole.EDITOR
    assert info.versions == ("1", "2")
    assert info.inputs[0].shape == (-1, -1, 3)
    assert info.editor_parameters[0].choices == ("hue", "blur")
    data = info.to_dict()
    assert data["role"] == "editor"
    assert data["inputs"] == [{"name": "IMAGE", "datatype": "UINT8", "shape": [-1, -1, 3]}]
    assert data["editor_parameters"][0]["choices"] == ["hue", "blur"]
    json.dumps(data)
    assert ModelInfo.from_proto(explain_pb2.ModelInfo(name="x")).role is ModelRole.UNSPECIFIED


# --- images -----------------------------------------------------------------------------------


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _array() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)


def test_encode_array_to_png():
    array = _array()
    np.testing.assert_array_equal(_decode(encode_image(array)), array)


def test_encode_non_contiguous_array():
    array = _array()[:, ::-1]
    np.testing.assert_array_equal(_decode(encode_image(array)), array)


def test_encode_png_bytes_and_path_unchanged(tmp_path):
    png = encode_image(_array())
    assert encode_image(png) == png
    assert encode_image(bytearray(png)) == png
    path = tmp_path / "x.png"
    path.write_bytes(png)
    assert encode_image(path) == png
    assert encode_image(str(path)) == png


def test_encode_jpeg_unchanged(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(_array()).save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    assert encode_image(jpeg) == jpeg


def test_encode_other_format_converted_to_png(tmp_path):
    array = _array()
    path = tmp_path / "x.bmp"
    Image.fromarray(array).save(path, format="BMP")
    np.testing.assert_array_equal(_decode(encode_image(path)), array)


def test_encode_pil_image():
    array = _array()
    np.testing.assert_array_equal(_decode(encode_image(Image.fromarray(array))), array)


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (np.zeros((4, 4, 3), dtype=np.float32), ValueError, "uint8"),
        (np.zeros((4, 4), dtype=np.uint8), ValueError, "HxWx3"),
        (np.zeros((4, 4, 4), dtype=np.uint8), ValueError, "HxWx3"),
        (np.zeros((0, 4, 3), dtype=np.uint8), ValueError, "empty"),
        (b"", ValueError, "empty"),
        (b"definitely not an image", ValueError, "not an image"),
        (42, TypeError, "image must be"),
    ],
)
def test_encode_image_errors(image, error, message):
    with pytest.raises(error, match=message):
        encode_image(image)


def test_encode_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        encode_image(tmp_path / "missing.png")


# --- errors -----------------------------------------------------------------------------------


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details, trailing=()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailing


def test_error_from_rpc_error():
    error = PropscopeError.from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "no model x"))
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert error.message == "no model x"
    assert str(error) == "NOT_FOUND: no model x"
    assert error.field_violations == ()


def test_error_with_bad_request_details():
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="steps", description="2..256")
        ]
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    status = status_pb2.Status(code=3, message="invalid request", details=[detail])
    trailing = (("other", "x"), ("grpc-status-details-bin", status.SerializeToString()))
    error = PropscopeError.from_rpc_error(
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "invalid request", trailing)
    )
    assert error.field_violations == (("steps", "2..256"),)
    assert len(error.details) == 1
    assert str(error) == "INVALID_ARGUMENT: invalid request (steps: 2..256)"


def test_error_from_bare_rpc_error():
    error = PropscopeError.from_rpc_error(grpc.RpcError())
    assert error.code == grpc.StatusCode.UNKNOWN
    assert error.message == "UNKNOWN"


def test_accepted_carries_paths_preprocessing_warnings_and_labels():
    msg = explain_pb2.ExplainEvent(
        accepted=explain_pb2.Accepted(
            steps=10,
            path_mode=explain_pb2.PATH_MODE_FIXED,
            max_steps=10,
            preprocessing=explain_pb2.Preprocessing(
                mean=[0.5, 0.5, 0.5],
                std=[0.25, 0.25, 0.25],
                output_kind=explain_pb2.Preprocessing.OUTPUT_KIND_PROBABILITIES,
                resize=explain_pb2.Preprocessing.RESIZE_MODE_LETTERBOX,
            ),
            preprocessing_sources=["mean: model config", "output_kind: detected"],
            warnings=["detected probabilities"],
            class_labels=["cat", "dog"],
        )
    )
    event = event_from_proto(msg)
    assert (event.path_mode, event.max_steps) == ("fixed", 10)
    assert event.preprocessing == Preprocessing(
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        output_kind="probabilities",
        resize="letterbox",
    )
    assert event.class_name(1) == "dog" and event.class_name(2) is None
    data = json.loads(json.dumps(event.to_dict()))
    assert data["preprocessing"] == {
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "output_kind": "probabilities",
        "resize": "letterbox",
    }
    assert data["preprocessing_sources"] == ["mean: model config", "output_kind: detected"]
    assert data["warnings"] == ["detected probabilities"] and data["class_labels"] == ["cat", "dog"]
    # Unset in the message: adaptive (the contract's default) and nothing declared.
    bare = event_from_proto(explain_pb2.ExplainEvent(accepted=explain_pb2.Accepted()))
    assert bare.path_mode == "adaptive" and bare.preprocessing == Preprocessing()


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        (explain_pb2.DECISION_RELEVANT, Decision.RELEVANT),
        (explain_pb2.DECISION_NOT_SIGNIFICANT, Decision.NOT_SIGNIFICANT),
        (explain_pb2.DECISION_CHANGE_TOO_SMALL, Decision.CHANGE_TOO_SMALL),
        (explain_pb2.DECISION_CANNOT_REACH_ALPHA, Decision.CANNOT_REACH_ALPHA),
        (explain_pb2.DECISION_UNSPECIFIED, Decision.UNSPECIFIED),
    ],
)
def test_property_result_decision_steps_warnings_and_label(decision, expected):
    msg = explain_pb2.ExplainEvent(
        property_result=explain_pb2.PropertyResult(
            property_name="hue",
            steps=40,
            decision=decision,
            decision_detail="why, with numbers",
            warnings=["the object mask touches 3 borders"],
            target_label="cat",
            edits=70,
        )
    )
    event = event_from_proto(msg)
    assert (event.steps, event.decision, event.edits) == (40, expected, 70)
    assert event.warnings == ("the object mask touches 3 borders",)
    data = event.to_dict()
    assert data["decision"] == expected.value and data["target_label"] == "cat"
    assert data["decision_detail"] == "why, with numbers"
