"""A classifier that is not ours, packaged as docs/own-models.md ("Open models") says:
a tiny residual network (skip connections, batch norm, in-place ReLUs) with seeded
random weights, FP32 NCHW [3, 32, 32] input normalised with ImageNet's mean and std,
served by the state_dict kind and open at three layers.

    folder = write_model(repository)        # <repository>/tiny_resnet, as a team writes it
    with served(triton_client, folder): ... # loaded into a running Triton, unloaded after

`served` loads the folder through Triton's model control (its files sent with the load
request), so a running stack serves it without a restart.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import tritonclient.grpc as triton_grpc

NAME = "tiny_resnet"
MODULE_FILE = "tiny_resnet_net.py"
# module path -> channels, in network order (the stem, then each residual stage).
LAYERS = {"stem": 8, "stage1": 8, "stage2": 16}
CLASSES = ("cat", "dog", "fox")
INPUT_DIMS = (3, 32, 32)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The team's module file, as they keep it beside config.pbtxt: plain torch.
MODULE_SOURCE = '''"""A tiny ResNet-style classifier: stem, two residual stages, global pooling."""

from torch import nn


class Block(nn.Module):
    """conv-bn-relu-conv-bn plus the input (projected when the shape changes), then relu."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.stage1 = Block(width, width)
        self.stage2 = Block(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))
'''

MODEL_PY = '''"""A team's own classifier: the file and its format are named in config.pbtxt."""

from propscope_server.triton_models.classifiers.own_triton_model import TritonPythonModel  # noqa: F401
'''

OPTIONAL_INPUTS = (
    ("INTERVENE_LAYER", "TYPE_INT32", "1"),
    ("INTERVENE_CHANNEL", "TYPE_INT32", "1"),
    ("INTERVENE_STRENGTH", "TYPE_FP32", "1"),
    ("INTERVENE_BASELINE", "TYPE_FP32", "1"),
    ("PATCH_LAYER", "TYPE_INT32", "1"),
    ("PATCH_CHANNEL", "TYPE_INT32", "1"),
    ("PATCH_VALUE", "TYPE_FP32", "-1"),
    ("ACTIVATION_LAYER", "TYPE_INT32", "1"),
    ("GRADIENT_CLASS", "TYPE_INT32", "1"),
    ("REPLACE_LAYER", "TYPE_INT32", "1"),
    ("REPLACE_ACTIVATION", "TYPE_FP32", "-1"),
    ("GRADIENT_LAYER", "TYPE_INT32", "1"),
    ("GRADIENT_DIRECTION", "TYPE_FP32", "-1"),
    ("BOUND_RADIUS", "TYPE_FP32", "-1"),
    ("BOUND_CLASS", "TYPE_INT32", "1"),
    ("BOUND_METHOD", "TYPE_INT32", "1"),
    ("BOUND_LAYER", "TYPE_INT32", "1"),
    ("BOUND_SAMPLES", "TYPE_INT32", "1"),
    ("BOUND_SEED", "TYPE_INT32", "1"),
)


def config_text(name: str = NAME) -> str:
    """config.pbtxt of the open state_dict kind, in the order docs/own-models.md shows."""
    total = sum(LAYERS.values())
    dims = ", ".join(map(str, INPUT_DIMS))
    inputs = [f'  {{ name: "INPUT" data_type: TYPE_FP32 dims: [ {dims} ] }}'] + [
        f'  {{ name: "{n}" data_type: {t} dims: [ {d} ] optional: true }}'
        for n, t, d in OPTIONAL_INPUTS
    ]
    outputs = [
        f'  {{ name: "LOGITS" data_type: TYPE_FP32 dims: [ {len(CLASSES)} ] }}',
        f'  {{ name: "CHANNEL_MEANS" data_type: TYPE_FP32 dims: [ {total} ] }}',
        '  { name: "ACTIVATIONS" data_type: TYPE_FP32 dims: [ -1 ] }',
        f'  {{ name: "INPUT_GRADIENT" data_type: TYPE_FP32 dims: [ {dims} ] }}',
        f'  {{ name: "CHANNEL_GRADIENTS" data_type: TYPE_FP32 dims: [ {total} ] }}',
        f'  {{ name: "GRAD_X_ACTIVATION" data_type: TYPE_FP32 dims: [ {total} ] }}',
        '  { name: "BOUND_MARGIN" data_type: TYPE_FP32 dims: [ -1 ] }',
        '  { name: "SAMPLED_MARGIN" data_type: TYPE_FP32 dims: [ -1 ] }',
    ]

    def parameter(key: str, value: str) -> str:
        return f'parameters: {{ key: "{key}" value: {{ string_value: {json.dumps(value)} }} }}'

    return (
        "\n".join(
            [
                f'name: "{name}"',
                'backend: "python"',
                "max_batch_size: 64",
                "input [",
                ",\n".join(inputs),
                "]",
                "output [",
                ",\n".join(outputs),
                "]",
                "instance_group [ { kind: KIND_CPU count: 1 } ]",
                "version_policy: { all { } }",
                parameter("propscope.format", "state_dict"),
                parameter("propscope.file", "weights.pt"),
                parameter("propscope.module", f"{Path(MODULE_FILE).stem}:TinyResNet"),
                parameter("propscope.capabilities", "activations,interventions,gradients,bounds"),
                parameter("propscope.layers", json.dumps(LAYERS)),
                parameter("propscope.mean", ",".join(map(str, IMAGENET_MEAN))),
                parameter("propscope.std", ",".join(map(str, IMAGENET_STD))),
                parameter("propscope.output_kind", "logits"),
                parameter("propscope.class_labels", json.dumps(list(CLASSES))),
                parameter(
                    "description", "A tiny ResNet that is not propscope's (seeded random weights)."
                ),
            ]
        )
        + "\n"
    )


def network(folder: Path) -> torch.nn.Module:
    """The team's module from the folder's file with the folder's weights, as they run it."""
    spec = importlib.util.spec_from_file_location(f"{NAME}_module", folder / MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TinyResNet()
    model.load_state_dict(torch.load(folder / "1" / "weights.pt", weights_only=True))
    return model.eval()


def write_model(repository: Path, seed: int = 0, name: str = NAME) -> Path:
    """<repository>/<name>: config.pbtxt, the module file, 1/model.py and 1/weights.pt
    (seeded random weights; batch-norm statistics away from the identity)."""
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    (folder / MODULE_FILE).write_text(MODULE_SOURCE)
    (folder / "config.pbtxt").write_text(config_text(name))
    (folder / "1" / "model.py").write_text(MODEL_PY)
    spec = importlib.util.spec_from_file_location(f"{name}_build", folder / MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generator = torch.Generator().manual_seed(seed)
    model = module.TinyResNet()
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith("running_var"):
            value = 0.5 + torch.rand(value.shape, generator=generator)
        elif key.endswith("running_mean") or key.endswith(".bias"):
            value = 0.1 * torch.randn(value.shape, generator=generator)
        elif value.is_floating_point():
            fan_in = max(1, value[0].numel()) if value.ndim > 1 else 1
            value = torch.randn(value.shape, generator=generator) / fan_in**0.5
        state[key] = value
    torch.save(state, folder / "1" / "weights.pt")
    return folder


@contextmanager
def served(client: triton_grpc.InferenceServerClient, folder: Path) -> Iterator[str]:
    """The model folder loaded into a Triton in explicit model-control mode (its config
    and every file sent with the load request), unloaded on exit. Yields its name."""
    name = folder.name
    files = {
        f"file:{path.relative_to(folder).as_posix()}": path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != "config.pbtxt" and "__pycache__" not in path.parts
    }
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = text_format.Parse(
        (folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    config = json_format.MessageToJson(message, preserving_proto_field_name=True)
    client.load_model(name, config=config, files=files)
    try:
        yield name
    finally:
        client.unload_model(name)
