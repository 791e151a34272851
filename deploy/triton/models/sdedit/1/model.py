"""SDEdit (img2img) editor on a diffusers pipeline; weights and runtime from config.pbtxt."""

from propscope_server.triton_models.editors.diffusion.sdedit import SDEditEditor
from propscope_server.triton_models.editors.triton_model import editor_model

TritonPythonModel = editor_model(SDEditEditor.from_context)
