"""Editors report their progress without changing their paths: the procedural editor
per seed (the diffusion editors, per denoising step: test_diffusion_editors.py), and
the Triton wrapper of a decoupled editor sends each report before the request's
final response, and the gateway asks for the reports only of an editor that declares
them."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from propscope_server.backends.triton import TritonBackend
from propscope_server.editor_contract import EditRequest, SeedBySeed
from propscope_server.inference import ModelDescription, Tensor
from propscope_server.synthetic.world import Scene, render
from propscope_server.triton_models.editors.procedural import edit_path
from tests.unit.test_sick_backends import over

IMAGE = render(Scene(0, 10.0, 13.0, 0.5, False, (32.0, 32.0)))
STRENGTHS = np.arange(1, 7, dtype=np.float32) / 6
HUE = {"operation": "hue", "region": "object", "amount": ""}
MODELS = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "models"


def triton_config(path: Path) -> dict:
    """A config.pbtxt as the Python backend receives it (args["model_config"])."""
    message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def test_the_procedural_editor_reports_each_seed_but_the_last_and_edits_the_same_paths():
    reports = []
    silent, reported = SeedBySeed(edit_path).edit_many(
        [
            EditRequest(IMAGE, STRENGTHS, HUE, [4, 5, 6]),
            EditRequest(IMAGE, STRENGTHS, HUE, [4, 5, 6], progress=lambda *r: reports.append(r)),
        ]
    )
    assert reports == [(1, 3), (2, 3)]  # the path itself is the last unit
    assert np.array_equal(silent, reported)


class Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[object, int]] = []

    def send(self, response: object, flags: int = 0) -> None:
        self.sent.append((response, flags))


class Request(dict):
    def __init__(self, tensors: dict[str, np.ndarray], cancelled: bool = False) -> None:
        super().__init__(
            {name: types.SimpleNamespace(as_numpy=lambda a=a: a) for name, a in tensors.items()}
        )
        self.sender, self.cancelled = Sender(), cancelled

    def get_response_sender(self) -> Sender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancelled


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The part of Triton's triton_python_backend_utils the editor wrapper uses."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = lambda name, array: types.SimpleNamespace(name=name, array=array)
    fake.InferenceResponse = lambda tensors=(), error=None: types.SimpleNamespace(
        tensors={t.name: t.array for t in tensors}, error=error
    )
    fake.TritonError = type(
        "TritonError",
        (str,),
        {"CANCELLED": 1, "__new__": lambda cls, message, code=0: str.__new__(cls, message)},
    )
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    fake.using_decoupled_model_transaction_policy = lambda config: config.get(
        "model_transaction_policy", {}
    ).get("decoupled", False)
    metric = types.SimpleNamespace(increment=lambda value: None)
    family = types.SimpleNamespace(Metric=lambda labels: metric)
    fake.MetricFamily = type(
        "MetricFamily", (), {"COUNTER": 0, "__new__": lambda cls, **kw: family}
    )
    fake.logged = []
    fake.Logger = types.SimpleNamespace(log_error=fake.logged.append, log_warn=fake.logged.append)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(
        sys.modules, "propscope_server.triton_models.editors.triton_model", raising=False
    )
    return fake


def procedural_model(config: dict) -> object:
    from propscope_server.triton_models.editors.triton_model import editor_model

    model = editor_model(lambda context: SeedBySeed(edit_path))()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(MODELS / "procedural"),
            "model_name": "procedural",
            "model_instance_name": "procedural_0",
        }
    )
    return model


def path_request(seeds: list[int], cancelled: bool = False) -> Request:
    parameters = json.dumps({"operation": "hue", "region": "object"}).encode()
    return Request(
        {
            "IMAGE": IMAGE,
            "STRENGTHS": STRENGTHS,
            "PARAMETERS": np.array([parameters], dtype=np.object_),
            "SEED": np.array(seeds, np.int64),
        },
        cancelled,
    )


def test_a_decoupled_editor_sends_progress_then_the_path_as_the_final_response(pb_utils):
    config = triton_config(MODELS / "procedural" / "config.pbtxt")
    assert config["model_transaction_policy"]["decoupled"]
    model = procedural_model(config)
    followed, cancelled = path_request([1, 2, 3]), path_request([1, 2], cancelled=True)
    assert model.execute([followed, cancelled]) is None
    *progress, (final, flags) = followed.sender.sent
    assert [(r.tensors["PROGRESS"].tolist(), f) for r, f in progress] == [([1, 3], 0), ([2, 3], 0)]
    assert flags == pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert final.tensors["PATH"].shape == (3, len(STRENGTHS), *IMAGE.shape)
    ((response, flags),) = cancelled.sender.sent  # no progress, only its error
    assert response.error == "the edit was cancelled" and flags


def test_a_progress_report_that_cannot_be_sent_does_not_fail_the_edit(pb_utils):
    request = path_request([1, 2])
    sent = request.sender.send

    def send(response: object, flags: int = 0) -> None:
        if not flags:
            raise RuntimeError("the stream is gone")
        sent(response, flags)

    request.sender.send = send
    procedural_model(triton_config(MODELS / "procedural" / "config.pbtxt")).execute([request])
    ((final, _),) = request.sender.sent
    assert final.tensors["PATH"].shape == (2, len(STRENGTHS), *IMAGE.shape)
    assert pb_utils.logged == ["progress not sent: RuntimeError('the stream is gone')"]


def test_an_editor_that_is_not_decoupled_answers_once(pb_utils):
    config = triton_config(MODELS / "procedural" / "config.pbtxt")
    del config["model_transaction_policy"]
    request = path_request([1, 2, 3])
    (response,) = procedural_model(config).execute([request])
    assert request.sender.sent == []
    assert response.tensors["PATH"].shape == (3, len(STRENGTHS), *IMAGE.shape)


class StreamResult:
    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.tensors.get(name)


class StreamingTriton:
    """tritonclient's aio stream_infer as a decoupled editor answers it: the outputs asked
    for are recorded, Triton's refusal of an undeclared one is kept."""

    def __init__(self, declared: set[str], responses: list[dict[str, np.ndarray]]) -> None:
        self.declared, self.responses = declared, responses
        self.requested: list[str] = []

    def stream_infer(self, requests, stream_timeout: float) -> StreamingTriton:
        self.requests = requests
        return self

    async def __aiter__(self):
        async for request in self.requests:
            self.requested = [output.name() for output in request["outputs"]]
        if undeclared := set(self.requested) - self.declared:
            yield None, InferenceServerException(f"unexpected inference output {undeclared}")
            return
        for tensors in self.responses:
            yield StreamResult(tensors), None

    def cancel(self) -> None:
        """Closes the stream."""


def decoupled_editor(outputs: tuple[str, ...]) -> ModelDescription:
    return ModelDescription(
        name="editor",
        version="1",
        versions=("1",),
        role="editor",
        inputs=(),
        outputs=tuple(Tensor(name, "INT64", [2]) for name in outputs),
        max_batch_size=0,
        decoupled=True,
    )


@pytest.mark.parametrize(
    ("outputs", "reports"), [(("PATH", "PROGRESS"), [(1, 2)]), (("PATH",), [])]
)
async def test_a_decoupled_editor_is_asked_for_progress_only_when_it_declares_it(outputs, reports):
    path = np.zeros((2, len(STRENGTHS), *IMAGE.shape), np.uint8)
    progress = [{"PROGRESS": np.array([1, 2], np.int64)}] if "PROGRESS" in outputs else []
    triton = StreamingTriton(set(outputs), [*progress, {"PATH": path}])
    backend = TritonBackend(over(triton), 30.0)
    received = []
    edited = await backend.edit(
        decoupled_editor(outputs),
        IMAGE,
        STRENGTHS,
        "{}",
        [1, 2],
        None,
        lambda *r: received.append(r),
    )
    assert triton.requested == list(outputs)
    assert received == reports and np.array_equal(edited, path)
