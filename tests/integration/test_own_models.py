"""A team's own classifiers (examples/own-models) end to end on a stack of their own:
ONNX, TorchScript and state_dict files served by the ready kinds, explained with the
preprocessing their configs declare, and every score equal to the same path computed
in this process (the procedural editor's code, the file run by torch or onnxruntime,
the gateway's scoring). Models whose outputs are probabilities, declared or detected,
give their logits twin's probability change."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
import torch
import tritonclient.grpc as triton_grpc
from PIL import Image
from scipy.special import softmax

from propscope.v1 import explain_pb2, explain_pb2_grpc
from propscope_dev import stack
from propscope_server.editor_contract import SCHEMA_PARAMETER, EditorSchema
from propscope_server.orchestration.explain import sample_seed
from propscope_server.scoring.property_gradient import PropertyScore, score_property
from propscope_server.triton_models.editors.procedural import edit_path
from tests.integration.conftest import SAMPLE, scene_png

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own-models"
# What the example configs declare.
MEAN = np.asarray((0.485, 0.456, 0.406), dtype=np.float32)
STD = np.asarray((0.229, 0.224, 0.225), dtype=np.float32)
LABELS = ["circle", "square"]
STEPS, SEED, PERMUTATIONS, ALPHA = 10, 3, 2000, 0.01
PROPERTY = "object_hue"
HUE = {"operation": "hue", "region": "object"}
# image -> (PNG, the edit): the shortcut flips within a step on the first two; the third's
# smaller rotation passes through intermediate probabilities (1, 0.99, 0.71, 0.09, 0.005 ...),
# where a preprocessing mistake could not hide behind a saturated softmax.
CASES = {
    "sample": (SAMPLE.read_bytes(), HUE),  # a red circle
    "cyan_square": (
        scene_png(shape=1, hue_deg=185.0, radius_px=12.0, center=(30.0, 34.0)),
        HUE,
    ),
    "orange_circle": (scene_png(shape=0, hue_deg=60.0), {**HUE, "amount": "40"}),
}
# model -> (file in 1/, how this module runs it)
BROKEN = "own_missing_file"
FILES = {
    "own_onnx": ("model.onnx", "onnx"),
    "own_torchscript": ("model.pt", "torchscript"),
    "own_state_dict": ("weights.pt", "state_dict"),
}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("own-models") / "repository"
    subprocess.run(
        [sys.executable, str(EXAMPLE / "build.py"), "--out", str(out)], check=True, timeout=300
    )
    # A team's typo: the config names a file the version folder lacks.
    shutil.copytree(out / "own_onnx", out / BROKEN)
    config = (out / BROKEN / "config.pbtxt").read_text()
    (out / BROKEN / "config.pbtxt").write_text(
        config.replace('"own_onnx"', f'"{BROKEN}"').replace('"model.onnx"', '"modle.onnx"')
    )
    return out


@pytest.fixture(scope="module")
def own_stack(repository: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("own-stack")
    info = stack.up(run_dir, gateway_port=stack.free_port(), model_repositories=(repository,))
    try:
        yield info
    finally:
        stack.down(run_dir)


@pytest.fixture(scope="module")
def service(own_stack: stack.StackInfo):
    with grpc.insecure_channel(own_stack.gateway) as channel:
        yield explain_pb2_grpc.ExplainServiceStub(channel)


@pytest.fixture(scope="module")
def editor_schema(own_stack: stack.StackInfo) -> EditorSchema:
    """The parameters the served procedural editor declares, to resolve an edit as the gateway does."""
    with triton_grpc.InferenceServerClient(own_stack.triton_grpc) as client:
        config = client.get_model_config("procedural", as_json=True)["config"]
    return EditorSchema.from_json(config["parameters"][SCHEMA_PARAMETER]["string_value"])


def explain(
    service: explain_pb2_grpc.ExplainServiceStub,
    model: str,
    image: bytes,
    edit: dict[str, str] = HUE,
) -> tuple[explain_pb2.Accepted, explain_pb2.PropertyResult]:
    request = explain_pb2.ExplainRequest(
        image=image,
        model=explain_pb2.ModelRef(name=model),
        properties=[
            explain_pb2.Property(
                name=PROPERTY,
                editor=explain_pb2.EditorIntervention(model="procedural", parameters=edit),
            )
        ],
        steps=STEPS,
        samples=1,
        seed=SEED,
        permutations=PERMUTATIONS,
        alpha=ALPHA,
        path_mode=explain_pb2.PATH_MODE_FIXED,
    )
    events = list(service.Explain(request, timeout=300))
    (accepted,) = [e.accepted for e in events if e.HasField("accepted")]
    (result,) = [e.property_result for e in events if e.HasField("property_result")]
    assert result.status.code == 0, result.status.message
    return accepted, result


def run_in_process(repository: Path, model: str, inputs: np.ndarray) -> np.ndarray:
    """The model file run the way a team would run it, without Triton or propscope."""
    file_name, kind = FILES[model]
    path = repository / model / "1" / file_name
    if kind == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"INPUT": inputs})[0]
    if kind == "torchscript":
        network = torch.jit.load(str(path), map_location="cpu")
    else:
        sys.path.insert(0, str(repository / model))
        try:
            from own_network import OwnCNN
        finally:
            sys.path.remove(str(repository / model))
        network = OwnCNN(channels=(16, 32, 64), num_classes=2)
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    with torch.inference_mode():
        return network.eval()(torch.from_numpy(inputs)).numpy()


def in_process(
    repository: Path, model: str, image: bytes, parameters: dict[str, str]
) -> tuple[np.ndarray, int, PropertyScore]:
    """Curve, target class and score of the path the service computes, here."""
    pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
    strengths = np.arange(1, STEPS + 1, dtype=np.float32) / STEPS
    path = np.concatenate(
        [pixels[None], edit_path(pixels, strengths, parameters, sample_seed(SEED, 0))]
    )
    inputs = ((path.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)
    outputs = run_in_process(repository, model, np.ascontiguousarray(inputs, dtype=np.float32))
    probabilities = softmax(outputs.astype(np.float64), axis=1)
    predicted = probabilities.argmax(axis=1)
    target = int(predicted[0])
    curve = probabilities[:, target]
    score = score_property(
        curve[None], predicted[None], PERMUTATIONS, ALPHA, (SEED, zlib.crc32(PROPERTY.encode()))
    )
    return curve, target, score


def test_own_models_are_listed_as_ready_classifiers(service) -> None:
    """None of the example configs sets propscope.role."""
    models = {m.name: m for m in service.ListModels(explain_pb2.ListModelsRequest()).models}
    for name in (*FILES, "own_probabilities", "own_probabilities_undeclared"):
        assert models[name].state == "READY", models[name].state_reason
        assert models[name].role == explain_pb2.ModelInfo.ROLE_CLASSIFIER
    assert list(models["own_onnx"].class_labels) == LABELS
    np.testing.assert_allclose(models["own_onnx"].preprocessing.mean, MEAN)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model", list(FILES))
def test_score_equals_the_in_process_computation(
    service, repository: Path, editor_schema: EditorSchema, model: str, case: str
) -> None:
    image, edit = CASES[case]
    accepted, result = explain(service, model, image, edit)
    curve, target, expected = in_process(repository, model, image, editor_schema.resolve(edit))

    assert accepted.path_mode == explain_pb2.PATH_MODE_FIXED and result.steps == STEPS
    np.testing.assert_allclose(accepted.preprocessing.mean, MEAN)
    np.testing.assert_allclose(accepted.preprocessing.std, STD)
    assert accepted.preprocessing.output_kind == explain_pb2.Preprocessing.OUTPUT_KIND_LOGITS
    assert result.target_class == target
    assert result.target_label == LABELS[target]
    np.testing.assert_allclose(result.samples[0].prediction_curve, curve, rtol=0, atol=1e-6)
    assert result.score == pytest.approx(expected.score, abs=1e-6)
    assert result.probability_change == pytest.approx(expected.probability_change, abs=1e-6)
    assert result.prediction_flipped == expected.prediction_flipped
    assert result.significant == expected.significant
    # The hue-biased network: the object's hue decides the class on every image.
    assert result.prediction_flipped and result.probability_change > 0.9
    assert result.decision == explain_pb2.DECISION_RELEVANT


@pytest.mark.parametrize(
    ("probabilities_model", "logits_twin", "source"),
    [
        ("own_probabilities", "own_torchscript", "model config"),
        ("own_probabilities_undeclared", "own_onnx", "detected"),
    ],
)
def test_probabilities_model_gives_its_logits_twins_change(
    service, probabilities_model: str, logits_twin: str, source: str
) -> None:
    accepted, result = explain(service, probabilities_model, *CASES["orange_circle"])
    _, twin = explain(service, logits_twin, *CASES["orange_circle"])
    assert accepted.preprocessing.output_kind == explain_pb2.Preprocessing.OUTPUT_KIND_PROBABILITIES
    (kind_source,) = [s for s in accepted.preprocessing_sources if s.startswith("output_kind")]
    assert source in kind_source
    assert any("declares no output kind" in w for w in accepted.warnings) == (source == "detected")
    assert result.probability_change == pytest.approx(twin.probability_change, abs=1e-6)
    assert result.score == pytest.approx(twin.score, abs=1e-6)
    np.testing.assert_allclose(
        result.samples[0].prediction_curve, twin.samples[0].prediction_curve, rtol=0, atol=1e-6
    )


def test_a_config_mistake_names_the_model_the_parameter_and_the_file(service) -> None:
    """The model does not load; the rest of the stack serves, and both ListModels and an
    Explain naming it say why."""
    models = {m.name: m for m in service.ListModels(explain_pb2.ListModelsRequest()).models}
    broken = models[BROKEN]
    assert broken.state != "READY"
    assert f"{BROKEN}: propscope.file: no file at" in broken.state_reason
    assert "modle.onnx" in broken.state_reason
    with pytest.raises(grpc.RpcError) as error:
        explain(service, BROKEN, CASES["sample"][0])
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "propscope.file: no file at" in error.value.details()
