"""Ready classifier kinds for a team's own model file: no Python to write.

A model folder holds a config.pbtxt, a one-line `1/model.py` that re-exports
`own_triton_model.TritonPythonModel`, and the team's file. The config's
parameters say which kind it is:

- `propscope.format`: torchscript | onnx | state_dict
- `propscope.file`: the model file, relative to the version folder (`1/`), or absolute
- `propscope.module` (state_dict only): "package.module:ClassName"; the model folder
  is put on sys.path, so a python file beside config.pbtxt can define the class
- `propscope.module_kwargs` (state_dict only, optional): a JSON object of
  constructor keyword arguments
- `propscope.layers` (state_dict only, optional): the module paths to open, with
  their channels; the model then serves the open-model contract (open_model.py),
  whose optional tensors follow the image input and the scores output in the config.
  TorchScript and ONNX cannot be opened: a TorchScript module refuses forward hooks
  and an ONNX graph has no modules to hook.

The input's name, dims and datatype and the output's name come from the config's
single input and output: the gateway sends exactly that tensor (preprocessed as
the config's `propscope.mean/std` say), and the model's output goes back
unchanged (logits or probabilities; the gateway reads `propscope.output_kind`
or detects it). This module holds the numpy-in, numpy-out core; it imports
neither Triton nor, for ONNX, torch (every stub that imports torch starts
seconds slower).
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from propscope_server.open_contract import LAYERS_PARAMETER, OPEN_CAPABILITIES, declared_open

FORMAT_PARAMETER = "propscope.format"
FILE_PARAMETER = "propscope.file"
MODULE_PARAMETER = "propscope.module"
MODULE_KWARGS_PARAMETER = "propscope.module_kwargs"
FORMATS = ("torchscript", "onnx", "state_dict")
# Triton config datatypes the kinds accept for the image input, and their numpy types.
INPUT_DATATYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_UINT8": np.uint8}
OUTPUT_DATATYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64}
# ONNX input element types -> numpy.
ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}
# (config input dtype, the ONNX model's input dtype) pairs converted without changing
# values beyond float rounding; anything else (e.g. FP32 into a uint8 input) is refused.
SAFE_CASTS = {
    (np.dtype(np.uint8), np.dtype(np.float32)),
    (np.dtype(np.uint8), np.dtype(np.float16)),
    (np.dtype(np.float16), np.dtype(np.float32)),
    (np.dtype(np.float32), np.dtype(np.float16)),
}

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the Triton config; dims exclude the batch dimension, -1 = any."""

    name: str
    dims: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class OwnModelConfig:
    """What a model folder's config.pbtxt says about the team's model."""

    name: str
    format: str
    file: Path
    model_folder: Path
    input: TensorSpec
    output: TensorSpec
    module: str | None = None
    module_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # An open model (state_dict only): its layers, the optional tensors its config
    # declares after the image input and scores output, and its version folder.
    open: bool = False
    layers: tuple[Any, ...] = ()
    optional_inputs: tuple[str, ...] = ()
    optional_outputs: tuple[str, ...] = ()
    version_folder: Path | None = None

    @classmethod
    def from_triton(
        cls, config: Mapping[str, Any], model_folder: Path, version: str
    ) -> OwnModelConfig:
        """Read Triton's JSON model config; `model_folder` is args["model_repository"]
        (the model's own folder) and `version` args["model_version"]."""
        name = str(config.get("name", model_folder.name))

        def parameter(key: str) -> str | None:
            value = config.get("parameters", {}).get(key, {}).get("string_value")
            return value or None

        def refuse(message: str) -> ValueError:
            return ValueError(f"{name}: {message}")

        if int(config.get("max_batch_size", 0)) <= 0:
            raise refuse("set max_batch_size > 0; propscope sends a path as one batch")
        kind = parameter(FORMAT_PARAMETER)
        if kind not in FORMATS:
            raise refuse(
                f"parameter {FORMAT_PARAMETER} is {kind!r}; set one of {', '.join(FORMATS)}"
            )
        file_name = parameter(FILE_PARAMETER)
        if file_name is None:
            raise refuse(
                f"parameter {FILE_PARAMETER} is missing; set the model file's path "
                'relative to the version folder, e.g. "model.onnx"'
            )
        file = model_folder / version / file_name
        if not file.is_file():
            raise refuse(f"{FILE_PARAMETER}: no file at {file.resolve()}")
        inputs, outputs = config.get("input", []), config.get("output", [])
        opening = _open_declaration(config, kind, refuse)
        if opening is None and (len(inputs) != 1 or len(outputs) != 1):
            raise refuse(
                f"the config declares {len(inputs)} inputs and {len(outputs)} outputs; "
                "declare exactly one image input and one output of class scores"
            )
        if opening is not None and (not inputs or not outputs):
            raise refuse("declare the image input and the scores output first")
        input_spec = _tensor(inputs[0], INPUT_DATATYPES, "input", refuse)
        output_spec = _tensor(outputs[0], OUTPUT_DATATYPES, "output", refuse)
        module = parameter(MODULE_PARAMETER)
        kwargs: dict[str, Any] = {}
        if kind == "state_dict":
            if module is None or ":" not in module:
                raise refuse(
                    f"parameter {MODULE_PARAMETER} is {module!r}; a state_dict model needs "
                    '"package.module:ClassName" (a python file in the model folder is importable)'
                )
            text = parameter(MODULE_KWARGS_PARAMETER) or "{}"
            try:
                kwargs = json.loads(text)
            except json.JSONDecodeError as error:
                raise refuse(f"parameter {MODULE_KWARGS_PARAMETER} is not JSON: {error}") from None
            if not isinstance(kwargs, dict):
                raise refuse(f"parameter {MODULE_KWARGS_PARAMETER} must be a JSON object")
        if opening is None:
            return cls(name, kind, file, model_folder, input_spec, output_spec, module, kwargs)
        return cls(
            name,
            kind,
            file,
            model_folder,
            input_spec,
            output_spec,
            module,
            kwargs,
            open=True,
            layers=opening,
            optional_inputs=tuple(str(e["name"]) for e in inputs[1:]),
            optional_outputs=tuple(str(e["name"]) for e in outputs[1:]),
            version_folder=model_folder / version,
        )


def _open_declaration(
    config: Mapping[str, Any], kind: str, refuse: Callable[[str], ValueError]
) -> tuple[Any, ...] | None:
    """The declared layers of an open model, None for a closed one. Imports torch (via
    open_model) only for a config that declares something open."""
    parameters = config.get("parameters", {})
    if not declared_open(parameters):
        return None
    if kind != "state_dict":
        why = (
            "a TorchScript module refuses forward hooks"
            if kind == "torchscript"
            else "an ONNX graph has no modules to hook"
        )
        raise refuse(
            f"the config declares an open model ({LAYERS_PARAMETER} or capabilities "
            f"{', '.join(OPEN_CAPABILITIES)}) but propscope.format is {kind}, and "
            f"{why}; ship the weights as a state_dict with its module (propscope.format "
            '"state_dict", propscope.module "package.module:ClassName"), or drop the declaration'
        )
    from propscope_server.triton_models.classifiers import open_model

    try:
        layers = open_model.declared_layers(parameters)
        image_dims = config["input"][0].get("dims", []) if config.get("input") else []
        open_model.check_declared_tensors(
            config["input"][1:], config["output"][1:], layers, image_dims
        )
        return layers
    except ValueError as error:
        raise refuse(str(error)) from None


def _tensor(
    entry: Mapping[str, Any],
    datatypes: Mapping[str, type],
    what: str,
    refuse: Callable[[str], ValueError],
) -> TensorSpec:
    datatype = entry.get("data_type", "")
    if datatype not in datatypes:
        raise refuse(
            f"{what} {entry.get('name')!r} has data_type {datatype}; use one of {', '.join(datatypes)}"
        )
    dims = tuple(int(d) for d in entry.get("dims", []))
    return TensorSpec(str(entry["name"]), dims, np.dtype(datatypes[datatype]))


class OwnClassifier:
    """A team's model file behind the config's input and output: checks each batch
    against the config, runs the model, returns its output unchanged but for the
    config's output datatype."""

    def __init__(self, config: OwnModelConfig) -> None:
        self.config = config
        self.open: Any = None
        if config.open:
            self.open = _open_model(config)
        else:
            loaders = {
                "onnx": _onnx_runner,
                "torchscript": _torch_runner,
                "state_dict": _torch_runner,
            }
            self._run = loaders[config.format](config)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.infer(batch)[self.config.output.name]

    def infer(
        self,
        batch: np.ndarray,
        optional: Mapping[str, np.ndarray | None] | None = None,
        requested: Sequence[str] = (),
        cancelled: Callable[[], bool] | None = None,
    ) -> dict[str, np.ndarray]:
        """The scores output by name, and for an open model the requested optional
        outputs (`optional`: its optional inputs by name, None = not sent; `cancelled`:
        asked between a bound request's rows and sample batches)."""
        spec = self.config.input
        if batch.dtype != spec.dtype:
            raise ValueError(f"input {spec.name!r} must be {spec.dtype}, got {batch.dtype}")
        if not _fits(batch.shape[1:], spec.dims) or batch.ndim != len(spec.dims) + 1:
            raise ValueError(
                f"input {spec.name!r} must be [B, {', '.join(map(str, spec.dims))}], "
                f"got {list(batch.shape)}"
            )
        if batch.dtype.kind == "f" and not np.isfinite(batch).all():
            raise ValueError(f"input {spec.name!r} holds NaN or infinite values")
        results: dict[str, np.ndarray] = {}
        if self.open is None:
            outputs = np.asarray(self._run(np.ascontiguousarray(batch)))
        else:
            import torch

            results = self.open(
                torch.from_numpy(np.ascontiguousarray(batch)), optional, requested,
                cancelled=cancelled,
            )  # fmt: skip
            outputs = results.pop("scores")
        expected = self.config.output
        if (
            outputs.ndim != len(expected.dims) + 1
            or outputs.shape[0] != batch.shape[0]
            or not _fits(outputs.shape[1:], expected.dims)
        ):
            raise ValueError(
                f"the model returned shape {list(outputs.shape)} for a batch of {batch.shape[0]}; "
                f"the config's output {expected.name!r} says [B, {', '.join(map(str, expected.dims))}]"
            )
        return {expected.name: outputs.astype(expected.dtype, copy=False), **results}


def _fits(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    return len(shape) == len(dims) and all(
        d < 0 or s == d for s, d in zip(shape, dims, strict=True)
    )


def _onnx_runner(config: OwnModelConfig) -> Runner:
    """onnxruntime on the CPU, one thread: Triton scales with instances."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(config.file), options, providers=["CPUExecutionProvider"]
    )
    (model_input, *others) = session.get_inputs()
    if others:
        raise ValueError(
            f"{config.name}: {config.file.name} takes {len(others) + 1} inputs; "
            "propscope explains single-image classifiers"
        )
    model_dtype = ONNX_TYPES.get(model_input.type)
    if model_dtype is None:
        raise ValueError(
            f"{config.name}: {config.file.name}'s input {model_input.name!r} is "
            f"{model_input.type}; supported: {', '.join(ONNX_TYPES)}"
        )
    model_dtype = np.dtype(model_dtype)
    if model_dtype != config.input.dtype and (config.input.dtype, model_dtype) not in SAFE_CASTS:
        raise ValueError(
            f"{config.name}: the config's input is {config.input.dtype} but "
            f"{config.file.name} takes {model_dtype}; declare the model's own datatype"
        )
    declared = [d if isinstance(d, int) else -1 for d in model_input.shape[1:]]
    if len(declared) != len(config.input.dims) or any(
        d >= 0 and c >= 0 and d != c for d, c in zip(declared, config.input.dims, strict=True)
    ):
        raise ValueError(
            f"{config.name}: {config.file.name} takes [B, {', '.join(map(str, declared))}] "
            f"but the config's input says [B, {', '.join(map(str, config.input.dims))}]"
        )
    output_names = [o.name for o in session.get_outputs()]
    if config.output.name in output_names:
        output_name = config.output.name
    elif len(output_names) == 1:
        output_name = output_names[0]
    else:
        raise ValueError(
            f"{config.name}: the config's output {config.output.name!r} is none of "
            f"{config.file.name}'s outputs {output_names}; name one of them"
        )

    def run(batch: np.ndarray) -> np.ndarray:
        feed = {model_input.name: batch.astype(model_dtype, copy=False)}
        return session.run([output_name], feed)[0]

    return run


def _torch_runner(config: OwnModelConfig) -> Runner:
    """TorchScript (torch.jit.load) or a state_dict loaded into the named module."""
    import torch

    # One intra-op thread per instance: Triton scales with instances.
    torch.set_num_threads(1)
    if config.format == "torchscript":
        module = torch.jit.load(str(config.file), map_location="cpu")
    else:
        module = _state_dict_module(config)
    module.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            result = module(torch.from_numpy(batch))
        if isinstance(result, Mapping):
            if config.output.name not in result:
                raise ValueError(
                    f"the model returned outputs {sorted(result)}, not {config.output.name!r}"
                )
            result = result[config.output.name]
        if not isinstance(result, torch.Tensor):
            raise ValueError(
                f"the model returned {type(result).__name__}; its forward must return one "
                f"tensor or a dict holding {config.output.name!r}"
            )
        return result.detach().cpu().numpy()

    return run


def _open_model(config: OwnModelConfig) -> Any:
    """The state_dict module opened at its declared layers, checked by one dry pass
    on zeros of the input's dims (64 where a dim is -1), with the version folder's
    permanent ablation."""
    import torch

    from propscope_server.triton_models.classifiers.open_model import OpenModel, read_ablation

    torch.set_num_threads(1)
    network = _state_dict_module(config)
    dims = tuple(d if d > 0 else 64 for d in config.input.dims)
    dry = torch.from_numpy(np.zeros((1, *dims), config.input.dtype))
    assert config.version_folder is not None
    try:
        return OpenModel(
            network,
            config.layers,
            dry,
            read_ablation(config.version_folder, config.layers),
            output_name=config.output.name,
            name=config.name,
        )
    except ValueError as error:
        message = str(error)
        raise ValueError(
            message if message.startswith(f"{config.name}:") else f"{config.name}: {message}"
        ) from None


def _state_dict_module(config: OwnModelConfig) -> Any:
    import torch

    assert config.module is not None
    module_name, _, class_name = config.module.partition(":")
    folder = str(config.model_folder.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        network_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"{config.name}: cannot import {config.module!r} ({error}); put the module "
            f"in the model folder {folder} or install it into the server's environment"
        ) from None
    network = network_class(**config.module_kwargs)
    # weights_only: a weights file can never run code inside the server.
    state = torch.load(config.file, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{config.name}: {config.file.name} holds a {type(state).__name__}, not a state_dict; "
            "save model.state_dict()"
        )
    network.load_state_dict(state)
    return network
