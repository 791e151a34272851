"""The TritonPythonModel behind every ready classifier kind (own.py): a model
folder's `1/model.py` re-exports it, and config.pbtxt says the rest."""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from propscope_server.triton_models.classifiers.own import OwnClassifier, OwnModelConfig


class TritonPythonModel:
    """Serves a team's TorchScript, ONNX or state_dict file; dynamic batching is
    off, so each request carries one batch."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.classifier = OwnClassifier(
            OwnModelConfig.from_triton(
                config, Path(args["model_repository"]), args["model_version"]
            )
        )

    def execute(self, requests: list) -> list:
        spec = self.classifier.config
        responses = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.input.name)
                if tensor is None:
                    raise ValueError(f"missing input {spec.input.name!r}")
                outputs = self.classifier(tensor.as_numpy())
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(spec.output.name, outputs)]
                    )
                )
            except Exception as exc:  # report to the caller rather than fail the whole batch
                message = f"{spec.name}: {exc}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses
