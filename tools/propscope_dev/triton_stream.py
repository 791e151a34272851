"""A decoupled editor called directly on Triton's stream, as the benchmarks and tests call
it to compare with the gateway: its progress responses come first, the path last."""

from __future__ import annotations

import queue
from collections.abc import Mapping

import numpy as np
import tritonclient.grpc as triton_grpc

from propscope_server.backends.triton import triton_input
from propscope_server.editor_contract import PATH_OUTPUT


def stream_path(
    triton: triton_grpc.InferenceServerClient,
    editor: str,
    tensors: Mapping[str, np.ndarray],
    timeout_s: float = 300.0,
) -> np.ndarray:
    """PATH of the editor's final response to one request of ``tensors`` (shaped as the model
    takes them: with the batch dimension of a batching editor). The editor's own error is
    raised; ``timeout_s`` bounds the wait for each response."""
    inputs = [triton_input(name, array) for name, array in tensors.items()]
    responses: queue.SimpleQueue = queue.SimpleQueue()
    triton.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        triton.async_stream_infer(editor, inputs)
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                raise error
            path = result.as_numpy(PATH_OUTPUT)
            if path is not None:
                return path
    finally:
        triton.stop_stream()
