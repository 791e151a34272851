"""propscope SDK and CLI against an in-process fake ExplainService (no Triton, no gateway)."""

import json
import threading
import time
import warnings
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.rpc import status_pb2
from typer.testing import CliRunner

from propscope import (
    Accepted,
    AlphaDroppedWarning,
    Client,
    Done,
    Preprocessing,
    Progress,
    PropertyResult,
    PropscopeError,
)
from propscope.cli import app
from propscope.v1 import explain_pb2, explain_pb2_grpc

LONG_WARNING = (
    "resnet declares no normalisation for its FP32 input: pixel values are scaled to [0, 1]; "
    "declare propscope.mean and propscope.std in its config.pbtxt if it was trained otherwise"
)
DETAIL = "Δp 0.80 ≥ 0.05, but no ordering of these 17 values reaches alpha 0.01 (N = 16 of 32)"


class FakeService(explain_pb2_grpc.ExplainServiceServicer):
    """Streams a fixed plan; the model "fail-midway" fails after Accepted, "endless" streams
    Progress until the client cancels, "silent" sends nothing more until then. ListModels with metadata x-fail: 1 is refused, with
    x-hang: 1 waits until the call is over."""

    def __init__(self):
        self.requests: list[explain_pb2.ExplainRequest] = []
        self.metadata: list[dict[str, str]] = []
        self.deadlines: list[float | None] = []
        self.cancelled = threading.Event()
        self.listing = threading.Event()

    def Explain(self, request, context):
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        self.deadlines.append(context.time_remaining())
        rid = request.request_id or "server-made"
        names = [p.name for p in request.properties]
        if request.model.name in ("endless", "silent"):  # streams that end by cancellation
            # Before the first event: a call cancelled once it is read has terminated, and
            # add_callback on a terminated call never calls back.
            context.add_callback(self.cancelled.set)
        yield explain_pb2.ExplainEvent(
            request_id=rid,
            accepted=explain_pb2.Accepted(
                property_names=names,
                samples=1,
                steps=4,
                path_mode=explain_pb2.PATH_MODE_ADAPTIVE,
                max_steps=32,
                warnings=[LONG_WARNING],
                class_labels=["c0", "c1", "c2", "c3", "tabby cat"],
                preprocessing=explain_pb2.Preprocessing(
                    output_kind=explain_pb2.Preprocessing.OUTPUT_KIND_PROBABILITIES
                ),
                preprocessing_sources=["output_kind: detected from the outputs"],
            ),
        )
        if request.model.name == "fail-midway":
            context.abort(grpc.StatusCode.UNAVAILABLE, "triton went away")
        if request.model.name == "silent":
            self.cancelled.wait(timeout=60)
            return
        if request.model.name == "endless":
            while context.is_active():
                yield explain_pb2.ExplainEvent(
                    request_id=rid, progress=explain_pb2.Progress(stage="edit", total=1)
                )
            return
        yield explain_pb2.ExplainEvent()  # an event kind this SDK does not know: skipped
        for i, name in enumerate(names):
            yield explain_pb2.ExplainEvent(
                request_id=rid,
                progress=explain_pb2.Progress(
                    stage="edit", property_name=name, completed=4, total=4
                ),
            )
            failed = name.startswith("bad")
            yield explain_pb2.ExplainEvent(
                request_id=rid,
                property_result=explain_pb2.PropertyResult(
                    property_name=name,
                    status=status_pb2.Status(code=3, message="unknown editor") if failed else None,
                    score=0.0 if failed else 0.1 * (i + 1),
                    score_per_unit_strength=0.0 if failed else 0.4 * (i + 1),
                    p_value=0.0 if failed else 0.001,
                    significant=not failed,
                    target_class=request.model.target_class,
                    samples=[]
                    if failed
                    else [
                        explain_pb2.SampleResult(
                            seed=request.seed, prediction_curve=[0.9, 0.7, 0.5, 0.3, 0.1]
                        )
                    ],
                    cache_misses=0 if failed else 1,
                    steps=0 if failed else 16,
                    decision=0 if failed else explain_pb2.DECISION_CANNOT_REACH_ALPHA,
                    decision_detail="" if failed else f"{name}: {DETAIL}",
                    warnings=[] if failed else ["the object mask touches 3 borders"],
                    edits=0 if failed else 28,
                ),
            )
        yield explain_pb2.ExplainEvent(
            request_id=rid,
            done=explain_pb2.Done(
                total_ms=12.0,
                edit_ms=5.0,
                classify_ms=4.0,
                score_ms=1.0,
                properties_failed=sum(n.startswith("bad") for n in names),
            ),
        )

    def ListModels(self, request, context):
        metadata = dict(context.invocation_metadata())
        if metadata.get("x-fail") == "1":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
        if metadata.get("x-hang") == "1":  # answers only once the call is over
            over = threading.Event()
            if context.add_callback(over.set):
                self.listing.set()
                over.wait(timeout=60)
        return explain_pb2.ListModelsResponse(
            models=[
                explain_pb2.ModelInfo(
                    name="resnet",
                    versions=["1"],
                    role=explain_pb2.ModelInfo.ROLE_CLASSIFIER,
                    state="READY",
                    inputs=[
                        explain_pb2.TensorInfo(name="INPUT", datatype="FP32", shape=[3, 224, 224])
                    ],
                    methods=["propgrad", "sobol", "rise"],
                ),
                explain_pb2.ModelInfo(
                    name="onnx_model",
                    state="UNAVAILABLE",
                    state_reason="unable to find backend library for backend 'onnxruntime'",
                ),
                explain_pb2.ModelInfo(
                    name="labelled",
                    state="READY",
                    preprocessing=explain_pb2.Preprocessing(
                        mean=[0.485, 0.456, 0.406],
                        std=[0.229, 0.224, 0.225],
                        resize=explain_pb2.Preprocessing.RESIZE_MODE_CENTER_CROP,
                    ),
                    class_labels=["cat", "dog", "fox", "owl", "emu"],
                ),
                explain_pb2.ModelInfo(
                    name="procedural",
                    role=explain_pb2.ModelInfo.ROLE_EDITOR,
                    state="READY",
                    editor_parameters=[
                        explain_pb2.EditorParameter(
                            name="operation", default_value="hue", choices=["hue", "blur"]
                        )
                    ],
                ),
                # Served, so that the CLI's pre-flight lets them through.
                explain_pb2.ModelInfo(name="vit", versions=["1"], state="READY"),
                explain_pb2.ModelInfo(name="fail-midway", versions=["1"], state="READY"),
            ]
        )


@pytest.fixture
def service():
    fake = FakeService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    explain_pb2_grpc.add_ExplainServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.target = f"127.0.0.1:{port}"
    yield fake
    server.stop(grace=None)


def _image() -> np.ndarray:
    return np.full((8, 8, 3), 200, dtype=np.uint8)


def test_explain_streams_typed_events(service):
    with Client(service.target, metadata=[("authorization", "t")], timeout=30) as client:
        events = list(
            client.explain(
                _image(),
                "resnet",
                ["hue=procedural:operation=hue", "bad=nope"],
                seed=5,
                target_class=2,
                request_id="mine",
                metadata=[("x-trace", "abc")],
            )
        )
    kinds = [type(e) for e in events]
    assert kinds == [Accepted, Progress, PropertyResult, Progress, PropertyResult, Done]
    assert {e.request_id for e in events} == {"mine"}
    hue, bad = events[2], events[4]
    assert hue.ok and hue.target_class == 2 and hue.samples[0].seed == 5
    assert not bad.ok and bad.error == "unknown editor"
    assert events[-1].properties_failed == 1

    request = service.requests[0]
    assert request.model.target_class == 2
    assert request.image.startswith(b"\x89PNG")
    assert service.metadata[0]["authorization"] == "t"
    assert service.metadata[0]["x-trace"] == "abc"
    # the client timeout arrives as the deadline; gRPC rounds its timeout header up (~0.1 s)
    assert 25 < service.deadlines[0] <= 31


def test_explain_error_midway(service):
    with Client(service.target) as client:
        stream = client.explain(_image(), "fail-midway", ["a=ed"])
        assert isinstance(next(stream), Accepted)
        with pytest.raises(PropscopeError) as info:
            next(stream)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.message == "triton went away"


def test_explain_bad_arguments_raise_before_the_call(service):
    with Client(service.target) as client:
        with pytest.raises(ValueError, match="invalid property"):
            client.explain(_image(), "resnet", ["nonsense"])
    assert service.requests == []


def test_closing_the_stream_cancels_the_call(service):
    with Client(service.target) as client:
        stream = client.explain(_image(), "endless", ["a=ed"])
        next(stream)
        next(stream)
        stream.close()
        assert service.cancelled.wait(timeout=10)


def test_closing_a_stream_another_thread_reads_cancels_the_call(service):
    with Client(service.target) as client:
        stream = client.explain(_image(), "silent", ["a=ed"])
        next(stream)
        with futures.ThreadPoolExecutor(max_workers=1) as pool:
            reading = pool.submit(stream.result)
            deadline = time.monotonic() + 10
            while not stream._events.gi_running:  # until the reader waits inside the stream
                assert time.monotonic() < deadline, "the reader never read"
            stream.close()
            with pytest.raises(PropscopeError) as info:
                reading.result(timeout=10)
    assert info.value.code == grpc.StatusCode.CANCELLED
    assert service.cancelled.wait(timeout=10)


def test_unreachable_server_raises_propscope_error():
    with Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(PropscopeError) as info:
            client.list_models()
    assert info.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_list_models(service):
    with Client(service.target) as client:
        models = client.list_models()
        assert [m.name for m in models][:4] == ["resnet", "onnx_model", "labelled", "procedural"]
        assert models[3].editor_parameters[0].choices == ("hue", "blur")
        # Any model that is not an editor is a classifier, its role declared or not.
        assert [m.is_classifier for m in models][:4] == [True, True, True, False]
        assert models[1].state_reason.endswith("backend 'onnxruntime'")
        assert models[2].preprocessing == Preprocessing(
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize="center_crop"
        )
        assert models[2].class_labels == ("cat", "dog", "fox", "owl", "emu")
        with pytest.raises(PropscopeError) as info:
            client.list_models(metadata=[("x-fail", "1")])
        assert info.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_closed_client_refuses_calls(service):
    client = Client(service.target)
    client.close()
    client.close()
    with pytest.raises(ValueError, match="closed"):
        client.list_models()


# --- CLI --------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(_image()).save(path)
    return path


def test_cli_explain_json(service, image_file):
    result = runner.invoke(
        app,
        [
            "explain",
            str(image_file),
            "--model",
            "resnet",
            "--model",
            "vit",
            "--property",
            "hue=procedural:operation=hue",
            "--property",
            "bad=procedural",
            "--seed",
            "3",
            "--json",
            "--target",
            service.target,
        ],
    )
    assert result.exit_code == 3, result.output  # a property failed
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["model"] for line in lines] == ["resnet"] * 6 + ["vit"] * 6
    assert [line["event"] for line in lines[:6]] == [
        "Accepted",
        "Progress",
        "PropertyResult",
        "Progress",
        "PropertyResult",
        "Done",
    ]
    assert lines[2]["ok"] is True and lines[4]["ok"] is False
    assert lines[4]["status_code"] == "INVALID_ARGUMENT"
    # Same seed for every model, predicted class by default.
    assert [r.seed for r in service.requests] == [3, 3]
    assert all(r.model.predicted_class for r in service.requests)


def test_cli_explain_table(service, image_file, monkeypatch):
    monkeypatch.setenv("PROPSCOPE_TARGET", service.target)
    monkeypatch.setenv("COLUMNS", "80")
    result = runner.invoke(
        app,
        [
            "explain",
            str(image_file),
            "-m",
            "resnet",
            "-p",
            "background_brightness=procedural",
            "-p",
            "bad=procedural",
            "--target-class",
            "4",
        ],
    )
    assert result.exit_code == 3, result.output  # a property failed
    out = result.stdout
    lines = out.splitlines()
    # Readable at 80 columns: no table line wider, every header and every cell whole on its
    # row; piped, each note under the table ("name: ...") stays one line, however long.
    assert max(len(line) for line in lines if ": " not in line) <= 80
    rows = {line.split()[0]: line.split() for line in lines if line.strip()}  # by 1st cell
    assert rows["property"] == "property score p-value Δp N decision flip target".split()
    assert rows["background_brightness"] == (
        "background_brightness 0.1 0.001 0.00 16 undecided no tabby cat".split()
    )
    assert rows["bad"] == ["bad", "failed"]
    # Warnings, reasons and errors come whole (wrapped, never cut) under the table.
    flat = " ".join(out.split())
    assert f"resnet: warning: {LONG_WARNING}" in flat
    assert f"background_brightness: background_brightness: {DETAIL}" in flat
    assert "background_brightness: warning: the object mask touches 3 borders" in flat
    assert "bad: failed: INVALID_ARGUMENT: unknown editor" in flat
    assert "resnet: total 12 ms, edit 5 ms, classify 4 ms, score 1 ms" in flat
    assert service.requests[0].model.target_class == 4


def test_cli_sends_preprocessing_labels_and_path_options(service, image_file, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n\n")
    arguments = ["explain", str(image_file), "-m", "resnet", "-p", "a=procedural", "--json"]
    arguments += ["--target", service.target, "--mean", "0.485,0.456,0.406"]
    arguments += ["--std", "0.229, 0.224, 0.225", "--output-kind", "logits"]
    arguments += ["--resize", "letterbox", "--labels", str(labels), "--fixed-steps"]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    model = service.requests[-1].model
    assert list(model.preprocessing.mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(model.preprocessing.std) == pytest.approx([0.229, 0.224, 0.225])
    assert model.preprocessing.output_kind == explain_pb2.Preprocessing.OUTPUT_KIND_LOGITS
    assert model.preprocessing.resize == explain_pb2.Preprocessing.RESIZE_MODE_LETTERBOX
    assert list(model.class_labels) == ["cat", "dog"]
    assert service.requests[-1].path_mode == explain_pb2.PATH_MODE_FIXED
    result = runner.invoke(app, [*arguments[:9], "--labels", "a, b ,c", "--max-steps", "64"])
    assert result.exit_code == 0, result.output
    assert list(service.requests[-1].model.class_labels) == ["a", "b", "c"]
    assert service.requests[-1].path_mode == explain_pb2.PATH_MODE_UNSPECIFIED
    assert service.requests[-1].max_steps == 64
    assert not service.requests[-1].model.HasField("preprocessing")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    accepted = next(e for e in events if e["event"] == "Accepted")
    assert accepted["path_mode"] == "adaptive" and accepted["max_steps"] == 32
    assert accepted["warnings"] == [LONG_WARNING]
    assert accepted["preprocessing"]["output_kind"] == "probabilities"
    assert accepted["preprocessing_sources"] == ["output_kind: detected from the outputs"]
    found = next(e for e in events if e["event"] == "PropertyResult")
    assert found["decision"] == "cannot_reach_alpha" and found["steps"] == 16
    assert found["edits"] == 28 and found["decision_detail"] == f"a: {DETAIL}"


def test_cli_explain_error_midway_exits_2(service, image_file):
    result = runner.invoke(
        app,
        [
            "explain",
            str(image_file),
            "-m",
            "fail-midway",
            "-p",
            "a=procedural",
            "--json",
            "--target",
            service.target,
        ],
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"propscope: error: {service.target}: UNAVAILABLE: triton went away"
    )


def test_cli_warns_once_about_an_image_alpha_sent_to_two_models(service, tmp_path):
    from PIL import Image

    pixels = np.full((8, 8, 4), 200, np.uint8)
    pixels[0, 0, 3] = 0
    path = tmp_path / "logo.png"
    Image.fromarray(pixels).save(path)
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        result = runner.invoke(
            app,
            ["explain", str(path), "-m", "resnet", "-m", "vit", "-p", "hue=procedural"]
            + ["--json", "--target", service.target],
        )
    assert result.exit_code == 0, result.output
    assert [r.model.name for r in service.requests] == ["resnet", "vit"]
    assert result.stderr.count("has transparent pixels") == 1, result.stderr
    assert not [w for w in raw if issubclass(w.category, AlphaDroppedWarning)]


def test_cli_models(service):
    result = runner.invoke(app, ["models", "--target", service.target, "--json"])
    assert result.exit_code == 0, result.output
    models = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(m["name"], m["role"]) for m in models] == [
        ("resnet", "classifier"),
        ("onnx_model", "unspecified"),
        ("labelled", "unspecified"),
        ("procedural", "editor"),
        ("vit", "unspecified"),
        ("fail-midway", "unspecified"),
    ]
    assert models[1]["state_reason"].startswith("unable to find backend library")
    assert models[2]["class_labels"][:2] == ["cat", "dog"]
    assert models[2]["preprocessing"]["resize"] == "center_crop"
    result = runner.invoke(app, ["models", "--target", service.target], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "procedural" in result.stdout and "operation=hue (hue|blur)" in result.stdout
    assert "center_crop" in result.stdout and "labels: cat, dog, fox, owl, ... (5" in result.stdout
    flat = " ".join(result.stdout.split())
    assert "methods: propgrad, sobol, rise" in flat
    assert (
        "onnx_model: UNAVAILABLE: unable to find backend library for backend 'onnxruntime'" in flat
    )


def test_cli_unreachable_server_exits_2():
    result = runner.invoke(app, ["models", "--target", "127.0.0.1:1", "--timeout", "5"])
    assert result.exit_code == 2
    assert result.stderr.startswith("propscope: error: 127.0.0.1:1: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_cli_report_asks_for_thumbnails_and_states_its_duration(service, image_file, tmp_path):
    report = tmp_path / "report.html"
    arguments = ["explain", str(image_file), "-m", "resnet", "-p", "a=procedural"]
    result = runner.invoke(app, [*arguments, "--target", service.target, "--report", str(report)])
    assert result.exit_code == 0, result.output
    request = service.requests[-1]
    assert request.return_path_images and request.path_image_max_side_px == 160
    assert "took – s" not in report.read_text()
