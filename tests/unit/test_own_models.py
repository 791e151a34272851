"""The ready classifier kinds (triton_models/classifiers/own.py) without Triton: the
example repository's configs read as Triton hands them over, each kind against the
torch network it was exported from, the layouts and datatypes a config may declare,
and every refusal naming what to fix."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format, text_format
from torch import nn
from tritonclient.grpc import model_config_pb2

from propscope_server.triton_models.classifiers.own import OwnClassifier, OwnModelConfig

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning"
)  # torch.jit, legacy ONNX export

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own-models"


def triton_config(text: str) -> dict:
    """config.pbtxt as the Python backend receives it (args["model_config"])."""
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json.loads(
        json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))
    )


def load(folder: Path, text: str | None = None) -> OwnClassifier:
    text = text if text is not None else (folder / "config.pbtxt").read_text()
    return OwnClassifier(OwnModelConfig.from_triton(triton_config(text), folder, "1"))


@pytest.fixture(scope="module")
def build_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("own_models_build", EXAMPLE / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repository(build_module: types.ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("own-models") / "repository"
    build_module.build(out)
    return out


@pytest.mark.parametrize(
    "name",
    [
        "own_onnx",
        "own_torchscript",
        "own_state_dict",
        "own_probabilities",
        "own_probabilities_undeclared",
    ],
)
def test_each_example_model_returns_its_networks_output(
    name: str, repository: Path, build_module: types.ModuleType
) -> None:
    classifier = load(repository / name)
    batch = np.random.default_rng(1).normal(size=(5, 3, 64, 64)).astype(np.float32)
    softmax = "probabilities" in name
    with torch.inference_mode():
        expected = build_module.network(softmax)(torch.from_numpy(batch)).numpy()
    outputs = classifier(batch)
    assert outputs.dtype == np.float32 and outputs.shape == (5, 2)
    np.testing.assert_allclose(outputs, expected, atol=1e-5)
    if softmax:
        np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=1e-6)


def test_example_network_keeps_the_trained_classifier_under_imagenet_normalisation(
    build_module: types.ModuleType,
) -> None:
    """The configs declare ImageNet mean/std: the re-based network on that input must
    give the trained CNN's logits on its own (x - 0.5) / 0.25 input."""
    from propscope_server.triton_models.classifiers import cnn

    pixels = np.random.default_rng(2).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    scaled = pixels.astype(np.float32) / 255.0
    mean, std = (
        np.asarray(v, dtype=np.float32)
        for v in (build_module.IMAGENET_MEAN, build_module.IMAGENET_STD)
    )
    imagenet = ((scaled - mean) / std).transpose(0, 3, 1, 2)
    with torch.inference_mode():
        own = build_module.network(False)(torch.from_numpy(np.ascontiguousarray(imagenet))).numpy()
        trained = cnn.load_classifier(build_module.WEIGHTS)(cnn.normalise_uint8_hwc(pixels)).numpy()
    np.testing.assert_allclose(own, trained, atol=1e-4)


def test_onnx_kind_never_imports_torch(repository: Path) -> None:
    """Start-up cost: a stub that imports torch starts seconds slower."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from pathlib import Path
        import numpy as np
        from propscope_server.triton_models.classifiers.own import OwnClassifier, OwnModelConfig
        config = json.loads(sys.stdin.read())
        classifier = OwnClassifier(OwnModelConfig.from_triton(config, Path({str(repository / "own_onnx")!r}), "1"))
        print(classifier(np.zeros((2, 3, 64, 64), np.float32)).shape, "torch" in sys.modules)
        """
    )
    config = json.dumps(triton_config((repository / "own_onnx" / "config.pbtxt").read_text()))
    result = subprocess.run(
        [sys.executable, "-c", script], input=config, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["(2,", "2)", "False"]


class NhwcMean(nn.Module):
    """[B, H, W, 3] -> logits [B, 2] from the channel means, any float dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.float().mean(dim=(1, 2))
        return torch.stack([means[:, 0] - means[:, 2], means[:, 2] - means[:, 0]], dim=1)


def config_text(
    name: str,
    fmt: str,
    file: str,
    input_type: str = "TYPE_FP32",
    dims: str = "4, 4, 3",
    output_dims: str = "2",
    extra: str = "",
) -> str:
    return f"""
        name: "{name}"
        backend: "python"
        max_batch_size: 8
        input [ {{ name: "PIXELS" data_type: {input_type} dims: [ {dims} ] }} ]
        output [ {{ name: "SCORES" data_type: TYPE_FP32 dims: [ {output_dims} ] }} ]
        parameters: {{ key: "propscope.format" value: {{ string_value: "{fmt}" }} }}
        parameters: {{ key: "propscope.file" value: {{ string_value: "{file}" }} }}
        {extra}
    """


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )


def test_uint8_nhwc_config_feeds_a_float_onnx_model_without_rescaling(tmp_path: Path) -> None:
    """Config UINT8 [H, W, 3], the file wants float32: values are kept (0..255), the
    model's input and output names differ from the config's and are mapped."""
    export_onnx(NhwcMean(), torch.zeros(1, 4, 4, 3), tmp_path / "1" / "m.onnx")
    classifier = load(tmp_path, config_text("nhwc", "onnx", "m.onnx", "TYPE_UINT8"))
    pixels = np.random.default_rng(3).integers(0, 256, size=(3, 4, 4, 3), dtype=np.uint8)
    expected = NhwcMean()(torch.from_numpy(pixels.astype(np.float32))).numpy()
    np.testing.assert_allclose(classifier(pixels), expected, rtol=1e-6)


def test_fp16_nhwc_torchscript(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    torch.jit.save(torch.jit.script(NhwcMean()), str(tmp_path / "1" / "m.pt"))
    classifier = load(tmp_path, config_text("fp16", "torchscript", "m.pt", "TYPE_FP16"))
    batch = np.random.default_rng(4).random((2, 4, 4, 3)).astype(np.float16)
    outputs = classifier(batch)
    assert outputs.dtype == np.float32
    np.testing.assert_allclose(outputs, NhwcMean()(torch.from_numpy(batch)).numpy(), rtol=1e-6)


def write_state_dict_model(folder: Path, module_name: str) -> None:
    (folder / "1").mkdir(parents=True)
    (folder / f"{module_name}.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class Net(nn.Module):
                def __init__(self, classes: int = 2) -> None:
                    super().__init__()
                    self.linear = nn.Linear(3, classes)

                def forward(self, x: torch.Tensor) -> dict:
                    return {"SCORES": self.linear(x.mean(dim=(2, 3)))}
            """
        )
    )
    torch.manual_seed(0)
    state = {f"linear.{k}": v for k, v in nn.Linear(3, 3).state_dict().items()}
    torch.save(state, folder / "1" / "weights.pt")


def test_state_dict_with_kwargs_and_a_dict_output(tmp_path: Path) -> None:
    write_state_dict_model(tmp_path, "team_net_kwargs")
    extra = """
        parameters: { key: "propscope.module" value: { string_value: "team_net_kwargs:Net" } }
        parameters: { key: "propscope.module_kwargs" value: { string_value: "{\\"classes\\": 3}" } }
    """
    text = config_text(
        "sd", "state_dict", "weights.pt", dims="3, 4, 4", output_dims="3", extra=extra
    )
    classifier = load(tmp_path, text)
    batch = np.ones((2, 3, 4, 4), np.float32)
    state = torch.load(tmp_path / "1" / "weights.pt", weights_only=True)
    expected = (torch.ones(2, 3) @ state["linear.weight"].T + state["linear.bias"]).numpy()
    np.testing.assert_allclose(classifier(batch), expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        (np.zeros((2, 3, 64, 64), np.float64), "input 'INPUT' must be float32, got float64"),
        (np.zeros((2, 64, 64, 3), np.float32), "must be [B, 3, 64, 64], got [2, 64, 64, 3]"),
        (np.full((1, 3, 64, 64), np.nan, np.float32), "holds NaN or infinite values"),
    ],
)
def test_bad_batches_are_refused_by_name(batch: np.ndarray, message: str, repository: Path) -> None:
    with pytest.raises(ValueError) as error:
        load(repository / "own_onnx")(batch)
    assert message in str(error.value)


def test_output_shape_other_than_the_config_is_an_error(tmp_path: Path) -> None:
    export_onnx(NhwcMean(), torch.zeros(1, 4, 4, 3), tmp_path / "1" / "m.onnx")
    classifier = load(tmp_path, config_text("wide", "onnx", "m.onnx", output_dims="10"))
    with pytest.raises(ValueError, match=r"returned shape \[1, 2\].*says \[B, 10\]"):
        classifier(np.zeros((1, 4, 4, 3), np.float32))


def test_a_tuple_output_is_an_error(tmp_path: Path) -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.mean(dim=(1, 2)), x.mean(dim=(1, 2))

    (tmp_path / "1").mkdir()
    torch.jit.save(torch.jit.script(Pair()), str(tmp_path / "1" / "m.pt"))
    classifier = load(tmp_path, config_text("pair", "torchscript", "m.pt", output_dims="3"))
    with pytest.raises(ValueError, match="must return one tensor"):
        classifier(np.zeros((1, 4, 4, 3), np.float32))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            config_text("x", "keras", "m.onnx"),
            "propscope.format is 'keras'; set one of torchscript, onnx, state_dict",
        ),
        (config_text("x", "onnx", "missing.onnx"), "propscope.file: no file at"),
        (
            config_text("x", "onnx", "m.onnx").replace("max_batch_size: 8", "max_batch_size: 0"),
            "max_batch_size > 0",
        ),
        (config_text("x", "onnx", "m.onnx", input_type="TYPE_INT32"), "data_type TYPE_INT32"),
        (
            config_text("x", "onnx", "m.onnx", dims="4, 4, 4"),
            "m.onnx takes [B, 4, 4, 3] but the config's input says [B, 4, 4, 4]",
        ),
        (
            config_text("x", "state_dict", "m.onnx"),
            'a state_dict model needs "package.module:ClassName"',
        ),
        (
            config_text(
                "x",
                "state_dict",
                "m.onnx",
                extra='parameters: { key: "propscope.module" value: { string_value: "no_such_module_here:Net" } }',
            ),
            "cannot import 'no_such_module_here:Net'",
        ),
    ],
)
def test_config_mistakes_are_refused_with_the_fix(tmp_path: Path, text: str, message: str) -> None:
    export_onnx(NhwcMean(), torch.zeros(1, 4, 4, 3), tmp_path / "1" / "m.onnx")
    with pytest.raises(ValueError) as error:
        load(tmp_path, text)
    assert message in str(error.value) and str(error.value).startswith("x: ")


def test_a_lossy_cast_into_the_model_is_refused(tmp_path: Path) -> None:
    class TakesBytes(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().mean(dim=(1, 2))[:, :2]

    export_onnx(TakesBytes(), torch.zeros(1, 4, 4, 3, dtype=torch.uint8), tmp_path / "1" / "m.onnx")
    with pytest.raises(ValueError, match="the config's input is float32 but m.onnx takes uint8"):
        load(tmp_path, config_text("bytes", "onnx", "m.onnx"))


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeResponse:
    def __init__(self, output_tensors: list | None = None, error: object = None) -> None:
        self.output_tensors, self.error = output_tensors, error


@pytest.fixture
def fake_pb_utils(monkeypatch: pytest.MonkeyPatch) -> None:
    """The part of Triton's triton_python_backend_utils a classifier uses; requests are
    dicts of input name -> FakeTensor."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = FakeTensor
    fake.InferenceResponse = FakeResponse
    fake.TritonError = str
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(
        sys.modules, "propscope_server.triton_models.classifiers.own_triton_model", raising=False
    )


def test_triton_wrapper_answers_each_request_on_its_own(
    repository: Path, fake_pb_utils: None
) -> None:
    """A bad request gets its own error response; the others in the call are served."""
    from propscope_server.triton_models.classifiers.own_triton_model import TritonPythonModel

    model = TritonPythonModel()
    folder = repository / "own_onnx"
    model.initialize(
        {
            "model_config": json.dumps(triton_config((folder / "config.pbtxt").read_text())),
            "model_repository": str(folder),
            "model_version": "1",
        }
    )
    good = {"INPUT": FakeTensor("INPUT", np.zeros((2, 3, 64, 64), np.float32))}
    wrong = {"INPUT": FakeTensor("INPUT", np.zeros((2, 3, 64, 64), np.float64))}
    first, second, third = model.execute([good, wrong, {}])
    assert first.error is None and first.output_tensors[0].name == "LOGITS"
    assert first.output_tensors[0].array.shape == (2, 2)
    assert second.error == "own_onnx: input 'INPUT' must be float32, got float64"
    assert third.error == "own_onnx: missing input 'INPUT'"


def test_the_docs_model_py_template_runs(tmp_path: Path, fake_pb_utils: None) -> None:
    docs = (ROOT / "docs" / "own-models.md").read_text()
    section = docs[docs.index("## Write your own model.py") :]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.py").write_text(source)
    weights = np.array([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]])
    np.save(tmp_path / "1" / "weights.npy", weights)
    spec = importlib.util.spec_from_file_location(
        "docs_template_model", tmp_path / "1" / "model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = config_text("mine", "unused", "unused", dims="3, 4, 4")
    model.initialize(
        {
            "model_config": json.dumps(triton_config(config)),
            "model_repository": str(tmp_path),
            "model_version": "1",
        }
    )
    batch = np.random.default_rng(5).random((2, 3, 4, 4)).astype(np.float32)
    good, bad = model.execute([{"PIXELS": FakeTensor("PIXELS", batch)}, {}])
    (scores,) = good.output_tensors
    assert scores.name == "SCORES" and scores.array.dtype == np.float32
    np.testing.assert_allclose(scores.array, batch.mean(axis=(2, 3)) @ weights, rtol=1e-6)
    assert bad.error and not bad.output_tensors
