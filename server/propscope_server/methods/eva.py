"""EVA (Fel et al., CVPR 2023) through an open model that propagates bounds: the
gateway builds the d + 1 radius rows (scoring/eva.py), the model bounds the logit
margins over each row's box (triton_models/classifiers/bounds.py), and the map is how
much holding each grid cell fixed lowers the bound. methods/attribution.py calls it
for an EvaSpec, so Attribute's cache, map resizing and events, and
EvaluateAttribution's stability, are the black-box methods' (docs/eva.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from propscope_server.backends.preprocessing import normalise, resize_values
from propscope_server.domain import EvaOutcome, EvaSpec, ViewAttribution
from propscope_server.errors import BackendError, FailedPrecondition, InvalidArgument
from propscope_server.inference import Inference, ModelDescription
from propscope_server.methods import require
from propscope_server.methods.base import require_inputs
from propscope_server.open_contract import (
    BOUND,
    BOUND_ATTACK_PASSES,
    BOUND_CODES,
    BOUND_FROM_INPUT,
    BOUND_OUTPUTS,
    BOUND_UNSUPPORTED,
)
from propscope_server.orchestration.classifier import PlannedClassifier, forward_rows
from propscope_server.scoring import eva as scoring
from propscope_server.threads import in_thread

BOUND_RADIUS, BOUND_CLASS, BOUND_METHOD, BOUND_LAYER, BOUND_SAMPLES, BOUND_SEED = BOUND
BOUND_MARGIN, SAMPLED_MARGIN = BOUND_OUTPUTS
SEEDS = 2**31  # BOUND_SEED is an int32
# Forward passes sampled inside the model (points and attack iterates) per Triton call,
# at least one row: a cancelled or timed-out request frees the model within one call.
SAMPLE_PASSES_PER_CALL = 4096


def layer_index(model: ModelDescription, layer: str, field: str) -> int:
    """The hybrid's declared layer index, -1 when verified from the input;
    InvalidArgument naming the declared layers otherwise."""
    if not layer:
        return BOUND_FROM_INPUT
    names = [declared.name for declared in model.layers]
    if layer not in names:
        raise InvalidArgument(
            f"{field} {layer!r} is not a layer model {model.name!r} declares; use one of "
            f"{', '.join(names) or '(none declared)'} (ListModels' layers), or leave it empty "
            "to verify from the input",
            field=field,
        )
    return names.index(layer)


def bound_inputs(
    method: EvaSpec, radii: np.ndarray, target: int, layer: int, seed: int, first: int = 0
) -> dict[str, np.ndarray]:
    """The BOUND_* columns of `radii`, rows first.. of the request's: a hybrid samples
    on every row (its empirical box), a verified run on row 0 only (the sampled
    overlap). Each row's seed is its own, whatever the batches."""
    rows = len(radii)
    samples = np.zeros((rows, 1), np.int32)
    samples[: rows if layer >= 0 else max(0, 1 - first)] = method.samples

    def column(value: int) -> np.ndarray:
        return np.full((rows, 1), value, np.int32)

    return {
        BOUND_RADIUS: radii.astype(np.float32, copy=False),
        BOUND_CLASS: column(target),
        BOUND_METHOD: column(BOUND_CODES[method.bound]),
        BOUND_LAYER: column(layer),
        BOUND_SAMPLES: samples,
        BOUND_SEED: ((seed + first + np.arange(rows)) % SEEDS).astype(np.int32).reshape(rows, 1),
    }


def bound_calls(method: EvaSpec, max_batch: int, rows_per_call: int) -> list[tuple[int, int, int]]:
    """The bound rows in parts (start, stop, rows per Triton call) such that no call
    samples more than SAMPLE_PASSES_PER_CALL passes (a sampled row's points and attack
    iterates), at least one row a call: a hybrid's every row samples; a verified map's
    row 0 only, alone in its call when its passes leave no room for another row."""
    rows = method.forward_passes
    sampled = method.samples + BOUND_ATTACK_PASSES
    if method.hybrid_layer:
        batch = max(1, min(max_batch, SAMPLE_PASSES_PER_CALL // sampled))
        starts = list(range(0, rows, rows_per_call))
    else:
        batch = max_batch
        first = 1 if sampled + 1 > SAMPLE_PASSES_PER_CALL else rows_per_call
        starts = [0, *range(first, rows, rows_per_call)]
    return [(start, stop, batch) for start, stop in zip(starts, [*starts[1:], rows], strict=True)]


async def plan_eva(
    inference: Inference,
    classifier: PlannedClassifier,
    target: int,
    method: EvaSpec,
    view: np.ndarray,
    deadline: float | None,
    prefix: str = "",
) -> None:
    """Refuses what EVA cannot do with this model before any bound row: no bounds, a
    probabilities model, a layer it does not declare, and (by one row at radius 0, the
    exact margins) a network the bound propagation does not support."""
    model = classifier.model
    require("eva", model)
    require_inputs(model, (*BOUND, *BOUND_OUTPUTS), "EVA (bound propagation)")
    if classifier.preprocessing.output_kind == "probabilities":
        raise FailedPrecondition(
            f"EVA bounds logit margins; model {model.name!r} returns probabilities, whose "
            "softmax the bound propagation does not take; deploy a variant that returns the "
            "logits (propscope.output_kind logits)",
            field="model",
        )
    if classifier.classes == 1:
        raise FailedPrecondition(
            f"EVA needs another class to overlap the target; model {model.name!r} has one",
            field="model",
        )
    layer = layer_index(model, method.hybrid_layer, f"{prefix}eva.hybrid_layer")
    probe = np.zeros((1, view.size), np.float32)
    # No sampling (and so no attack) where the mode allows none: a hybrid's layer box
    # needs one point, a verified row none.
    samples = 1 if layer != BOUND_FROM_INPUT else 0
    try:
        await forward_rows(
            inference,
            classifier,
            await in_thread(normalise, view[None], classifier.layout, classifier.preprocessing),
            bound_inputs(dataclasses.replace(method, samples=samples), probe, target, layer, 0),
            1,
            BOUND_OUTPUTS,
            deadline,
        )
    except BackendError as error:
        message = str(error)
        if BOUND_UNSUPPORTED not in message:
            raise
        reason = message[message.index(BOUND_UNSUPPORTED) :]
        raise FailedPrecondition(
            f"model {model.name!r} cannot run EVA: {reason}", field="method"
        ) from None


async def view_eva(
    inference: Inference,
    classifier: PlannedClassifier,
    target: int,
    view: np.ndarray,
    method: EvaSpec,
    seed: int,
    deadline: float | None,
    rows_per_call: int,
    concurrency: int,
    progress: Callable[[int], None],
    image_region: tuple[int, int, int, int] | None = None,
) -> ViewAttribution:
    """EVA's map of `view` (float32 [h, w, 3] RGB values): the d + 1 bound rows through
    the model, about `rows_per_call` rows made at a time (a large view's radii need not
    all fit), in Triton calls of bounded sampling (bound_calls), `progress` per batch."""
    height, width = view.shape[:2]
    layout = classifier.layout
    epsilon = scoring.input_epsilon(method.epsilon, layout.datatype, classifier.preprocessing.std)
    centre = await in_thread(normalise, view[None], layout, classifier.preprocessing)
    layer = layer_index(classifier.model, method.hybrid_layer, "eva.hybrid_layer")
    margins: list[np.ndarray] = []
    samples: list[np.ndarray] = []
    for start, stop, batch in bound_calls(method, classifier.model.max_batch_size, rows_per_call):
        radii = await in_thread(
            scoring.radius_rows,
            method.grid,
            height,
            width,
            epsilon,
            layout.channels_first,
            start,
            stop,
            image_region,
        )
        _, bound_part, sampled_part = await forward_rows(
            inference,
            classifier,
            centre,
            bound_inputs(method, radii, target, layer, seed, start),
            stop - start,
            BOUND_OUTPUTS,
            deadline,
            progress,
            concurrency,
            batch,
        )
        margins.append(bound_part)
        samples.append(sampled_part)
    bound_margins, sampled_margins = np.concatenate(margins), np.concatenate(samples)
    bounds = scoring.eva_bounds(bound_margins, sampled_margins, target)
    cells = bounds.importance.reshape(method.grid, method.grid).astype(np.float32)
    flat = scoring.flat_warning(bounds)
    warnings = ((flat,) if flat else ()) + scoring.soundness_warnings(
        bound_margins, sampled_margins, target
    )
    return ViewAttribution(cells, resize_values(cells, height, width), warnings, bounds)


def describe(
    method: EvaSpec,
    classifier: PlannedClassifier,
    view: np.ndarray,
    image_region: tuple[int, int, int, int] | None = None,
) -> str:
    """EVA's perturbation set in words (Accepted's perturbation_description)."""
    layout = classifier.layout
    epsilon = scoring.input_epsilon(method.epsilon, layout.datatype, classifier.preprocessing.std)
    if layout.datatype == "UINT8":
        units = f"{epsilon[0]:.4g} pixel values, clipped to [0, 255]"
    else:
        units = "per channel " + ", ".join(f"{e:.4g}" for e in epsilon) + " input units"
    padding = ""
    if image_region is not None and tuple(image_region[2:]) != view.shape[:2]:
        padding = " (the letterbox padding held fixed)"
    start = (
        f"hybrid from layer {method.hybrid_layer!r} ({method.samples} samples per row)"
        if method.hybrid_layer
        else "verified from the input"
    )
    return (
        f"every pixel within l_inf radius {method.epsilon:.4g} of the pixel range ({units}) "
        f"at the model's {view.shape[0]}x{view.shape[1]} input{padding}; each of the "
        f"{method.grid}x{method.grid} regions held fixed in turn; {method.bound.upper()} bounds "
        f"on the logit margins, {start}"
    )


def hybrid_warning(method: EvaSpec) -> tuple[str, ...]:
    """Said on every hybrid result: its bounds are not a guarantee."""
    if not method.hybrid_layer:
        return ()
    return (
        f"not guaranteed: hybrid from layer {method.hybrid_layer!r}, whose box is the range of "
        f"{method.samples} sampled points per row (with an attack's iterates and the centre), "
        "which may miss the layer's true range; the overlap bounds may lie below the true "
        "overlap. Leave eva.hybrid_layer empty for verified bounds",
    )


def eva_outcome(
    method: EvaSpec, bounds: scoring.EvaBounds, classifier: PlannedClassifier
) -> EvaOutcome:
    """The result's EVA fields; the same from a fresh run or the cache."""
    epsilon = scoring.input_epsilon(
        method.epsilon, classifier.layout.datatype, classifier.preprocessing.std
    )
    guaranteed = not method.hybrid_layer
    decision, verdict = scoring.decide(
        guaranteed, method.bound, bounds.overlap_bound, bounds.sampled_overlap
    )
    return EvaOutcome(
        guaranteed=guaranteed,
        bound=method.bound,
        epsilon=method.epsilon,
        epsilon_input=tuple(float(e) for e in epsilon),
        hybrid_layer=method.hybrid_layer,
        overlap_bound=bounds.overlap_bound,
        adversary_class=bounds.adversary_class,
        adversary_label=classifier.label(bounds.adversary_class),
        sampled_overlap=bounds.sampled_overlap,
        samples=method.samples,
        region_bounds=tuple(float(b) for b in bounds.region_bounds),
        certified=decision == "certified",
        bound_passes=method.forward_passes,
        sample_passes=method.sample_passes,
        decision=decision,
        verdict=verdict,
    )


def pack_bounds(bounds: scoring.EvaBounds) -> np.ndarray:
    """The bounds as float64 values for the cache, after the map."""
    head = [bounds.overlap_bound, bounds.sampled_overlap, bounds.adversary_class]
    return np.concatenate([np.asarray(head, np.float64), bounds.region_bounds])


def unpack_bounds(values: np.ndarray) -> scoring.EvaBounds:
    return scoring.EvaBounds(
        overlap_bound=float(values[0]),
        sampled_overlap=float(values[1]),
        adversary_class=int(values[2]),
        region_bounds=np.asarray(values[3:], np.float64),
    )
