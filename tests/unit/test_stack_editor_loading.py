"""The CPU stack's diffusion editors load their pipeline at the first request: a
start imports neither torch nor diffusers for them, a wrong config still fails
the model's load, and the first request builds the real editor once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from propscope_server.editor_contract import ModelContext
from propscope_server.triton_models.editors.diffusion.loading import (
    FirstRequestEditor,
    check_config,
    diffusion_editor,
)

REPOSITORY = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "models"


class CountingEditor:
    """Stands in for a DiffusionEditor: counts how often it is built."""

    built = 0

    @classmethod
    def from_context(cls, context: ModelContext) -> CountingEditor:
        cls.built += 1
        return cls()

    def edit_many(self, requests: list) -> list:
        return [np.zeros((1, 1, 2, 2, 3), np.uint8) for _ in requests]


def context(tmp_path: Path, **parameters: str) -> ModelContext:
    (tmp_path / "pipe").mkdir(exist_ok=True)
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    return ModelContext({"weights": "pipe", **parameters}, tmp_path, "cpu")


def test_first_request_loading_builds_the_editor_once_on_the_first_call(tmp_path):
    CountingEditor.built = 0
    load = diffusion_editor(f"{__name__}:CountingEditor")
    editor = load(context(tmp_path, load="first_request"))
    assert isinstance(editor, FirstRequestEditor) and CountingEditor.built == 0
    assert len(editor.edit_many([object(), object()])) == 2
    editor.edit_many([object()])
    assert CountingEditor.built == 1


def test_loading_at_start_builds_the_editor_at_once(tmp_path):
    CountingEditor.built = 0
    editor = diffusion_editor(f"{__name__}:CountingEditor")(context(tmp_path))
    assert isinstance(editor, CountingEditor) and CountingEditor.built == 1


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"load": "later"}, "parameter load must be one of"),
        ({"dtype": "int8"}, "parameter dtype"),
        ({"resolution": "big"}, "parameter resolution"),
        ({"max_unet_batch": "0"}, "parameter max_unet_batch"),
        ({"weights": "missing"}, "make pipelines"),
    ],
)
def test_a_wrong_config_fails_the_load_before_any_request(tmp_path, parameters, message):
    ctx = context(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        check_config({**ctx.parameters, **parameters}, tmp_path)


@pytest.mark.parametrize("name", ["ip2p", "sdedit", "ledits"])
def test_the_cpu_editors_start_without_importing_torch(name):
    """What Triton's stub does at load: import model.py and call initialize's load."""
    script = f"""
import importlib.util, re, sys, types
from pathlib import Path
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")
from propscope_server.triton_models.editors.diffusion import loading
folder = Path({str(REPOSITORY / name)!r})
spec = importlib.util.spec_from_file_location("model", folder / "1" / "model.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))
pairs = re.findall(r'key: "(\\w+)" value: {{ string_value: "([^"]*)" }}', (folder / "config.pbtxt").read_text())
parameters = dict(pairs)
assert parameters["load"] == "first_request", parameters
loading.check_config(parameters, folder)
print("torch" in sys.modules, "diffusers" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
