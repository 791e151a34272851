"""Procedural editor: hue, brightness, saturation, blur (optionally masked) and patch blending."""

from propscope_server.editor_contract import SeedBySeed
from propscope_server.triton_models.editors.procedural import edit_path
from propscope_server.triton_models.editors.triton_model import editor_model

TritonPythonModel = editor_model(lambda context: SeedBySeed(edit_path))
