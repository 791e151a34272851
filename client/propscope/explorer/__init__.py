"""The class explorer: a web page, served beside the gateway, where a person picks a model and
a class and sees the class's concepts ranked by importance with their MACO pictures and top
crops, and uploads an image to see its PropGrad curves and path strips, its Sobol map and its
concept maps. A client of the gRPC API through this SDK (``propscope explore``; docs/explorer.md).
"""

from __future__ import annotations

from propscope.explorer.server import make_server, serve
from propscope.explorer.service import (
    DEFAULT_PROPERTIES,
    ExplorerService,
    ExplorerSettings,
    read_class_images,
)

__all__ = [
    "DEFAULT_PROPERTIES",
    "ExplorerService",
    "ExplorerSettings",
    "make_server",
    "read_class_images",
    "serve",
]
