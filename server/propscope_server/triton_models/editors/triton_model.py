"""The Triton python-backend model that serves any editor.

`editor_model(load)` wraps a PathEditor, built once per model instance by
`load(ModelContext)`, in the editor contract (editor_contract.py): one response
per request, errors returned as responses, cancellation checked between the
editor's units of work. With dynamic batching (max_batch_size > 0) every request
carries one path request in a leading batch dimension of 1, and the requests
Triton hands over together reach the editor together. A decoupled model (its
config's model_transaction_policy) also sends each request's progress as the
editor reports it, then the path in the request's final response.
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
    PROGRESS_OUTPUT,
    SCHEMA_PARAMETER,
    SEED_INPUT,
    STRENGTHS_INPUT,
    EditCancelled,
    EditorSchema,
    EditRequest,
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
            self.batched = int(config.get("max_batch_size", 0)) > 0
            self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
            on_gpu = args.get("model_instance_kind") == "GPU"
            device = f"cuda:{args['model_instance_device_id']}" if on_gpu else "cpu"
            self.editor = load(ModelContext(parameters, Path(args["model_repository"]), device))
            labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
            # The families must outlive their metrics, so the model keeps both.
            self.metric_families = (
                pb_utils.MetricFamily(
                    name="propscope_editor_work_units_total",
                    description="Checkpoints an edit passed: when it starts, then one per denoising step (diffusion) or per seed (procedural)",
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

        def execute(self, requests: list) -> list | None:
            senders = [r.get_response_sender() if self.decoupled else None for r in requests]
            decoded: list[EditRequest | Exception] = [
                self._decode(r, sender) for r, sender in zip(requests, senders, strict=True)
            ]
            valid = [d for d in decoded if isinstance(d, EditRequest)]
            try:
                edited = iter(self.editor.edit_many(valid))
            except Exception as error:  # noqa: BLE001 - one failed batch must not take the model down
                pb_utils.Logger.log_error(f"edit failed: {error!r}")
                edited = iter([RuntimeError(f"edit failed: {error}")] * len(valid))
            responses = [
                self._respond(next(edited) if isinstance(d, EditRequest) else d) for d in decoded
            ]
            if not self.decoupled:
                return responses
            for sender, response in zip(senders, responses, strict=True):
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return None

        def _decode(self, request: Any, sender: Any) -> EditRequest | Exception:
            def tensor(name: str) -> np.ndarray:
                array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                if not self.batched:
                    return array
                if array.shape[0] != 1:
                    raise InvalidParameters(
                        f"send one path request per request; {name} has a batch of {array.shape[0]}"
                    )
                return array[0]

            def checkpoint() -> None:
                if request.is_cancelled():
                    raise EditCancelled
                self.work_units.increment(1)

            def progress(done: int, total: int) -> None:
                if sender is None or request.is_cancelled():
                    return
                report = np.array([done, total], dtype=np.int64)
                output = pb_utils.Tensor(PROGRESS_OUTPUT, report[None] if self.batched else report)
                try:
                    sender.send(pb_utils.InferenceResponse([output]))
                except Exception as error:  # noqa: BLE001 - a lost report must not fail the edit
                    pb_utils.Logger.log_warn(f"progress not sent: {error!r}")

            try:
                image = tensor(IMAGE_INPUT)
                seeds = tensor(SEED_INPUT)
                parameters = self.schema.resolve(
                    json.loads(tensor(PARAMETERS_INPUT).reshape(-1)[0])
                )
                if image.ndim != 3 or image.shape[-1] != 3:
                    raise InvalidParameters(f"IMAGE must be [H, W, 3]; got {list(image.shape)}")
                if seeds.ndim != 1 or len(seeds) == 0:
                    raise InvalidParameters(
                        f"SEED must be [S] with S >= 1; got {list(seeds.shape)}"
                    )
                strengths = tensor(STRENGTHS_INPUT).astype(np.float32)
                if strengths.ndim != 1 or len(strengths) == 0:
                    raise InvalidParameters(
                        f"STRENGTHS must be [N] with N >= 1; got {list(strengths.shape)}"
                    )
                if not (
                    np.isfinite(strengths).all()
                    and (0 <= strengths).all()
                    and (strengths <= 1).all()
                ):
                    raise InvalidParameters("STRENGTHS must lie in [0, 1]")
                return EditRequest(
                    image, strengths, parameters, [int(s) for s in seeds], checkpoint, progress
                )
            except (InvalidParameters, ValueError, KeyError) as error:
                return error

        def _respond(self, result: np.ndarray | Exception) -> Any:
            if isinstance(result, EditCancelled):
                self.cancelled.increment(1)
                error = pb_utils.TritonError(
                    "the edit was cancelled", pb_utils.TritonError.CANCELLED
                )
                return pb_utils.InferenceResponse(error=error)
            if isinstance(result, Exception):
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result)))
            path = result[None] if self.batched else result
            return pb_utils.InferenceResponse([pb_utils.Tensor(PATH_OUTPUT, path)])

    return TritonPythonModel
