"""Causal explanatory graphs: the typed result of ``Client.graph`` (BuildGraph), folded from
its stream, and its renderings: JSON, Graphviz DOT text, SVG.

The graph drawn is the task graph when the call had more than one image (the nodes and edges
kept on at least ``min_share`` of the images of one class), else the image's own graph of kept
nodes and edges. Kept means ``relevant``: significant and a large enough effect (a node's
``probability_change``, an edge's ``path_effect``), as the server's task graph counts it. Layers are ranks (left to right in network order), a node is
labelled ``layer:channel`` with its score, and an edge's width grows with its path-specific
effect.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from propscope._errors import PropscopeError
from propscope._json import dataclass_dict
from propscope.v1 import graph_pb2

__all__ = [
    "BASELINES",
    "GraphEdge",
    "GraphLayer",
    "GraphNode",
    "GraphProgress",
    "GraphResult",
    "RepairChannel",
    "RepairResult",
    "TaskEdge",
    "TaskGraph",
    "TaskNode",
    "baseline_to_proto",
]

BASELINES: tuple[str, ...] = ("mean", "zero")
_BASELINE = {"mean": graph_pb2.GRAPH_BASELINE_MEAN, "zero": graph_pb2.GRAPH_BASELINE_ZERO}
# Edge widths in DOT (penwidth), the thinnest and the thickest.
MIN_PEN, MAX_PEN = 1.0, 6.0


def baseline_to_proto(value: str) -> int:
    if value not in _BASELINE:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {value!r}")
    return _BASELINE[value]


class _Record:
    """``to_dict()``: the JSON-ready copy every SDK result offers."""

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


def _copy(cls: type, msg: Any, **overrides: Any) -> Any:
    """A dataclass from the message field of the same name, repeated fields as tuples."""
    values = {}
    for name in cls.__dataclass_fields__:
        if name in overrides:
            continue
        value = getattr(msg, name)
        values[name] = tuple(value) if not isinstance(value, str | bytes | int | float) else value
    return cls(**values, **overrides)


@dataclass(frozen=True)
class GraphLayer(_Record):
    name: str
    channels: int


@dataclass(frozen=True)
class GraphProgress(_Record):
    """Forward passes done of the planned bound."""

    request_id: str
    passes_done: int
    passes_total: int


@dataclass(frozen=True)
class GraphNode(_Record):
    """One channel of one image (``NodeResult``): screened out by the pre-screen, or tested
    along its gradual path (``score``, ``p_value``, BH ``q_value``, ``significant``)."""

    image: int
    layer: str
    channel: int
    screened_out: bool
    prescreen_change: float
    score: float
    p_value: float
    q_value: float
    probability_change: float
    significant: bool
    relevant: bool
    curve: tuple[float, ...]

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.channel}"


@dataclass(frozen=True)
class GraphEdge(_Record):
    """Upstream channel (source) -> downstream channel (target) of one image."""

    image: int
    source_layer: str
    source_channel: int
    target_layer: str
    target_channel: int
    direct_effect: float
    path_effect: float
    score: float
    p_value: float
    q_value: float
    significant: bool
    relevant: bool
    curve: tuple[float, ...]
    clamped_curve: tuple[float, ...]

    @property
    def source(self) -> str:
        return f"{self.source_layer}:{self.source_channel}"

    @property
    def target(self) -> str:
        return f"{self.target_layer}:{self.target_channel}"


@dataclass(frozen=True)
class TaskNode(_Record):
    layer: str
    channel: int
    share: float
    bootstrap_frequency: float
    mean_score: float

    @property
    def key(self) -> str:
        return f"{self.layer}:{self.channel}"


@dataclass(frozen=True)
class TaskEdge(_Record):
    source_layer: str
    source_channel: int
    target_layer: str
    target_channel: int
    share: float
    bootstrap_frequency: float
    mean_score: float

    @property
    def source(self) -> str:
        return f"{self.source_layer}:{self.source_channel}"

    @property
    def target(self) -> str:
        return f"{self.target_layer}:{self.target_channel}"


@dataclass(frozen=True)
class TaskGraph(_Record):
    """The nodes and edges relevant (kept) on at least ``min_share`` of the images of one
    class."""

    target_class: int
    target_label: str
    images: tuple[int, ...]
    nodes: tuple[TaskNode, ...]
    edges: tuple[TaskEdge, ...]
    min_share: float
    excluded_images: tuple[int, ...]

    @classmethod
    def from_proto(cls, msg: graph_pb2.TaskGraph) -> TaskGraph:
        return _copy(
            cls,
            msg,
            nodes=tuple(_copy(TaskNode, node) for node in msg.nodes),
            edges=tuple(_copy(TaskEdge, edge) for edge in msg.edges),
        )


@dataclass(frozen=True)
class RepairChannel(_Record):
    layer: str
    channel: int
    value: float
    movement: float
    score: float


@dataclass(frozen=True)
class RepairResult(_Record):
    """The channels to ablate so that the model stops relying on ``property``."""

    property: str
    channels: tuple[RepairChannel, ...]
    warnings: tuple[str, ...]

    @classmethod
    def from_proto(cls, msg: graph_pb2.Repair) -> RepairResult:
        channels = tuple(_copy(RepairChannel, channel) for channel in msg.channels)
        return cls(property=msg.property, channels=channels, warnings=tuple(msg.warnings))

    def ablation(self, source: str = "") -> dict[str, Any]:
        """The ``propscope_ablation.json`` object of a repaired model version."""
        return {
            "channels": [
                {"layer": c.layer, "channel": c.channel, "value": c.value} for c in self.channels
            ],
            "source": source,
        }


@dataclass(frozen=True)
class GraphResult(_Record):
    """A finished BuildGraph call: the plan (model, layers, targets, baseline), every image's
    nodes and edges in the order they came, the task graph (more than one image), the repair
    (when asked), and the passes and time it took."""

    request_id: str
    model: str
    model_version: str
    layers: tuple[GraphLayer, ...]
    steps: int
    images: int
    targets: tuple[int, ...]
    target_labels: tuple[str, ...]
    baseline_source: str
    planned_passes: int
    # The plan's (GraphAccepted), then the finished graph's (GraphDone: per image, e.g. a
    # saturated image on which no node can be relevant).
    warnings: tuple[str, ...]
    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...]
    task_graph: TaskGraph | None
    repair: RepairResult | None
    passes: int
    total_ms: float

    def image_nodes(self, image: int) -> tuple[GraphNode, ...]:
        return tuple(node for node in self.nodes if node.image == image)

    def image_edges(self, image: int) -> tuple[GraphEdge, ...]:
        return tuple(edge for edge in self.edges if edge.image == image)

    def significant_nodes(self, image: int) -> tuple[GraphNode, ...]:
        return tuple(node for node in self.image_nodes(image) if node.significant)

    def kept_nodes(self, image: int) -> tuple[GraphNode, ...]:
        """The image's relevant nodes: what its graph draws and its edges join."""
        return tuple(node for node in self.image_nodes(image) if node.relevant)

    def kept_edges(self, image: int) -> tuple[GraphEdge, ...]:
        return tuple(edge for edge in self.image_edges(image) if edge.relevant)

    def to_json(self, indent: int | None = None) -> str:
        """Strict JSON (non-finite numbers as null)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def to_dot(self, image: int | None = None) -> str:
        """Graphviz DOT text of the task graph (``image`` None with a task graph), else of
        ``image``'s graph (None: image 0): kept (relevant) nodes and edges only."""
        if image is None and self.task_graph is not None:
            nodes, edges = self._task_drawing(self.task_graph)
            title = f"task graph of class {_class_name(self.task_graph.target_class, self.task_graph.target_label)}"
        else:
            index = 0 if image is None else image
            if not 0 <= index < self.images:
                raise ValueError(f"image must be in 0..{self.images - 1}, got {index}")
            nodes, edges = self._image_drawing(index)
            label = self.target_labels[index] if index < len(self.target_labels) else ""
            target = self.targets[index] if index < len(self.targets) else 0
            title = f"image {index}, class {_class_name(target, label)}"
        if not nodes:  # an empty drawing says why (GraphResult.warnings says more)
            title += ": no node kept (relevant)"
        return _dot(f"{self.model} v{self.model_version}: {title}", self.layers, nodes, edges)

    def to_svg(self, image: int | None = None) -> str:
        """``to_dot`` laid out by Graphviz's ``dot`` (the ``graphviz`` package and the
        ``dot`` binary: ``pip install 'propscope[graph]'`` and ``apt-get install graphviz``)."""
        try:
            import graphviz
        except ImportError:
            raise RuntimeError(_NO_PACKAGE) from None
        try:
            svg = graphviz.Source(self.to_dot(image)).pipe(format="svg", encoding="utf-8")
        except graphviz.ExecutableNotFound:
            raise RuntimeError(_NO_DOT) from None
        return svg

    def _image_drawing(self, image: int) -> tuple[list[tuple[str, str, float]], list[Any]]:
        nodes = [(n.layer, n.key, n.score) for n in self.kept_nodes(image)]
        edges = [
            (e.source, e.target, abs(e.path_effect), e.path_effect) for e in self.kept_edges(image)
        ]
        return nodes, edges

    def _task_drawing(self, task: TaskGraph) -> tuple[list[tuple[str, str, float]], list[Any]]:
        nodes = [(n.layer, n.key, n.mean_score) for n in task.nodes]
        images = set(task.images)
        edges = []
        for edge in task.edges:
            effects = [
                e.path_effect
                for e in self.edges
                if e.image in images and (e.source, e.target) == (edge.source, edge.target)
            ]
            mean = sum(effects) / len(effects) if effects else 0.0
            edges.append((edge.source, edge.target, abs(mean), mean))
        return nodes, edges


_NO_PACKAGE = (
    "to_svg needs the graphviz package: pip install 'propscope[graph]' "
    "(and Graphviz's dot: apt-get install graphviz)"
)
_NO_DOT = "Graphviz's dot is not on PATH: apt-get install graphviz (brew install graphviz)"


def graphviz_problem() -> str:
    """Why ``to_svg`` would fail here (no graphviz package, no ``dot``), else ""; the CLI
    asks before it computes a graph."""
    try:
        import graphviz  # noqa: F401
    except ImportError:
        return _NO_PACKAGE
    return "" if shutil.which("dot") else _NO_DOT


def _class_name(index: int, label: str) -> str:
    return f"{index} ({label})" if label else str(index)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dot(
    title: str,
    layers: Iterable[GraphLayer],
    nodes: list[tuple[str, str, float]],
    edges: list[tuple[str, str, float, float]],
) -> str:
    """Layers as ranks left to right; node labels ``layer:channel`` and score; edge widths
    from MIN_PEN to MAX_PEN by |path effect| over the largest."""
    lines = [
        "digraph propscope {",
        "  rankdir=LR;",
        f"  label={_quote(title)};",
        "  labelloc=t;",
        '  node [shape=box, style="rounded"];',
    ]
    order = [layer.name for layer in layers]
    by_layer: dict[str, list[tuple[str, float]]] = {}
    for layer, key, score in nodes:
        by_layer.setdefault(layer, []).append((key, score))
    for layer in sorted(
        by_layer, key=lambda name: order.index(name) if name in order else len(order)
    ):
        lines.append(f"  subgraph {_quote('layer ' + layer)} {{")
        lines.append("    rank=same;")
        for key, score in by_layer[layer]:
            label = _quote(key)[:-1] + f'\\n{score:.4g}"'  # DOT's line break: backslash-n
            lines.append(f"    {_quote(key)} [label={label}];")
        lines.append("  }")
    largest = max((width for _, _, width, _ in edges if math.isfinite(width)), default=0.0)
    for source, target, width, effect in edges:
        share = width / largest if largest > 0 and math.isfinite(width) else 0.0
        pen = MIN_PEN + (MAX_PEN - MIN_PEN) * share
        lines.append(
            f"  {_quote(source)} -> {_quote(target)} "
            f"[penwidth={pen:.2f}, label={_quote(f'{effect:+.3g}')}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


GraphCallback = Callable[[GraphProgress], None]


class GraphCollector:
    """Folds a BuildGraph stream's messages into one ``GraphResult``; progress goes to
    ``on_progress``, each node and edge to ``on_item`` as it comes."""

    def __init__(
        self,
        request_id: str,
        on_progress: GraphCallback | None = None,
        on_item: Callable[[GraphNode | GraphEdge], None] | None = None,
    ) -> None:
        self._request_id = request_id
        self._on_progress = on_progress
        self._on_item = on_item
        self._accepted: graph_pb2.GraphAccepted | None = None
        self._nodes: list[GraphNode] = []
        self._edges: list[GraphEdge] = []
        self._task: TaskGraph | None = None
        self._repair: RepairResult | None = None
        self._done: graph_pb2.GraphDone | None = None

    def add(self, message: graph_pb2.BuildGraphEvent) -> None:
        self._request_id = message.request_id or self._request_id
        kind = message.WhichOneof("event")
        if kind == "accepted":
            self._accepted = message.accepted
        elif kind == "progress" and self._on_progress is not None:
            progress = message.progress
            self._on_progress(
                GraphProgress(self._request_id, progress.passes_done, progress.passes_total)
            )
        elif kind == "node":
            self._item(self._nodes, _copy(GraphNode, message.node))
        elif kind == "edge":
            self._item(self._edges, _copy(GraphEdge, message.edge))
        elif kind == "task_graph":
            self._task = TaskGraph.from_proto(message.task_graph)
        elif kind == "repair":
            self._repair = RepairResult.from_proto(message.repair)
        elif kind == "done":
            self._done = message.done

    def _item(self, items: list[Any], item: GraphNode | GraphEdge) -> None:
        items.append(item)
        if self._on_item is not None:
            self._on_item(item)

    def result(self) -> GraphResult:
        accepted, done = self._accepted, self._done
        if accepted is None or done is None:
            raise PropscopeError(
                grpc.StatusCode.INTERNAL,
                "the BuildGraph stream ended without the plan and its end "
                "(GraphAccepted and GraphDone; a server fault)",
            )
        return GraphResult(
            request_id=self._request_id,
            model=accepted.model,
            model_version=accepted.model_version,
            layers=tuple(GraphLayer(layer.name, layer.channels) for layer in accepted.layers),
            steps=accepted.steps,
            images=accepted.images,
            targets=tuple(accepted.targets),
            target_labels=tuple(accepted.target_labels),
            baseline_source=accepted.baseline_source,
            planned_passes=accepted.planned_passes,
            warnings=(*accepted.warnings, *done.warnings),
            nodes=tuple(self._nodes),
            edges=tuple(self._edges),
            task_graph=self._task,
            repair=self._repair,
            passes=done.passes,
            total_ms=done.total_ms,
        )
