"""InstructPix2Pix editor on a diffusers pipeline; weights and runtime from config.pbtxt."""

from propscope_server.triton_models.editors.diffusion.ip2p import InstructPix2PixEditor
from propscope_server.triton_models.editors.triton_model import editor_model

TritonPythonModel = editor_model(InstructPix2PixEditor.from_context)
