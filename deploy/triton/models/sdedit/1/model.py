"""SDEdit (img2img) editor on a diffusers pipeline; weights, runtime and when the pipeline loads
(parameter `load`: start or first_request) from config.pbtxt."""

from propscope_server.triton_models.editors.diffusion.loading import diffusion_editor
from propscope_server.triton_models.editors.triton_model import editor_model

TritonPythonModel = editor_model(
    diffusion_editor("propscope_server.triton_models.editors.diffusion.sdedit:SDEditEditor")
)
