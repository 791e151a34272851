"""VisualizationService protobuf <-> domain (visualization_domain.py): request
validation (every refusal names the field and the fix), defaults, and the events'
messages. What needs the model (its classes, layers, input size) is the method's plan()."""

from __future__ import annotations

import math
import uuid

import numpy as np

from propscope.v1 import visualization_pb2 as vpb
from propscope_server import visualization_domain as vd
from propscope_server.api.convert import (
    MAX_NAME_CHARS,
    bounded,
    check_name,
    classifier_ref,
    decode_image,
    encode_png,
)
from propscope_server.config import Limits
from propscope_server.domain import DEFAULT_TENANT
from propscope_server.errors import InvalidArgument
from propscope_server.scoring import maco


def _optional(
    request: vpb.VisualizeRequest, field: str, default: float, low: float, high: float
) -> float:
    """An optional double in [low, high], the default when unset."""
    if not request.HasField(field):
        return default
    value = getattr(request, field)
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgument(
            f"{field} must be in [{low:g}, {high:g}] (unset for the default {default:g}); "
            f"got {value}",
            field=field,
        )
    return float(value)


def _learning_rate(request: vpb.VisualizeRequest) -> float:
    if not request.HasField("learning_rate"):
        return maco.DEFAULT_LEARNING_RATE
    value = request.learning_rate
    if not (math.isfinite(value) and 0.0 < value <= vd.MAX_LEARNING_RATE):
        raise InvalidArgument(
            f"learning_rate must be in (0, {vd.MAX_LEARNING_RATE:g}] (unset for the default "
            f"{maco.DEFAULT_LEARNING_RATE:g}); got {value}",
            field="learning_rate",
        )
    return float(value)


def _placement(request: vpb.VisualizeRequest) -> str:
    if not request.placement:
        return maco.PLACEMENT_UNIFORM
    if request.placement not in maco.PLACEMENTS:
        raise InvalidArgument(
            f"placement is {request.placement[:40]!r}; give one of "
            f"{', '.join(maco.PLACEMENTS)} (empty for {maco.PLACEMENT_UNIFORM})",
            field="placement",
        )
    return request.placement


def _objective(request: vpb.VisualizeRequest) -> vd.Objective:
    kind = request.WhichOneof("objective")
    if kind == "class_index":
        return vd.ClassObjective(request.class_index)
    if kind == "channel":
        check_name(request.channel.layer, "channel.layer", MAX_NAME_CHARS)
        if not request.channel.layer:
            raise InvalidArgument(
                "channel.layer is empty; name a layer the model declares (ListModels lists them)",
                field="channel.layer",
            )
        return vd.ChannelObjective(request.channel.layer, request.channel.channel)
    if kind == "concept":
        check_name(request.concept.bank_id, "concept.bank_id", MAX_NAME_CHARS)
        if not request.concept.bank_id:
            raise InvalidArgument(
                "concept.bank_id is empty; give the id FitConcepts returned",
                field="concept.bank_id",
            )
        return vd.ConceptObjective(request.concept.bank_id, request.concept.concept)
    raise InvalidArgument(
        "objective is required: class_index, channel (layer and channel) or concept "
        "(bank_id and concept)",
        field="objective",
    )


def visualize_spec(
    request: vpb.VisualizeRequest, limits: Limits, tenant: str = DEFAULT_TENANT
) -> vd.VisualizeSpec:
    """Counts and ranges first, images last (decoding is the costly part)."""
    check_name(request.request_id, "request_id")
    classifier = classifier_ref(request.model)
    if not classifier.name:
        raise InvalidArgument(
            "model.name is required: the Triton name of the classifier", field="model.name"
        )
    objective = _objective(request)
    steps = bounded(
        request.steps,
        maco.DEFAULT_STEPS,
        1,
        limits.max_visualize_steps,
        "steps",
        "max_visualize_steps",
    )
    crops = bounded(
        request.crops,
        maco.DEFAULT_CROPS,
        1,
        limits.max_visualize_crops,
        "crops",
        "max_visualize_crops",
    )
    settings = maco.Settings(
        steps=steps,
        crops=crops,
        noise=_optional(request, "noise", maco.DEFAULT_NOISE, 0.0, 1.0),
        box_start=_optional(request, "box_start", maco.DEFAULT_BOX_START, maco.MIN_BOX, 1.0),
        box_end=_optional(request, "box_end", maco.DEFAULT_BOX_END, maco.MIN_BOX, 1.0),
        learning_rate=_learning_rate(request),
        placement=_placement(request),
    )
    if request.size_px and not vd.MIN_SIDE_PX <= request.size_px <= limits.max_visualize_side_px:
        raise InvalidArgument(
            f"size_px must be in {vd.MIN_SIDE_PX}..{limits.max_visualize_side_px} (0 for the "
            f"model input's side; the limit max_visualize_side_px); got {request.size_px}",
            field="size_px",
        )
    if request.size_px % 2:
        raise InvalidArgument(f"size_px is {request.size_px}; give an even side", field="size_px")
    count = len(request.spectrum_images)
    if count > limits.max_visualize_images:
        raise InvalidArgument(
            f"spectrum_images has {count} images; send at most {limits.max_visualize_images} "
            "(the limit max_visualize_images)",
            field="spectrum_images",
        )
    images = tuple(
        decode_image(data, limits, f"spectrum_images[{i}]", field=f"spectrum_images[{i}]")
        for i, data in enumerate(request.spectrum_images)
    )
    return vd.VisualizeSpec(
        request_id=request.request_id or uuid.uuid4().hex,
        classifier=classifier,
        objective=objective,
        settings=settings,
        seed=request.seed,
        spectrum_images=images,
        size_px=request.size_px,
        tenant=tenant,
    )


def visualize_event(request_id: str, event: vd.VisualizeEvent) -> vpb.VisualizeEvent:
    message = vpb.VisualizeEvent(request_id=request_id)
    if isinstance(event, vd.VisualizeAccepted):
        s = event.settings
        message.accepted.CopyFrom(
            vpb.VisualizeAccepted(
                model=event.model,
                model_version=event.model_version,
                objective=event.objective,
                steps=s.steps,
                crops=s.crops,
                noise=s.noise,
                box_start=s.box_start,
                box_end=s.box_end,
                placement=s.placement,
                learning_rate=s.learning_rate,
                size_px=event.size_px,
                spectrum_source=event.spectrum_source,
                planned_passes=event.planned_passes,
                warnings=event.warnings,
            )
        )
    elif isinstance(event, vd.VisualizeProgress):
        message.progress.CopyFrom(
            vpb.VisualizeProgress(
                steps_done=event.steps_done,
                steps_total=event.steps_total,
                objective=event.objective,
            )
        )
    elif isinstance(event, vd.VisualizeDone):
        alpha = np.asarray(event.alpha, dtype=np.float32)
        grey = np.rint(np.clip(alpha, 0.0, 1.0) * 255.0).astype(np.uint8)
        message.done.CopyFrom(
            vpb.VisualizeDone(
                picture_png=encode_png(event.picture),
                alpha_png=encode_png(grey),
                alpha=alpha.ravel().tolist(),
                height_px=alpha.shape[0],
                width_px=alpha.shape[1],
                objective=event.objective,
                start_objective=event.start_objective,
                class_probabilities=event.class_probabilities,
                predicted_class=event.predicted_class,
                passes=event.passes,
                total_ms=event.total_s * 1000.0,
                warnings=event.warnings,
            )
        )
    else:
        raise TypeError(f"not a Visualize event: {type(event).__name__}")
    return message
