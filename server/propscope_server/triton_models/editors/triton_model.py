"""The Triton python-backend model that serves any editor.

`editor_model(load)` wraps a PathEditor, built once per model instance by
`load(ModelContext)`, in the editor contract (editor_contract.py): one response
per request, errors returned as responses, cancellation checked between the
editor's units of work.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from propscope_server.editor_contract import (
    IMAGE_INPUT,
    PARAMETERS_INPUT,
    PATH_OUTPUT,
    SCHEMA_PARAMETER,
    SEED_INPUT,
    STRENGTHS_INPUT,
    EditCancelled,
    EditorSchema,
    InvalidParameters,
    ModelContext,
    PathEditor,
)


def editor_model(load: Callable[[ModelContext], PathEditor]) -> type:
    class TritonPythonModel:
        def initialize(self, args: dict[str, Any]) -> None:
            config = json.loads(args["model_config"])
            parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
            self.schema = EditorSchema.from_json(parameters[SCHEMA_PARAMETER])
            on_gpu = args.get("model_instance_kind") == "GPU"
            device = f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu"
            self.edit = load(ModelContext(parameters, Path(args["model_repository"]), device))
            labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
            # The families must outlive their metrics, so the model keeps both.
            self.metric_families = (
                pb_utils.MetricFamily(
                    name="propscope_editor_work_units_total",
                    description="Units of editor work done (a denoising step of a batch, or one seed's path)",
                    kind=pb_utils.MetricFamily.COUNTER,
                ),
                pb_utils.MetricFamily(
                    name="propscope_editor_cancelled_total",
                    description="Edits stopped because the caller cancelled",
                    kind=pb_utils.MetricFamily.COUNTER,
                ),
            )
            self.work_units, self.cancelled = (
                f.Metric(labels=labels) for f in self.metric_families
            )

        def execute(self, requests: list) -> list:
            return [self._edit(request) for request in requests]

        def _edit(self, request: Any) -> Any:
            def checkpoint() -> None:
                if request.is_cancelled():
                    raise EditCancelled
                self.work_units.increment(1)

            try:
                image = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT).as_numpy()
                strengths = pb_utils.get_input_tensor_by_name(request, STRENGTHS_INPUT).as_numpy()
                raw = pb_utils.get_input_tensor_by_name(request, PARAMETERS_INPUT).as_numpy()
                seeds = pb_utils.get_input_tensor_by_name(request, SEED_INPUT).as_numpy()
                parameters = self.schema.resolve(json.loads(raw.reshape(-1)[0]))
                if image.ndim != 3 or image.shape[-1] != 3:
                    raise InvalidParameters(f"IMAGE must be [H, W, 3]; got {list(image.shape)}")
                if seeds.ndim != 1 or len(seeds) == 0:
                    raise InvalidParameters(
                        f"SEED must be [S] with S >= 1; got {list(seeds.shape)}"
                    )
                checkpoint()
                path = self.edit(
                    image,
                    strengths.astype(np.float32),
                    parameters,
                    [int(s) for s in seeds],
                    checkpoint,
                )
            except EditCancelled:
                self.cancelled.increment(1)
                error = pb_utils.TritonError(
                    "the edit was cancelled", pb_utils.TritonError.CANCELLED
                )
                return pb_utils.InferenceResponse(error=error)
            except (InvalidParameters, ValueError, KeyError) as error:
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
            except Exception as error:  # noqa: BLE001 - one failed edit must not take the model down
                pb_utils.Logger.log_error(f"edit failed: {error!r}")
                return pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"edit failed: {error}")
                )
            return pb_utils.InferenceResponse([pb_utils.Tensor(PATH_OUTPUT, path)])

    return TritonPythonModel
