"""The one TritonPythonModel behind every synthetic classifier entry.

Each model folder's `1/model.py` re-exports this class; the differences between
entries (architecture, weights, input name, input format) live in config.pbtxt
parameters so that adding a classifier needs no Python. A config that declares
`propscope.layers` serves the open-model contract (open_model.py): its optional
inputs and outputs follow the image input and LOGITS.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from propscope_server.open_contract import LAYERS_PARAMETER, declared_open
from propscope_server.triton_models.classifiers.cnn import (
    STD,
    load_classifier,
    normalise_pixels_hwc,
    normalise_uint8_hwc,
)
from propscope_server.triton_models.classifiers.open_model import (
    OpenModel,
    box_around,
    check_declared_tensors,
    declared_layers,
    read_ablation,
    requested_outputs,
)
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
        # The image input and LOGITS come first; an open model's optional tensors follow.
        model_input, *optional_inputs = config["input"]
        model_output, *optional_outputs = config["output"]
        self.input_name = model_input["name"]
        self.output_name = model_output["name"]
        self.optional_inputs = [entry["name"] for entry in optional_inputs]
        self.optional_outputs = {entry["name"] for entry in optional_outputs}
        # Batched tensors carry a leading batch dimension in front of the config dims.
        self.sample_shape = tuple(int(d) for d in model_input["dims"])
        self.dtype = np.uint8 if self.input_format == "uint8_hwc" else np.float32
        # One intra-op thread per instance: Triton scales with instances, and
        # more threads per instance just oversubscribe the cores.
        torch.set_num_threads(1)
        model_folder = Path(args["model_repository"])
        self.model = self._build(config, model_folder, args["model_version"])
        self.open = self._open(config, model_folder / args["model_version"])

    def _build(self, config: dict, model_folder: Path, version: str) -> torch.nn.Module:
        architecture = _parameter(config, "architecture", default="small_cnn")
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"{self.model_name}: architecture {architecture!r} not in {ARCHITECTURES}"
            )
        if architecture == "corner_probe":
            return CornerProbe().eval()
        # args["model_repository"] is this model's own folder (<repository>/<name>),
        # so the weights path in the config is relative to it. "{version}" in it is the
        # version being loaded: one config serves versions with their own weights
        # (synth_patch_folds, one version per fold model).
        weights = model_folder / _parameter(config, "weights").replace("{version}", version)
        if not weights.is_file():
            raise FileNotFoundError(f"{self.model_name}: no weights at {weights.resolve()}")
        return load_classifier(weights)

    def _open(self, config: dict, version_folder: Path) -> OpenModel | None:
        """The open contract when the config declares it, else None (a plain classifier
        declares no tensors beyond its image input and LOGITS)."""
        inputs, outputs = config["input"][1:], config["output"][1:]
        if not declared_open(config.get("parameters", {})):
            if inputs or outputs:
                raise ValueError(
                    f"{self.model_name}: the config declares optional tensors but no "
                    f"{LAYERS_PARAMETER}; declare the layers or drop the tensors"
                )
            return None
        try:
            layers = declared_layers(config["parameters"])
            check_declared_tensors(inputs, outputs, layers, self.sample_shape)
            if isinstance(self.model, CornerProbe):
                raise ValueError("only the small_cnn architecture is open")
            dry = torch.zeros(1, 3, *self._spatial())
            model = OpenModel(
                self.model, layers, dry, read_ablation(version_folder, layers), name=self.model_name
            )
        except ValueError as error:
            message = str(error)
            prefix = f"{self.model_name}: "
            raise ValueError(message if message.startswith(prefix) else prefix + message) from None
        if model.ablation:
            pb_utils.Logger.log_info(f"{self.model_name}: {model.ablation_summary()}")
        return model

    def _spatial(self) -> tuple[int, int]:
        """The image's H, W from the config's input dims."""
        if self.input_format == "uint8_hwc":
            return self.sample_shape[0], self.sample_shape[1]
        return self.sample_shape[1], self.sample_shape[2]

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
        if self.input_format == "fp32_nchw" and not np.isfinite(array).all():
            raise ValueError(f"{self.input_name} holds NaN or infinite values")
        if self.open is not None:
            return self._infer_open(request, array)
        with torch.inference_mode():
            if self.input_format == "uint8_hwc":
                inputs = normalise_uint8_hwc(array)
            else:
                inputs = torch.from_numpy(np.ascontiguousarray(array))
            logits = self.model(inputs).numpy().astype(np.float32, copy=False)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(self.output_name, logits)]
        )

    def _infer_open(self, request: object, array: np.ndarray) -> object:
        """The same forward pass through OpenModel, with the request's optional inputs
        (None when not sent) and the optional outputs it asks for. Outside inference
        mode: gradients need ordinary tensors; OpenModel enters it for the rest."""
        if self.input_format == "uint8_hwc":
            inputs = normalise_uint8_hwc(array)
        else:
            inputs = torch.from_numpy(np.ascontiguousarray(array))
        optional = {}
        for name in self.optional_inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            optional[name] = None if tensor is None else tensor.as_numpy()
        sent = [name for name, array in optional.items() if array is not None]
        requested = requested_outputs(request.requested_output_names(), self.optional_outputs, sent)
        box = None
        if self.input_format == "uint8_hwc":

            def box(radius: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
                """The pixel box, both ends normalised as the input is: std > 0 keeps
                their order."""
                pixels = torch.from_numpy(array.astype(np.float32))
                lower, upper = box_around(pixels, radius, pixels=True)
                return normalise_pixels_hwc(lower), normalise_pixels_hwc(upper)

        # Triton 2.51's requests say when their caller cancelled: a long bound request
        # stops between rows and sample batches.
        results = self.open(
            inputs, optional, requested, box, getattr(request, "is_cancelled", None)
        )
        if "INPUT_GRADIENT" in results and self.input_format == "uint8_hwc":
            # Laid out like IMAGE (HWC) and per pixel value: the chain rule through
            # normalise_uint8_hwc, x = (pixel / 255 - mean) / std.
            per_pixel = results["INPUT_GRADIENT"].transpose(0, 2, 3, 1) / (255.0 * np.array(STD))
            results["INPUT_GRADIENT"] = np.ascontiguousarray(per_pixel, dtype=np.float32)
        logits = results.pop("scores").astype(np.float32, copy=False)
        tensors = [pb_utils.Tensor(self.output_name, logits)]
        tensors += [pb_utils.Tensor(name, results[name]) for name in requested]
        return pb_utils.InferenceResponse(output_tensors=tensors)
