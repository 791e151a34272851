"""CausalGraphService protobuf <-> domain (graph_domain.py): request validation (every
refusal names the field and the fix), defaults, and the events' messages. What needs
the model (its layers, its capabilities, the pass budget) is the method's plan()."""

from __future__ import annotations

import math
import uuid
from dataclasses import fields

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import graph_pb2 as gpb
from propscope_server import graph_domain as gd
from propscope_server.api.convert import (
    MAX_NAME_CHARS,
    MAX_PARAMETER_CHARS,
    bounded,
    check_name,
    checked_version,
    classifier_ref,
    decode_image,
)
from propscope_server.config import Limits
from propscope_server.domain import DEFAULT_TENANT, EditorRef, PropertySpec
from propscope_server.errors import InvalidArgument

# GraphSpec's defaults: what 0 or unset means in the contract.
DEFAULT = {f.name: f.default for f in fields(gd.GraphSpec)}
BASELINE_NAMES = {
    gpb.GRAPH_BASELINE_UNSPECIFIED: "mean",
    gpb.GRAPH_BASELINE_MEAN: "mean",
    gpb.GRAPH_BASELINE_ZERO: "zero",
}
assert set(BASELINE_NAMES.values()) == set(gd.BASELINES)


def _fraction(
    value: float, field: str, default: float, *, closed_low: bool, closed_high: bool
) -> float:
    """A finite value in the interval, or InvalidArgument naming `field` and the default."""
    low_ok = value >= 0.0 if closed_low else value > 0.0
    high_ok = value <= 1.0 if closed_high else value < 1.0
    if not (math.isfinite(value) and low_ok and high_ok):
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        raise InvalidArgument(
            f"{field} must be in {interval} (unset for the default {default:g}); got {value}",
            field=field,
        )
    return float(value)


def _layers(names: list[str]) -> tuple[str, ...]:
    seen: set[str] = set()
    for index, name in enumerate(names):
        field = f"layers[{index}]"
        check_name(name, field, MAX_NAME_CHARS)
        if not name:
            raise InvalidArgument(
                f"{field} is empty; name a layer the model declares (ListModels lists them)",
                field=field,
            )
        if name in seen:
            raise InvalidArgument(f"{field}: layer {name!r} is named twice", field=field)
        seen.add(name)
    return tuple(names)


def _repair_property(prop: pb.Property) -> PropertySpec:
    """An editor property, as Explain's; a provided path or a region has no meaning over
    several images of other sizes."""
    field = "repair_property"
    if not prop.name:
        raise InvalidArgument(f"{field}.name is required (shown in the Repair event)", field=field)
    check_name(prop.name, f"{field}.name")
    if prop.WhichOneof("source") != "editor":
        raise InvalidArgument(
            f"{field} needs an editor (editor.model and its parameters): the repair follows the "
            "editor's path on every image; a provided path belongs to one image",
            field=f"{field}.editor",
        )
    if prop.HasField("region"):
        raise InvalidArgument(
            f"{field}.region is not supported: the images may differ in size; leave it unset "
            "(the editor's own region parameter, e.g. region=object, still applies)",
            field=f"{field}.region",
        )
    editor = prop.editor
    if not editor.model:
        raise InvalidArgument(
            f"{field}.editor.model is required: the Triton name of the editor",
            field=f"{field}.editor.model",
        )
    check_name(editor.model, f"{field}.editor.model")
    version = checked_version(editor.version, f"{field}.editor.version")
    for key, value in editor.parameters.items():
        check_name(key, f"{field}.editor.parameters key")
        check_name(value, f"{field}.editor.parameters[{key!r}]", MAX_PARAMETER_CHARS)
    return PropertySpec(
        name=prop.name,
        editor=EditorRef(model=editor.model, version=version, parameters=dict(editor.parameters)),
    )


def graph_spec(
    request: gpb.BuildGraphRequest, limits: Limits, tenant: str = DEFAULT_TENANT
) -> gd.GraphSpec:
    """Counts and ranges first, images last (decoding is the costly part)."""
    check_name(request.request_id, "request_id")
    classifier = classifier_ref(request.model)
    if not classifier.name:
        raise InvalidArgument(
            "model.name is required: the Triton name of the classifier", field="model.name"
        )
    count = len(request.images)
    if not 1 <= count <= limits.max_graph_images:
        raise InvalidArgument(
            f"images has {count} images; send 1..{limits.max_graph_images} (the limit "
            "max_graph_images; PROPSCOPE_LIMITS__MAX_GRAPH_IMAGES)",
            field="images",
        )
    layers = _layers(list(request.layers))
    steps = bounded(
        request.steps, DEFAULT["steps"], gd.MIN_STEPS, limits.max_steps, "steps", "max_steps"
    )
    alpha = (
        _fraction(request.alpha, "alpha", DEFAULT["alpha"], closed_low=False, closed_high=False)
        if request.alpha
        else DEFAULT["alpha"]
    )
    permutations = bounded(
        request.permutations,
        DEFAULT["permutations"],
        limits.min_permutations,
        limits.max_permutations,
        "permutations",
        "max_permutations",
    )
    if 1.0 / (permutations + 1) >= alpha:
        raise InvalidArgument(
            f"with {permutations} permutations the smallest p-value is "
            f"{1 / (permutations + 1):.3g}, not below alpha {alpha}; raise permutations",
            field="permutations",
        )
    # Whether `steps` can reach alpha is the plan's check: it needs the test's exact best
    # p-value (5 points: 0.067, not Explain's 2 / 5! bound), and names the fewest steps.
    min_change = DEFAULT["min_probability_change"]
    if request.HasField("min_probability_change"):
        min_change = _fraction(
            request.min_probability_change,
            "min_probability_change",
            min_change,
            closed_low=True,
            closed_high=True,
        )
    min_share = DEFAULT["min_share"]
    if request.HasField("min_share"):
        min_share = _fraction(
            request.min_share, "min_share", min_share, closed_low=False, closed_high=True
        )
    repair_share = DEFAULT["repair_max_share"]
    if request.HasField("repair_max_share"):
        repair_share = request.repair_max_share
        if not (math.isfinite(repair_share) and 0.0 < repair_share <= gd.MAX_REPAIR_SHARE):
            raise InvalidArgument(
                f"repair_max_share must be in (0, {gd.MAX_REPAIR_SHARE:g}] (unset for the default "
                f"{DEFAULT['repair_max_share']:g}); got {repair_share}",
                field="repair_max_share",
            )
    nodes = bounded(
        request.nodes_per_layer,
        DEFAULT["nodes_per_layer"],
        1,
        gd.MAX_NODES_PER_LAYER,
        "nodes_per_layer",
        "nodes_per_layer",
    )
    edges = bounded(
        request.max_edges, DEFAULT["max_edges"], 1, gd.MAX_EDGES, "max_edges", "max_edges"
    )
    bootstrap = bounded(
        request.bootstrap, DEFAULT["bootstrap"], 1, gd.MAX_BOOTSTRAP, "bootstrap", "bootstrap"
    )
    if request.baseline not in BASELINE_NAMES:
        raise InvalidArgument(
            f"baseline {request.baseline} is not a known value; use GRAPH_BASELINE_MEAN or "
            "GRAPH_BASELINE_ZERO",
            field="baseline",
        )
    baseline = BASELINE_NAMES[request.baseline]
    references = len(request.reference_images)
    if references and baseline != "mean":
        raise InvalidArgument(
            f"reference_images apply to the mean baseline only; with baseline {baseline} leave "
            f"them out (got {references})",
            field="reference_images",
        )
    if references and not gd.MIN_REFERENCE_IMAGES <= references <= gd.MAX_REFERENCE_IMAGES:
        raise InvalidArgument(
            f"reference_images has {references} images; a reference set needs "
            f"{gd.MIN_REFERENCE_IMAGES}..{gd.MAX_REFERENCE_IMAGES}",
            field="reference_images",
        )
    repair = (
        _repair_property(request.repair_property) if request.HasField("repair_property") else None
    )
    if repair is None and request.HasField("repair_max_share"):
        raise InvalidArgument(
            "repair_max_share needs repair_property (the property whose channels are ablated)",
            field="repair_property",
        )
    images = tuple(
        decode_image(data, limits, f"images[{i}]", field=f"images[{i}]")
        for i, data in enumerate(request.images)
    )
    reference_images = tuple(
        decode_image(data, limits, f"reference_images[{i}]", field=f"reference_images[{i}]")
        for i, data in enumerate(request.reference_images)
    )
    return gd.GraphSpec(
        request_id=request.request_id or uuid.uuid4().hex,
        images=images,
        classifier=classifier,
        layers=layers,
        target=classifier.target_class,
        steps=steps,
        baseline=baseline,
        reference_images=reference_images,
        alpha=alpha,
        permutations=permutations,
        min_probability_change=min_change,
        nodes_per_layer=nodes,
        max_edges=edges,
        min_share=min_share,
        bootstrap=bootstrap,
        seed=request.seed,
        repair_property=repair,
        repair_max_share=float(repair_share),
        tenant=tenant,
    )


def layer_info(layer: gd.Layer) -> pb.LayerInfo:
    return pb.LayerInfo(name=layer.name, channels=layer.channels)


def graph_event(request_id: str, event: gd.GraphEvent) -> gpb.BuildGraphEvent:
    message = gpb.BuildGraphEvent(request_id=request_id)
    if isinstance(event, gd.GraphAccepted):
        message.accepted.CopyFrom(
            gpb.GraphAccepted(
                model=event.model,
                model_version=event.model_version,
                layers=[layer_info(layer) for layer in event.layers],
                steps=event.steps,
                images=event.images,
                targets=event.targets,
                target_labels=event.target_labels,
                baseline_source=event.baseline_source,
                planned_passes=event.planned_passes,
                warnings=event.warnings,
            )
        )
    elif isinstance(event, gd.GraphProgress):
        message.progress.CopyFrom(
            gpb.GraphProgress(passes_done=event.done, passes_total=event.total)
        )
    elif isinstance(event, gd.NodeResult):
        message.node.CopyFrom(gpb.NodeResult(**_fields(event)))
    elif isinstance(event, gd.EdgeResult):
        message.edge.CopyFrom(gpb.EdgeResult(**_fields(event)))
    elif isinstance(event, gd.TaskGraph):
        message.task_graph.CopyFrom(
            gpb.TaskGraph(
                target_class=event.target_class,
                target_label=event.target_label,
                images=event.images,
                nodes=[gpb.TaskNode(**_fields(node)) for node in event.nodes],
                edges=[gpb.TaskEdge(**_fields(edge)) for edge in event.edges],
                min_share=event.min_share,
                excluded_images=event.excluded_images,
            )
        )
    elif isinstance(event, gd.Repair):
        message.repair.CopyFrom(
            gpb.Repair(
                property=event.property,
                channels=[gpb.RepairChannel(**_fields(channel)) for channel in event.channels],
                warnings=event.warnings,
            )
        )
    elif isinstance(event, gd.GraphDone):
        message.done.CopyFrom(
            gpb.GraphDone(
                total_ms=event.total_s * 1000.0, passes=event.passes, warnings=event.warnings
            )
        )
    else:
        raise TypeError(f"not a BuildGraph event: {type(event).__name__}")
    return message


def _fields(event: object) -> dict[str, object]:
    """A domain dataclass's fields by name: the proto's are the same (graph_domain.py)."""
    return dict(vars(event))
