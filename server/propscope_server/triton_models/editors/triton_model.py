"""The Triton python-backend model that serves any editor function.

An editor module provides `edit_path(image, strengths, parameters, seed)`;
`editor_model(edit_path)` wraps it in the editor contract (editor_contract.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
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
    EditorSchema,
    InvalidParameters,
)

EditFunction = Callable[[np.ndarray, np.ndarray, Mapping[str, str], int], np.ndarray]


def editor_model(edit_path: EditFunction) -> type:
    class TritonPythonModel:
        def initialize(self, args: dict[str, Any]) -> None:
            config = json.loads(args["model_config"])
            schema_text = config["parameters"][SCHEMA_PARAMETER]["string_value"]
            self.schema = EditorSchema.from_json(schema_text)

        def execute(self, requests: list) -> list:
            return [self._edit(request) for request in requests]

        def _edit(self, request: Any) -> Any:
            try:
                image = pb_utils.get_input_tensor_by_name(request, IMAGE_INPUT).as_numpy()
                strengths = pb_utils.get_input_tensor_by_name(request, STRENGTHS_INPUT).as_numpy()
                raw = pb_utils.get_input_tensor_by_name(request, PARAMETERS_INPUT).as_numpy()
                seed = int(pb_utils.get_input_tensor_by_name(request, SEED_INPUT).as_numpy()[0])
                parameters = self.schema.resolve(json.loads(raw.reshape(-1)[0]))
                if image.ndim != 3 or image.shape[-1] != 3:
                    raise InvalidParameters(f"IMAGE must be [H, W, 3]; got {list(image.shape)}")
                path = edit_path(image, strengths.astype(np.float32), parameters, seed)
            except (InvalidParameters, ValueError, KeyError) as error:
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
            return pb_utils.InferenceResponse([pb_utils.Tensor(PATH_OUTPUT, path)])

    return TritonPythonModel
