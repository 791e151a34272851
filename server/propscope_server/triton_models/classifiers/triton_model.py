"""The one TritonPythonModel behind every synthetic classifier entry.

Each model folder's `1/model.py` re-exports this class; the differences between
entries (architecture, weights, input name, input format) live in config.pbtxt
parameters so that adding a classifier needs no Python.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from propscope_server.triton_models.classifiers.cnn import load_classifier, normalise_uint8_hwc
from propscope_server.triton_models.classifiers.probe import CornerProbe

INPUT_FORMATS = ("uint8_hwc", "fp32_nchw")
# small_cnn loads trained weights; corner_probe is fixed and has none.
ARCHITECTURES = ("small_cnn", "corner_probe")


def _parameter(config: dict, key: str, default: str | None = None) -> str:
    try:
        return config["parameters"][key]["string_value"]
    except KeyError as exc:
        if default is not None:
            return default
        raise ValueError(f"model config lacks parameter {key!r}") from exc


class TritonPythonModel:
    """Serves a SmallCNN; dynamic batching is off, so each request carries one batch."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.model_name = config["name"]
        if int(config.get("max_batch_size", 0)) <= 0:
            raise ValueError(f"{self.model_name}: classifiers need max_batch_size > 0")
        self.input_format = _parameter(config, "input_format")
        if self.input_format not in INPUT_FORMATS:
            raise ValueError(
                f"{self.model_name}: input_format {self.input_format!r} not in {INPUT_FORMATS}"
            )
        (model_input,) = config["input"]
        (model_output,) = config["output"]
        self.input_name = model_input["name"]
        self.output_name = model_output["name"]
        # Batched tensors carry a leading batch dimension in front of the config dims.
        self.sample_shape = tuple(int(d) for d in model_input["dims"])
        self.dtype = np.uint8 if self.input_format == "uint8_hwc" else np.float32
        # One intra-op thread per instance: Triton scales with instances, and
        # more threads per instance just oversubscribe the cores.
        torch.set_num_threads(1)
        self.model = self._build(config, Path(args["model_repository"]))

    def _build(self, config: dict, model_folder: Path) -> torch.nn.Module:
        architecture = _parameter(config, "architecture", default="small_cnn")
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"{self.model_name}: architecture {architecture!r} not in {ARCHITECTURES}"
            )
        if architecture == "corner_probe":
            return CornerProbe().eval()
        # args["model_repository"] is this model's own folder (<repository>/<name>),
        # so the weights path in the config is relative to it.
        weights = model_folder / _parameter(config, "weights")
        if not weights.is_file():
            raise FileNotFoundError(f"{self.model_name}: no weights at {weights.resolve()}")
        return load_classifier(weights)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._infer(request))
            except Exception as exc:  # report to the caller rather than fail the whole batch
                message = f"{self.model_name}: {exc}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses

    def _infer(self, request: object) -> object:
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            raise ValueError(f"missing input {self.input_name!r}")
        array = tensor.as_numpy()
        if array.dtype != self.dtype:
            raise ValueError(f"{self.input_name} must be {np.dtype(self.dtype)}, got {array.dtype}")
        if array.ndim != len(self.sample_shape) + 1 or array.shape[1:] != self.sample_shape:
            raise ValueError(
                f"{self.input_name} must be [B, {', '.join(map(str, self.sample_shape))}], "
                f"got {list(array.shape)}"
            )
        with torch.inference_mode():
            if self.input_format == "uint8_hwc":
                inputs = normalise_uint8_hwc(array)
            else:
                if not np.isfinite(array).all():
                    raise ValueError(f"{self.input_name} holds NaN or infinite values")
                inputs = torch.from_numpy(np.ascontiguousarray(array))
            logits = self.model(inputs).numpy().astype(np.float32, copy=False)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(self.output_name, logits)]
        )
