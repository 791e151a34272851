"""The TritonPythonModel behind every ready classifier kind (own.py): a model
folder's `1/model.py` re-exports it, and config.pbtxt says the rest."""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from propscope_server.triton_models.classifiers.own import OwnClassifier, OwnModelConfig


class TritonPythonModel:
    """Serves a team's TorchScript, ONNX or state_dict file; dynamic batching is
    off, so each request carries one batch. An open state_dict model also reads its
    optional inputs (None when not sent) and computes the optional outputs asked for."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self.classifier = OwnClassifier(
            OwnModelConfig.from_triton(
                config, Path(args["model_repository"]), args["model_version"]
            )
        )
        opened = self.classifier.open
        if opened is not None and opened.ablation:
            pb_utils.Logger.log_info(f"{opened.name}: {opened.ablation_summary()}")

    def execute(self, requests: list) -> list:
        spec = self.classifier.config
        responses = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.input.name)
                if tensor is None:
                    raise ValueError(f"missing input {spec.input.name!r}")
                optional = {}
                for name in spec.optional_inputs:
                    given = pb_utils.get_input_tensor_by_name(request, name)
                    optional[name] = None if given is None else given.as_numpy()
                requested: list[str] = []
                if spec.open:
                    # Imported here: open_model imports torch, which an ONNX stub never needs.
                    from propscope_server.triton_models.classifiers.open_model import (
                        requested_outputs,
                    )

                    sent = [name for name, array in optional.items() if array is not None]
                    requested = requested_outputs(
                        request.requested_output_names(), spec.optional_outputs, sent
                    )
                # Triton 2.51's requests say when their caller cancelled: a long bound
                # request stops between rows and sample batches.
                outputs = self.classifier.infer(
                    tensor.as_numpy(), optional, requested, getattr(request, "is_cancelled", None)
                )
                names = [spec.output.name, *requested]
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(n, outputs[n]) for n in names]
                    )
                )
            except Exception as exc:  # report to the caller rather than fail the whole batch
                message = f"{spec.name}: {exc}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
        return responses
