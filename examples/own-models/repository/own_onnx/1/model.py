"""A team's own classifier: the file and its format are named in config.pbtxt."""

from propscope_server.triton_models.classifiers.own_triton_model import TritonPythonModel  # noqa: F401
