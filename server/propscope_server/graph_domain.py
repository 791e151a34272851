"""Protocol-agnostic request and event types of the causal explanatory graph
(BuildGraph, methods/causal_graph.py): what the API layer converts protobuf to and
from. Field names are the proto's (one definition, snake_case)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propscope_server.domain import DEFAULT_TENANT, ClassifierRef, PropertySpec
from propscope_server.inference import Layer

__all__ = [
    "BASELINES",
    "EdgeResult",
    "GraphAccepted",
    "GraphDone",
    "GraphEvent",
    "GraphProgress",
    "GraphSpec",
    "Layer",
    "NodeResult",
    "Repair",
    "RepairChannel",
    "TaskEdge",
    "TaskGraph",
    "TaskNode",
]

# The baseline b_c a do-intervention moves a channel toward.
BASELINES = ("mean", "zero")
# GraphAccepted.baseline_source: where the baseline values came from.
BASELINE_CONFIG = "config"  # the model's propscope.channel_means
BASELINE_REFERENCE = "reference_images"  # mean CHANNEL_MEANS over the request's references
BASELINE_ZERO = "zero"
# The ranges of GraphSpec's fields, one definition for the API's refusals
# (api/convert_graph.py) and the method's own (methods/causal_graph.py), as graph.proto
# states them. A reference set smaller than 8 gives noisy means; a larger one than 256
# buys nothing.
MIN_STEPS = 2
MIN_REFERENCE_IMAGES = 8
MAX_REFERENCE_IMAGES = 256
MAX_NODES_PER_LAYER = 4096
MAX_EDGES = 4096
MAX_BOOTSTRAP = 100_000
MAX_REPAIR_SHARE = 0.5


@dataclass(frozen=True)
class GraphSpec:
    """One BuildGraph request. `classifier.target_class` is not read: `target` is the
    graph's class (None: each image's predicted class, the task graph's the majority)."""

    request_id: str
    images: tuple[np.ndarray, ...]  # uint8 [H, W, 3] each
    classifier: ClassifierRef
    layers: tuple[str, ...] = ()  # empty: every declared layer
    target: int | None = None
    steps: int = 10
    baseline: str = "mean"  # mean | zero
    reference_images: tuple[np.ndarray, ...] = ()  # uint8 [H, W, 3]; "mean": before config
    alpha: float = 0.05
    permutations: int = 1000
    min_probability_change: float = 0.05
    nodes_per_layer: int = 16
    max_edges: int = 32
    min_share: float = 0.5
    bootstrap: int = 1000
    seed: int = 0
    # An editor intervention (like Explain's properties) whose path the repair follows.
    repair_property: PropertySpec | None = None
    repair_max_share: float = 0.05
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class GraphAccepted:
    model: str
    model_version: str
    layers: tuple[Layer, ...]  # the chosen layers, in network order
    steps: int
    images: int
    targets: tuple[int, ...]  # per image: the class whose probability is explained
    target_labels: tuple[str, ...]  # per image, "" when the model has no labels
    baseline_source: str  # config | reference_images | zero
    planned_passes: int  # the upper bound (pass-count formula); done may end below it
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class GraphProgress:
    done: int  # forward passes done
    total: int  # the planned bound


@dataclass(frozen=True)
class NodeResult:
    """One channel of one image. A screened-out channel carries only its pre-screen
    change (score, p and q are 0 / 1, never significant)."""

    image: int
    layer: str
    channel: int
    screened_out: bool
    prescreen_change: float  # |p(1) - p(0)| of the full ablation; 0 when not screened
    score: float  # E|dp| along t = 0..1
    p_value: float
    q_value: float  # BH across the image's tested nodes
    probability_change: float  # p(1) - p(0), signed
    significant: bool  # q < alpha
    relevant: bool  # significant and |probability_change| >= min_probability_change
    curve: tuple[float, ...] = ()  # p(t_k), k = 0..S


@dataclass(frozen=True)
class EdgeResult:
    """Upstream channel (source) -> downstream channel (target) of consecutive layers."""

    image: int
    source_layer: str
    source_channel: int
    target_layer: str
    target_channel: int
    direct_effect: float  # change of the target channel's spatial mean at t = 1
    path_effect: float  # d(1) = p_total(1) - p_clamped(1)
    score: float  # E|dd| along t
    p_value: float
    q_value: float  # BH across the image's edges
    significant: bool
    # significant and |path_effect| >= PATH_EFFECT_SHARE (0.1) * min_probability_change
    relevant: bool
    curve: tuple[float, ...] = ()  # d(t_k)
    clamped_curve: tuple[float, ...] = ()  # p_clamped(t_k): the target channel at its clean map


@dataclass(frozen=True)
class TaskNode:
    layer: str
    channel: int
    share: float  # of the task's images on which it is relevant (kept)
    bootstrap_frequency: float  # of resamples in which share >= min_share
    mean_score: float


@dataclass(frozen=True)
class TaskEdge:
    source_layer: str
    source_channel: int
    target_layer: str
    target_channel: int
    share: float
    bootstrap_frequency: float
    mean_score: float


@dataclass(frozen=True)
class TaskGraph:
    """The nodes and edges relevant (kept) on >= min_share of the images of one class."""

    target_class: int
    target_label: str
    images: tuple[int, ...]  # indices used
    nodes: tuple[TaskNode, ...]
    edges: tuple[TaskEdge, ...]
    min_share: float
    excluded_images: tuple[int, ...]  # target other than the graph's class


@dataclass(frozen=True)
class RepairChannel:
    layer: str
    channel: int
    value: float  # the ablation value: the channel's baseline b_c
    movement: float  # |delta spatial mean| along the property's path / clean std
    score: float  # the node's (mean) score in the graph


@dataclass(frozen=True)
class Repair:
    property: str  # the repair property's name
    channels: tuple[RepairChannel, ...]
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class GraphDone:
    total_s: float
    passes: int  # forward passes run (<= planned_passes)
    # Per image it concerns ("image N: ..."): a saturated image, where no node can be
    # relevant, and how to fix it.
    warnings: tuple[str, ...] = ()


GraphEvent = (
    GraphAccepted | GraphProgress | NodeResult | EdgeResult | TaskGraph | Repair | GraphDone
)
