"""When a diffusion editor's Triton model loads its pipeline: at start (the
default, what a GPU deployment wants: ready means loaded) or at its first
request (`load: first_request`, the CPU stack's choice: importing torch and
diffusers and building a pipeline costs every editor's stub seconds of CPU at
start, which `make up` on two cores pays in full, while most sessions never
call a diffusion editor).

This module imports neither torch nor diffusers; the editor class is named by
its import path and imported when the pipeline is built. The config is checked
at start either way, so a wrong one still fails the model's load.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from propscope_server.editor_contract import EditRequest, ModelContext, PathEditor

LOAD_PARAMETER = "load"
LOAD_MODES = ("start", "first_request")
DTYPES = ("fp32", "fp16")


def check_config(parameters: Mapping[str, str], model_dir: Path) -> None:
    """What `pipelines.runtime_from_config` and `load_pipeline` would refuse,
    without importing torch: a missing pipeline folder, an unknown dtype or load
    mode, a size that is not a positive integer."""
    mode = parameters.get(LOAD_PARAMETER, "start")
    if mode not in LOAD_MODES:
        raise ValueError(f"parameter {LOAD_PARAMETER} must be one of {LOAD_MODES}; got {mode!r}")
    dtype = parameters.get("dtype", "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"parameter dtype must be one of {DTYPES}; got {dtype!r}")
    for name in ("resolution", "max_unet_batch"):
        value = parameters.get(name, "1")
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"parameter {name} must be a positive integer; got {value!r}")
    weights = Path(parameters["weights"])
    weights = weights if weights.is_absolute() else (model_dir / weights).resolve()
    if not (weights / "model_index.json").exists():
        raise FileNotFoundError(
            f"no diffusers pipeline at {weights} (a save_pretrained folder); "
            "`make pipelines` builds the tiny test ones, docs/editors.md says how to place real weights"
        )


def _build(editor_path: str, context: ModelContext) -> PathEditor:
    module, _, name = editor_path.partition(":")
    return getattr(importlib.import_module(module), name).from_context(context)


class FirstRequestEditor:
    """A PathEditor that builds the real one when the first requests arrive."""

    def __init__(self, editor_path: str, context: ModelContext) -> None:
        self.editor_path = editor_path
        self.context = context
        self.editor: PathEditor | None = None

    def edit_many(self, requests: list[EditRequest]) -> list[np.ndarray | Exception]:
        if self.editor is None:
            self.editor = _build(self.editor_path, self.context)
        return self.editor.edit_many(requests)


def diffusion_editor(editor_path: str) -> Callable[[ModelContext], PathEditor]:
    """The `load` function for `editor_model`: `editor_path` is
    "package.module:EditorClass", a DiffusionEditor subclass."""

    def load(context: ModelContext) -> PathEditor:
        check_config(context.parameters, context.model_dir)
        if context.parameters.get(LOAD_PARAMETER, "start") == "first_request":
            return FirstRequestEditor(editor_path, context)
        return _build(editor_path, context)

    return load
