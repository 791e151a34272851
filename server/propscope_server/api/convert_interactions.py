"""InteractionService protobuf <-> domain: request validation (every refusal names the
field and the fix), defaults, the budgets, and the events' messages."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

import numpy as np

from propscope.v1 import attribution_pb2 as apb
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import interactions_pb2 as ipb
from propscope_server import domain
from propscope_server.api.convert import (
    check_name,
    classifier_ref,
    decode_image,
    largest_size,
    property_spec,
)
from propscope_server.config import Limits
from propscope_server.errors import InvalidArgument
from propscope_server.interactions_domain import (
    MAX_BOOTSTRAP,
    MIN_BOOTSTRAP,
    MIN_DESIGN_SIZE,
    DesignRows,
    DesignSpec,
    InteractionsAccepted,
    InteractionsOutcome,
    InteractionsProgress,
    InteractionsSpec,
)
from propscope_server.scoring.interactions import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_CONFIDENCE,
    DEFAULT_DESIGN_SIZE,
    Design,
    Interval,
    design_row_count,
    edit_schedule,
    interaction_design,
    nearest_powers_of_two,
)

# Unspecified is the probability here (interactions.proto), unlike Attribute's default.
TARGET_SCORES = {
    apb.TARGET_SCORE_UNSPECIFIED: "probability",
    apb.TARGET_SCORE_PROBABILITY: "probability",
    apb.TARGET_SCORE_LOGIT: "logit",
    apb.TARGET_SCORE_LOG_ODDS: "log_odds",
}
TARGET_SCORE_VALUES = {
    "probability": apb.TARGET_SCORE_PROBABILITY,
    "logit": apb.TARGET_SCORE_LOGIT,
    "log_odds": apb.TARGET_SCORE_LOG_ODDS,
}


@dataclass(frozen=True)
class Composition:
    """What composing a design's images costs: distinct images, edited images (strength 0
    is the identity), and the images held at once (the distinct rows plus one stage's
    edits)."""

    images: int
    edits: int
    held: int


def composition(design: Design) -> Composition:
    """The cost of composing `design`'s distinct rows through the editors."""
    rows = np.unique(design.rows, axis=0)
    stages = edit_schedule(rows)
    largest = max((stage.edits for stage in stages), default=0)
    return Composition(len(rows), sum(stage.edits for stage in stages), len(rows) + largest)


def _count(value: int, field: str, low: int, high: int, default: int, limit: str) -> int:
    value = value or default
    if not low <= value <= high:
        raise InvalidArgument(
            f"{field} must be in {low}..{high} (0 for the default {default}; {limit}); got {value}",
            field=field,
        )
    return value


def design_size(value: int, limits: Limits) -> int:
    """N: a power of two in MIN_DESIGN_SIZE..max_interaction_design_size, 0 the default."""
    size = value or DEFAULT_DESIGN_SIZE
    high = limits.max_interaction_design_size
    if size & (size - 1) == 0 and MIN_DESIGN_SIZE <= size <= high:
        return size
    if size < MIN_DESIGN_SIZE:
        fix = f"use at least {MIN_DESIGN_SIZE}"
    elif size > high:
        fix = (
            f"use at most {1 << (high.bit_length() - 1)} (the limit max_interaction_design_size "
            f"is {high})"
        )
    else:
        low, upper = nearest_powers_of_two(size)
        fix = f"use {low} or {upper}" if upper <= high else f"use {low}"
    raise InvalidArgument(
        f"design_size must be a power of two (Sobol sequences are balanced at powers of two) "
        f"in {MIN_DESIGN_SIZE}..{high}, or 0 for the default {DEFAULT_DESIGN_SIZE}; got "
        f"{size}: {fix}",
        field="design_size",
    )


def _property_count(count: int, limits: Limits) -> None:
    if count < 2:
        raise InvalidArgument(
            f"properties has {count}; interactions need at least two properties (their "
            "strengths are the factors whose joint effect is measured); add another property",
            field="properties",
        )
    if count > limits.max_properties:
        raise InvalidArgument(
            f"{count} properties; the limit max_properties is {limits.max_properties} per request",
            field="properties",
        )


def _bootstrap(value: int) -> int:
    return _count(
        value,
        "bootstrap",
        MIN_BOOTSTRAP,
        MAX_BOOTSTRAP,
        DEFAULT_BOOTSTRAP,
        "fewer resamples give unstable interval ends",
    )


def _confidence(value: float) -> float:
    if value == 0.0:
        return DEFAULT_CONFIDENCE
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise InvalidArgument(
            f"confidence must be in (0, 1), e.g. 0.9 (0 for the default {DEFAULT_CONFIDENCE}); "
            f"got {value}",
            field="confidence",
        )
    return float(value)


def _pair(names: list[str], pair: list[str]) -> tuple[int, int] | None:
    """The second-order pair as indices into the properties (request order kept)."""
    if not pair:
        return None
    known = ", ".join(names)
    if len(pair) != 2:
        raise InvalidArgument(
            f"second_order_pair names {len(pair)} properties; name exactly two different "
            f"properties of the request ({known}), or none",
            field="second_order_pair",
        )
    unknown = [name for name in pair if name not in names]
    if unknown:
        raise InvalidArgument(
            f"second_order_pair names {unknown[0][:40]!r}, which is no property of the request; "
            f"use two of {known}",
            field="second_order_pair",
        )
    if pair[0] == pair[1]:
        raise InvalidArgument(
            f"second_order_pair names {pair[0]!r} twice; name two different properties of {known}",
            field="second_order_pair",
        )
    return names.index(pair[0]), names.index(pair[1])


def _design_pair(indices: list[int], properties: int) -> tuple[int, int] | None:
    """InteractionDesign's pair: two different 0-based indices below `properties`."""
    if not indices:
        return None
    if len(indices) != 2 or indices[0] == indices[1]:
        raise InvalidArgument(
            f"second_order_pair must hold two different property indices (0-based), or none; "
            f"got {list(indices)}",
            field="second_order_pair",
        )
    for index in indices:
        if index >= properties:
            raise InvalidArgument(
                f"second_order_pair index {index} is out of range: properties are "
                f"0..{properties - 1}",
                field="second_order_pair",
            )
    return indices[0], indices[1]


def _row_budget(properties: int, size: int, pair: bool, limits: Limits) -> str | None:
    """What the design's rows alone break (images, forward passes), or None."""
    rows = design_row_count(properties, size, pair)
    if rows > limits.max_interaction_images:
        return (
            f"{rows} composed images (N (P + {3 if pair else 2}) design rows), over the limit "
            f"max_interaction_images of {limits.max_interaction_images}"
        )
    if rows + 1 > limits.max_forward_passes:
        return (
            f"{rows + 1} forward passes (every design row and the original), over the limit "
            f"max_forward_passes of {limits.max_forward_passes}"
        )
    return None


def _composition_budget(cost: Composition, pixels: int, limits: Limits) -> str | None:
    if cost.edits > limits.max_edits:
        return f"{cost.edits} edited images, over the limit max_edits of {limits.max_edits}"
    if cost.held * pixels > limits.max_path_pixels:
        return (
            f"{cost.held} images held at once ({cost.held * pixels} pixels), over the limit "
            f"max_path_pixels of {limits.max_path_pixels}"
        )
    return None


def _over_budget(
    properties: int,
    size: int,
    seed: int,
    pair: tuple[int, int] | None,
    pixels: int,
    composed: bool,
    limits: Limits,
) -> str | None:
    """What a design of `size` breaks for this request, or None when it fits."""
    problem = _row_budget(properties, size, pair is not None, limits)
    if problem or not pixels:
        return problem
    if not composed:
        rows = design_row_count(properties, size, pair is not None)
        return _composition_budget(Composition(rows, 0, rows), pixels, limits)
    return _composition_budget(
        composition(interaction_design(properties, size, seed, pair)), pixels, limits
    )


def check_budgets(
    properties: int,
    size: int,
    seed: int,
    pair: tuple[int, int] | None,
    limits: Limits,
    image_shape: tuple[int, ...] | None = None,
    composed: bool = True,
) -> None:
    """Refuses a design over any budget, naming the largest design_size that fits (or the
    image size to send, when no design does): `composed` designs are edited by the
    editors, others provided (no edits; every row's image held)."""
    pixels = image_shape[0] * image_shape[1] if image_shape is not None else 0
    problem = _over_budget(properties, size, seed, pair, pixels, composed, limits)
    if problem is None:
        return
    smaller = size // 2
    while smaller >= MIN_DESIGN_SIZE and _over_budget(
        properties, smaller, seed, pair, pixels, composed, limits
    ):
        smaller //= 2
    what = f"design_size {size} with {properties} properties needs {problem}"
    if smaller >= MIN_DESIGN_SIZE:
        # A pixel budget (the rows' own budgets passed) also fits with a smaller image.
        image = (
            ", a smaller image"
            if pixels and not _row_budget(properties, size, pair is not None, limits)
            else ""
        )
        raise InvalidArgument(
            f"{what}; use design_size {smaller} (the largest that fits){image}, fewer "
            "properties, or raise the limit (PROPSCOPE_LIMITS__*)",
            field="design_size",
        )
    if pixels and _row_budget(properties, MIN_DESIGN_SIZE, pair is not None, limits) is None:
        height, width = image_shape[:2]
        rows = design_row_count(properties, MIN_DESIGN_SIZE, pair is not None)
        fitting = largest_size(width, height, max(limits.max_path_pixels // (2 * rows), 1))
        raise InvalidArgument(
            f"{what}; even design_size {MIN_DESIGN_SIZE} does not fit this {width}x{height} "
            f"image: send a smaller image (about {fitting[0]}x{fitting[1]} pixels at this "
            "aspect ratio), fewer properties, or raise the limit (PROPSCOPE_LIMITS__*)",
            field="image",
        )
    raise InvalidArgument(
        f"{what}; even design_size {MIN_DESIGN_SIZE} does not fit: use fewer properties or "
        "raise the limit (PROPSCOPE_LIMITS__*)",
        field="properties",
    )


def _names(properties: list[pb.Property]) -> list[str]:
    names = []
    for index, prop in enumerate(properties):
        if not prop.name:
            raise InvalidArgument(
                f"properties[{index}].name is empty; every property needs a name",
                field=f"properties[{index}].name",
            )
        check_name(prop.name, f"properties[{index}].name")
        names.append(prop.name)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgument(
            f"property names must be unique; repeated: {', '.join(duplicates)}",
            field="properties",
        )
    return names


def _sources(properties: list[pb.Property], provided: bool) -> None:
    """Editors compose; a provided path cannot (its images are not functions of a
    strength), and with provided_design the properties carry names only."""
    for index, prop in enumerate(properties):
        source = prop.WhichOneof("source")
        region = prop.region.WhichOneof("shape") is not None
        if provided and (source is not None or region):
            part = source or "region"
            raise InvalidArgument(
                f"property {prop.name!r} has {'a ' + part if part != 'editor' else 'an editor'} "
                "and the request has provided_design: with provided_design the caller's images "
                "are the edits, so properties carry names only; drop the property's "
                f"{part} or the provided_design",
                field=f"properties[{index}].{part}",
            )
        if source == "provided_path":
            raise InvalidArgument(
                f"property {prop.name!r}: a provided_path cannot compose with other edits (its "
                "images are fixed, not an edit at any strength); give the property an editor, "
                "or render every design row yourself (InteractionDesign, then provided_design)",
                field=f"properties[{index}].provided_path",
            )
        if source is None and not provided:
            raise InvalidArgument(
                f"property {prop.name!r} has no editor; give it one, or render every design "
                "row yourself (InteractionDesign, then provided_design)",
                field=f"properties[{index}].editor",
            )


def interactions_spec(
    request: ipb.InteractionsRequest, limits: Limits, tenant: str = domain.DEFAULT_TENANT
) -> InteractionsSpec:
    """Everything refusable from the request alone, before any image beyond the request's
    own is decoded."""
    check_name(request.request_id, "request_id")
    classifier = classifier_ref(request.model)
    if not classifier.name:
        raise InvalidArgument(
            "model.name is required: the Triton name of the classifier", field="model.name"
        )
    properties = list(request.properties)
    _property_count(len(properties), limits)
    names = _names(properties)
    size = design_size(request.design_size, limits)
    pair = _pair(names, list(request.second_order_pair))
    bootstrap = _bootstrap(request.bootstrap)
    confidence = _confidence(request.confidence)
    if request.target_score not in TARGET_SCORES:
        raise InvalidArgument(
            f"target_score {request.target_score} is not a known value", field="target_score"
        )
    provided = request.HasField("provided_design")
    _sources(properties, provided)
    check_budgets(len(properties), size, request.seed, pair, limits, composed=not provided)
    image = decode_image(request.image, limits)
    check_budgets(len(properties), size, request.seed, pair, limits, image.shape, not provided)
    frames = None
    specs: tuple[domain.PropertySpec, ...]
    if provided:
        frames = _provided(request.provided_design, len(properties), size, pair, image, limits)
        specs = tuple(domain.PropertySpec(name=name) for name in names)
    else:
        specs = tuple(property_spec(i, p, image, 1, limits) for i, p in enumerate(properties))
    return InteractionsSpec(
        request_id=request.request_id or uuid.uuid4().hex,
        image=image,
        classifier=classifier,
        properties=specs,
        design_size=size,
        pair=pair,
        bootstrap=bootstrap,
        confidence=confidence,
        target_score=TARGET_SCORES[request.target_score],
        seed=request.seed,
        provided_design=frames,
        tenant=tenant,
    )


def _provided(
    message: ipb.ProvidedDesign,
    properties: int,
    size: int,
    pair: tuple[int, int] | None,
    image: np.ndarray,
    limits: Limits,
) -> tuple[np.ndarray, ...]:
    """One decoded image per design row, each the request image's size."""
    rows = design_row_count(properties, size, pair is not None)
    if len(message.images) != rows:
        raise InvalidArgument(
            f"provided_design has {len(message.images)} images; the design (design_size "
            f"{size}, {properties} properties{', a pair' if pair else ''}) has {rows} rows: "
            "send one image per row, in InteractionDesign's order for the same design_size, "
            "second_order_pair and seed",
            field="provided_design.images",
        )
    return tuple(
        decode_image(
            data,
            limits,
            f"provided_design image {i}",
            field=f"provided_design.images[{i}]",
            expected_size=(image.shape[1], image.shape[0]),
        )
        for i, data in enumerate(message.images)
    )


def design_spec(request: ipb.InteractionDesignRequest, limits: Limits) -> DesignSpec:
    """InteractionDesign refuses what Interactions would refuse about the design."""
    _property_count(request.properties, limits)
    size = design_size(request.design_size, limits)
    pair = _design_pair(list(request.second_order_pair), request.properties)
    check_budgets(request.properties, size, request.seed, pair, limits, composed=False)
    return DesignSpec(request.properties, size, pair, request.seed)


def design_rows(spec: DesignSpec) -> DesignRows:
    design = interaction_design(spec.properties, spec.design_size, spec.seed, spec.pair)
    return DesignRows(design.rows, tuple(design.kinds))


def design_response(rows: DesignRows) -> ipb.InteractionDesignResponse:
    return ipb.InteractionDesignResponse(
        rows=[ipb.DesignRow(strengths=row) for row in rows.rows.tolist()],
        row_kinds=rows.kinds,
    )


def _estimate(interval: Interval) -> ipb.Estimate:
    return ipb.Estimate(value=interval.value, ci_low=interval.low, ci_high=interval.high)


def interactions_event(request_id: str, event: object) -> ipb.InteractionsEvent:
    if isinstance(event, InteractionsAccepted):
        return ipb.InteractionsEvent(
            request_id=request_id,
            accepted=ipb.InteractionsAccepted(
                model_version=event.model_version,
                composition_order=event.composition_order,
                design_size=event.design_size,
                bootstrap=event.bootstrap,
                confidence=event.confidence,
                target_score=TARGET_SCORE_VALUES[event.target_score],
                planned_images=event.planned_images,
                planned_edits=event.planned_edits,
                planned_forward_passes=event.planned_forward_passes,
                warnings=event.warnings,
            ),
        )
    if isinstance(event, InteractionsProgress):
        return ipb.InteractionsEvent(
            request_id=request_id,
            progress=ipb.InteractionsProgress(
                stage=event.stage, completed=event.completed, total=event.total
            ),
        )
    assert isinstance(event, InteractionsOutcome)
    estimate = event.estimate
    result = ipb.InteractionsResult(
        indices=[
            ipb.PropertyIndices(
                property_name=name,
                first_order=_estimate(first),
                total_order=_estimate(total),
                interaction=_estimate(interaction),
            )
            for name, first, total, interaction in zip(
                event.composition_order,
                estimate.first,
                estimate.total,
                estimate.interaction,
                strict=True,
            )
        ],
        interaction_share=_estimate(estimate.share),
        interaction_significant=estimate.significant,
        negligible_variance=estimate.negligible_variance,
        variance=estimate.variance,
        mean=estimate.mean,
        target_class=event.target_class,
        target_label=event.target_label,
        target_score=TARGET_SCORE_VALUES[event.target_score],
        composition_order=event.composition_order,
        cache_hits=event.cache_hits,
        cache_misses=event.cache_misses,
        edits=event.edits,
        forward_passes=event.forward_passes,
        warnings=(*estimate.warnings, *event.warnings),
    )
    if estimate.second_order is not None and event.pair_names is not None:
        result.second_order.CopyFrom(
            ipb.SecondOrderIndex(
                property_names=event.pair_names, index=_estimate(estimate.second_order)
            )
        )
    return ipb.InteractionsEvent(request_id=request_id, result=result)
