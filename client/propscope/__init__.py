"""propscope: explain image classifiers by gradual interventions (client SDK).

>>> from propscope import Client, PropertyResult
>>> with Client("localhost:50051") as client:
...     for event in client.explain("cat.png", "resnet50", ["hue=procedural:operation=hue"]):
...         if isinstance(event, PropertyResult):
...             print(event.property_name, event.score, event.p_value)
"""

import logging

from propscope._client import Client
from propscope._errors import PropscopeError
from propscope._events import (
    Accepted,
    Done,
    EditorParameter,
    Event,
    ModelInfo,
    ModelRole,
    Progress,
    PropertyResult,
    SampleResult,
    TensorInfo,
    event_from_proto,
)
from propscope._images import ImageLike, encode_image
from propscope._properties import Property, parse_property

__all__ = [
    "Accepted",
    "Client",
    "Done",
    "EditorParameter",
    "Event",
    "ImageLike",
    "ModelInfo",
    "ModelRole",
    "Progress",
    "Property",
    "PropertyResult",
    "PropscopeError",
    "SampleResult",
    "TensorInfo",
    "encode_image",
    "event_from_proto",
    "parse_property",
]

# A library logs but never configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())
