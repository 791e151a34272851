"""Synthetic circle-vs-square classifier; the weights and input format come from config.pbtxt."""

from propscope_server.triton_models.classifiers.triton_model import TritonPythonModel  # noqa: F401
