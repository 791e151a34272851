"""Calibration-only editor: redraws the corner calibration_probe reads, per strength."""

from propscope_server.editor_contract import SeedBySeed
from propscope_server.triton_models.editors.calibration_noise import edit_path
from propscope_server.triton_models.editors.triton_model import editor_model

TritonPythonModel = editor_model(lambda context: SeedBySeed(edit_path))
