"""Write the model files of the example repository of a team's own classifiers.

    python examples/own-models/build.py            # into examples/own-models/repository
    python examples/own-models/build.py --out DIR  # a complete copy of the repository in DIR

Deterministic, offline, seconds on the CPU (`make setup` runs it). The network is
the team's `OwnCNN` (repository/own_state_dict/own_network.py) carrying the
hue-biased synthetic CNN's trained weights, re-based onto ImageNet normalisation so
that the configs' `propscope.mean/std` are what the model needs: the same network
exported five ways. Every file is checked against the torch network it came from.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from propscope_server.triton_models.classifiers import cnn

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE / "repository"
WEIGHTS = HERE.parents[1] / "deploy" / "triton" / "weights" / "hue_biased.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SHAPE = (3, 64, 64)
# model folder -> (generated file in its version folder 1/, format, softmax at the end)
MODELS = {
    "own_onnx": ("model.onnx", "onnx", False),
    "own_torchscript": ("model.pt", "torchscript", False),
    "own_state_dict": ("weights.pt", "state_dict", False),
    "own_probabilities": ("model.pt", "torchscript", True),
    "own_probabilities_undeclared": ("model.onnx", "onnx", True),
}

sys.path.insert(0, str(REPOSITORY / "own_state_dict"))
from own_network import OwnCNN  # noqa: E402  (the team's module, beside its config)


def network(softmax: bool) -> OwnCNN:
    """OwnCNN with the trained weights; its input affine turns ImageNet-normalised
    input into the (x - 0.5) / 0.25 the convolutions were trained on."""
    trained = cnn.load_classifier(WEIGHTS).state_dict()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    trained_mean, trained_std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cnn.MEAN, cnn.STD))
    model = OwnCNN(softmax=softmax)
    model.load_state_dict(
        {
            **trained,
            "input_scale": std / trained_std,
            "input_shift": (mean - trained_mean) / trained_std,
        }
    )
    return model.eval()


def write(model: OwnCNN, kind: str, path: Path, output_name: str) -> None:
    if kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
    else:
        with warnings.catch_warnings():  # the legacy exporter announces its deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (torch.zeros(1, *INPUT_SHAPE),),
                str(path),
                dynamo=False,
                input_names=["INPUT"],
                output_names=[output_name],
                dynamic_axes={"INPUT": {0: "batch"}, output_name: {0: "batch"}},
                opset_version=17,
            )


def reload(kind: str, path: Path, softmax: bool) -> object:
    """The file read back the way the server reads it: a callable numpy -> numpy."""
    if kind == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"INPUT": x})[0]
    if kind == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
    else:
        module = OwnCNN(softmax=softmax)
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    module.eval()
    return lambda x: module(torch.from_numpy(x)).detach().numpy()


def build(out: Path) -> None:
    if out.resolve() != REPOSITORY:
        # The configs, model.py files and the team's module come from the committed repository.
        shutil.copytree(
            REPOSITORY, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    probe = np.random.default_rng(0).normal(size=(4, *INPUT_SHAPE)).astype(np.float32)
    for name, (file_name, kind, softmax) in MODELS.items():
        model = network(softmax)
        path = out / name / "1" / file_name
        write(model, kind, path, "PROBABILITIES" if softmax else "LOGITS")
        with torch.inference_mode():
            expected = model(torch.from_numpy(probe)).numpy()
        error = float(np.abs(reload(kind, path, softmax)(probe) - expected).max())
        if error > 1e-5:
            raise SystemExit(f"{path}: differs from the network by {error:.2e}")
        print(f"{path} ({kind}, {path.stat().st_size / 1024:.0f} KiB, max error {error:.1e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPOSITORY, help="the model repository to write"
    )
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
