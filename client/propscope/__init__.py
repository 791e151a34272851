"""propscope: explain image classifiers by gradual interventions (client SDK).

>>> from propscope import Client
>>> with Client("localhost:50051") as client:
...     result = client.explain("cat.png", "resnet50", {"hue": "procedural:operation=hue"}).result()
...     for found in result.properties:
...         print(found.property_name, found.score, found.p_value)

``AsyncClient`` makes the same calls on asyncio (grpc.aio).
"""

import logging
import pkgutil

# The stubs (propscope.v1) come from the propscope-api distribution, installed beside this
# package as a namespace portion.
__path__ = pkgutil.extend_path(__path__, __name__)

from propscope._async_client import AsyncClient, AsyncExplainStream
from propscope._attribution import (
    Attribution,
    AttributionProgress,
    Evaluation,
    EvaOptions,
    EvaResult,
    MetricResult,
    PerturbationSettings,
    RiseOptions,
    SobolOptions,
)
from propscope._client import Client, ExplainStream
from propscope._concepts import (
    Concept,
    ConceptBank,
    ConceptCrop,
    ConceptMap,
    ConceptMaps,
    ConceptsProgress,
)
from propscope._consistency import (
    ConsistencyModel,
    ConsistencyProgress,
    ConsistencyResult,
    ExplainerConsistency,
)
from propscope._errors import FieldViolation, PropscopeError
from propscope._events import (
    Accepted,
    Decision,
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
from propscope._graph import (
    GraphEdge,
    GraphLayer,
    GraphNode,
    GraphProgress,
    GraphResult,
    RepairChannel,
    RepairResult,
    TaskEdge,
    TaskGraph,
    TaskNode,
)
from propscope._images import AlphaDroppedWarning, ImageLike, encode_image, encode_mask
from propscope._interactions import (
    EditFunction,
    InteractionDesign,
    InteractionsProgress,
    InteractionsResult,
    Interval,
    PropertyIndices,
    SecondOrderIndex,
)
from propscope._preprocessing import Preprocessing
from propscope._properties import Box, Mask, Property, parse_property, split_property
from propscope._requests import Properties
from propscope._results import ExplainResult
from propscope._visualization import Visualization, VisualizeProgress

__all__ = [
    "Accepted",
    "AlphaDroppedWarning",
    "AsyncClient",
    "AsyncExplainStream",
    "Attribution",
    "AttributionProgress",
    "Box",
    "Client",
    "Concept",
    "ConceptBank",
    "ConceptCrop",
    "ConceptMap",
    "ConceptMaps",
    "ConceptsProgress",
    "ConsistencyModel",
    "ConsistencyProgress",
    "ConsistencyResult",
    "Decision",
    "Done",
    "EditFunction",
    "EditorParameter",
    "EvaOptions",
    "EvaResult",
    "Evaluation",
    "Event",
    "ExplainResult",
    "ExplainStream",
    "ExplainerConsistency",
    "FieldViolation",
    "GraphEdge",
    "GraphLayer",
    "GraphNode",
    "GraphProgress",
    "GraphResult",
    "ImageLike",
    "InteractionDesign",
    "InteractionsProgress",
    "InteractionsResult",
    "Interval",
    "Mask",
    "MetricResult",
    "ModelInfo",
    "ModelRole",
    "PerturbationSettings",
    "Preprocessing",
    "Progress",
    "Properties",
    "Property",
    "PropertyIndices",
    "PropertyResult",
    "PropscopeError",
    "RepairChannel",
    "RepairResult",
    "RiseOptions",
    "SobolOptions",
    "SampleResult",
    "SecondOrderIndex",
    "TaskEdge",
    "TaskGraph",
    "TaskNode",
    "TensorInfo",
    "Visualization",
    "VisualizeProgress",
    "encode_image",
    "encode_mask",
    "event_from_proto",
    "parse_property",
    "split_property",
]

# A library logs but never configures logging.
logging.getLogger(__name__).addHandler(logging.NullHandler())
