"""LEDITS++ editor on a diffusers pipeline; weights and runtime from config.pbtxt."""

from propscope_server.triton_models.editors.diffusion.ledits import LeditsEditor
from propscope_server.triton_models.editors.triton_model import editor_model

TritonPythonModel = editor_model(LeditsEditor.from_context)
