"""MACO feature visualisation (Visualize; scoring/maco.py holds the maths): a picture
that maximises a class logit, a hidden channel or a CRAFT concept of an open model.

The loop runs in the gateway: each step's crops go to the model in one batched call
(chunked by its max_batch_size) that returns INPUT_GRADIENT, d objective / d pixel
value; the objective is the GRADIENT_CLASS logit, or the spatial mean of a direction in
a layer's channels (GRADIENT_LAYER / GRADIENT_DIRECTION: a one-hot channel, a concept's
W row). Everything that can be refused is refused in plan(), before any pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from propscope_server import metrics
from propscope_server.backends.preprocessing import normalise, resize
from propscope_server.cache import ArtefactCache
from propscope_server.config import Settings
from propscope_server.errors import BackendError, FailedPrecondition, InvalidArgument
from propscope_server.inference import Inference, ModelDescription
from propscope_server.methods import require
from propscope_server.methods.base import require_inputs
from propscope_server.methods.craft import check_current, load_bank
from propscope_server.open_contract import OPTIONAL_INPUTS
from propscope_server.orchestration.classifier import (
    DETECTED_SOURCE,
    PlannedClassifier,
    plan_classifier,
    probabilities,
)
from propscope_server.scoring import maco
from propscope_server.threads import in_thread
from propscope_server.visualization_domain import (
    MAX_LEARNING_RATE,
    MIN_SIDE_PX,
    SPECTRUM_IMAGES,
    SPECTRUM_NATURAL,
    ChannelObjective,
    ClassObjective,
    ConceptObjective,
    VisualizeAccepted,
    VisualizeDone,
    VisualizeProgress,
    VisualizeSpec,
)

METHOD = "maco"
GRADIENT_CLASS = "GRADIENT_CLASS"
GRADIENT_LAYER = "GRADIENT_LAYER"
GRADIENT_DIRECTION = "GRADIENT_DIRECTION"
ACTIVATION_LAYER = "ACTIVATION_LAYER"
INPUT_GRADIENT = "INPUT_GRADIENT"
ACTIVATIONS = "ACTIVATIONS"
assert {GRADIENT_CLASS, ACTIVATION_LAYER} <= set(OPTIONAL_INPUTS)
# The class objective's inputs and outputs; a direction (channel, concept) adds these.
CLASS_CONTRACT = ((GRADIENT_CLASS,), (INPUT_GRADIENT,))
DIRECTION_CONTRACT = ((GRADIENT_LAYER, GRADIENT_DIRECTION, ACTIVATION_LAYER), (ACTIVATIONS,))
# How often the loop reports (steps): every step would be 256 messages for little news.
PROGRESS_EVERY = 8


@dataclass(frozen=True)
class Direction:
    """A direction d in the channels of one declared layer (its index)."""

    layer: int
    vector: np.ndarray  # [C]
    label: str


@dataclass(frozen=True)
class VisualizePlan:
    spec: VisualizeSpec
    classifier: PlannedClassifier
    objective: str  # in words
    class_index: int | None  # the class objective's, else None
    direction: Direction | None
    size: int
    input_size: tuple[int, int]
    magnitude: np.ndarray
    spectrum_source: str
    planned_passes: int
    passes_done: int  # in planning: output-kind detection
    warnings: tuple[str, ...]
    deadline: float | None
    started: float


def _check_spec(spec: VisualizeSpec, settings: Settings) -> None:
    """The request's own values against the ranges and the limits, naming the field."""
    limits = settings.limits
    s = spec.settings

    def within(value: float, low: float, high: float, field: str, limit: str = "") -> None:
        if not low <= value <= high:
            named = f" (the limit {limit})" if limit else ""
            raise InvalidArgument(
                f"{field} is {value:g}; it must be in [{low:g}, {high:g}]{named}", field=field
            )

    within(s.steps, 1, limits.max_visualize_steps, "steps", "max_visualize_steps")
    within(s.crops, 1, limits.max_visualize_crops, "crops", "max_visualize_crops")
    within(s.noise, 0.0, 1.0, "noise")
    within(s.box_start, maco.MIN_BOX, 1.0, "box_start")
    within(s.box_end, maco.MIN_BOX, 1.0, "box_end")
    if not 0.0 < s.learning_rate <= MAX_LEARNING_RATE:
        raise InvalidArgument(
            f"learning_rate is {s.learning_rate:g}; it must be in (0, {MAX_LEARNING_RATE:g}]",
            field="learning_rate",
        )
    if spec.size_px:
        within(
            spec.size_px,
            MIN_SIDE_PX,
            limits.max_visualize_side_px,
            "size_px",
            "max_visualize_side_px",
        )
        if spec.size_px % 2:
            raise InvalidArgument(
                f"size_px is {spec.size_px}; give an even side (the picture's spectrum needs one)",
                field="size_px",
            )
    count = len(spec.spectrum_images)
    if count > limits.max_visualize_images:
        raise InvalidArgument(
            f"spectrum_images has {count} images; the limit max_visualize_images is "
            f"{limits.max_visualize_images}",
            field="spectrum_images",
        )


def _check_contract(model: ModelDescription, directed: bool) -> None:
    """FailedPrecondition naming the open-model tensors the objective needs."""
    inputs, outputs = CLASS_CONTRACT
    if directed:
        require_inputs(
            model,
            (*inputs, *DIRECTION_CONTRACT[0], *outputs, *DIRECTION_CONTRACT[1]),
            "MACO of a channel or a concept (the gradient of a direction in a layer)",
        )
    else:
        require_inputs(model, (*inputs, *outputs), "MACO of a class (the input's gradient)")


def _channel_direction(objective: ChannelObjective, model: ModelDescription) -> Direction:
    names = [layer.name for layer in model.layers]
    if objective.layer not in names:
        known = ", ".join(names) if names else "none (propscope.layers)"
        raise InvalidArgument(
            f"channel.layer: model {model.name!r} has no layer {objective.layer!r}; it "
            f"declares {known}",
            field="channel.layer",
        )
    index = names.index(objective.layer)
    channels = model.layers[index].channels
    if objective.channel >= channels:
        raise InvalidArgument(
            f"channel.channel is {objective.channel}; layer {objective.layer!r} has "
            f"{channels} channels (0..{channels - 1})",
            field="channel.channel",
        )
    vector = np.zeros(channels)
    vector[objective.channel] = 1.0
    return Direction(index, vector, f"channel {objective.layer}[{objective.channel}]")


async def _concept_direction(
    objective: ConceptObjective, model: ModelDescription, cache: ArtefactCache, tenant: str
) -> Direction:
    """A stored CRAFT concept's W row at its bank's layer; an unknown bank is NotFound,
    one fitted on another model or version FailedPrecondition (stale)."""
    stored = await load_bank(cache, tenant, objective.bank_id)
    bank = stored.bank
    check_current(bank, model)
    if objective.concept >= bank.rank:
        raise InvalidArgument(
            f"concept.concept is {objective.concept}; bank {bank.bank_id!r} has {bank.rank} "
            f"concepts (0..{bank.rank - 1})",
            field="concept.concept",
        )
    names = [layer.name for layer in model.layers]
    if bank.layer not in names:
        raise FailedPrecondition(
            f"bank {bank.bank_id!r} is at layer {bank.layer!r}, which model {model.name!r} "
            "no longer declares; fit the bank again",
            field="concept.bank_id",
        )
    vector = np.asarray(bank.basis, dtype=np.float64)[objective.concept]
    return Direction(
        names.index(bank.layer),
        vector,
        f"concept {objective.concept} of bank {bank.bank_id} (layer {bank.layer})",
    )


class Maco:
    """The Visualize RPC's method: VisualizeAccepted, VisualizeProgress every few steps,
    VisualizeDone."""

    def __init__(self, inference: Inference, cache: ArtefactCache, settings: Settings) -> None:
        self._inference = inference
        self._cache = cache
        self._settings = settings

    async def plan(self, spec: VisualizeSpec, deadline: float | None) -> VisualizePlan:
        started = time.perf_counter()
        _check_spec(spec, self._settings)
        objective = spec.objective
        directed = not isinstance(objective, ClassObjective)
        described = await self._inference.describe(
            spec.classifier.name, spec.classifier.version, deadline
        )
        if described.role != "editor" and not described.config_problem:
            # Before plan_classifier, whose output-kind detection may run a pass: a
            # black-box model, a missing input or an unknown layer costs nothing.
            require(METHOD, described)
            _check_contract(described, directed)
            if isinstance(objective, ChannelObjective):
                _channel_direction(objective, described)
        tensor = described.required_inputs[0] if described.required_inputs else None
        side = spec.size_px or (tensor.shape[-2] if tensor and len(tensor.shape) == 3 else 64)
        grey = np.full((max(side, 1), max(side, 1), 3), 128, dtype=np.uint8)
        classifier = await plan_classifier(
            self._inference, spec.classifier, grey, self._settings, deadline
        )
        model = classifier.model
        layout = classifier.layout
        size = spec.size_px or layout.height or 0
        if not size:
            raise InvalidArgument(
                f"model {model.name!r} takes any input size; give size_px", field="size_px"
            )
        if size % 2 or not MIN_SIDE_PX <= size <= self._settings.limits.max_visualize_side_px:
            raise InvalidArgument(
                f"the model input's side {size} cannot be drawn (even, {MIN_SIDE_PX}.."
                f"{self._settings.limits.max_visualize_side_px}); give size_px",
                field="size_px",
            )
        input_size = (layout.height or size, layout.width or size)
        class_index = None
        direction = None
        if isinstance(objective, ClassObjective):
            class_index = objective.class_index
            if classifier.classes and class_index >= classifier.classes:
                raise InvalidArgument(
                    f"class_index is {class_index}; model {model.name!r} has "
                    f"{classifier.classes} classes (0..{classifier.classes - 1})",
                    field="class_index",
                )
            label = classifier.label(class_index)
            words = f"class {class_index}{f' ({label})' if label else ''} logit"
        elif isinstance(objective, ChannelObjective):
            direction = _channel_direction(objective, model)
            words = direction.label
        else:
            direction = await _concept_direction(objective, model, self._cache, spec.tenant)
            words = direction.label
        warnings = list(classifier.warnings)
        if classifier.preprocessing.output_kind == "probabilities" and class_index is not None:
            warnings.append(
                f"model {model.name!r} returns probabilities: the class objective is its "
                "probability, not a logit (a saturating objective)"
            )
        if spec.spectrum_images:
            images = np.stack(
                [resize(image[None], size, size)[0] for image in spec.spectrum_images]
            )
            magnitude = await in_thread(maco.images_spectrum, images)
            source = SPECTRUM_IMAGES
        else:
            magnitude = maco.natural_spectrum(size, size)
            source = SPECTRUM_NATURAL
        # The pass that detected an undeclared output kind ran on Triton: counted.
        detected = int(DETECTED_SOURCE in classifier.preprocessing_sources)
        settings = spec.settings
        return VisualizePlan(
            spec=spec,
            classifier=classifier,
            objective=words,
            class_index=class_index,
            direction=direction,
            size=size,
            input_size=input_size,
            magnitude=magnitude,
            spectrum_source=source,
            planned_passes=detected + settings.steps * settings.crops + 2,
            passes_done=detected,
            warnings=tuple(warnings),
            deadline=deadline,
            started=started,
        )

    async def run(self, plan: VisualizePlan) -> AsyncIterator[object]:
        spec = plan.spec
        settings = spec.settings
        model = plan.classifier.model
        yield VisualizeAccepted(
            model=model.name,
            model_version=model.version,
            objective=plan.objective,
            settings=settings,
            size_px=plan.size,
            spectrum_source=plan.spectrum_source,
            planned_passes=plan.planned_passes,
            warnings=plan.warnings,
        )
        loop = maco.Optimisation(plan.magnitude, plan.input_size, settings, spec.seed)
        passes = plan.passes_done
        start_objective, _ = await self._whole(plan, loop.picture())
        passes += 1
        for step in range(settings.steps):
            crops = await in_thread(loop.propose)
            # The next step's boxes and noise are drawn while the model works.
            (gradients, values), _ = await asyncio.gather(
                self._gradients(plan, crops), in_thread(loop.prepare)
            )
            passes += len(crops)
            await in_thread(loop.update, gradients)
            if (step + 1) % PROGRESS_EVERY == 0 or step + 1 == settings.steps:
                yield VisualizeProgress(step + 1, settings.steps, float(np.mean(values)))
        picture = np.clip(np.rint(loop.picture()), 0, 255).astype(np.uint8)
        objective, raw = await self._whole(plan, picture.astype(np.float64))
        passes += 1
        metrics.FORWARD_PASSES.labels(method=METHOD).inc(passes)
        probs = probabilities(plan.classifier, raw[None])[0]
        yield VisualizeDone(
            picture=picture,
            alpha=loop.alpha(),
            objective=objective,
            start_objective=start_objective,
            class_probabilities=tuple(float(p) for p in probs),
            predicted_class=int(np.argmax(probs)),
            passes=passes,
            total_s=time.perf_counter() - plan.started,
            warnings=(
                *plan.warnings,
                *outcome_warnings(plan.class_index, start_objective, objective, probs, settings),
            ),
        )

    async def _whole(self, plan: VisualizePlan, image: np.ndarray) -> tuple[float, np.ndarray]:
        """The objective and the raw scores of a whole picture (RGB values [H, W, 3]),
        resized to the model input as the crops are."""
        whole = maco.Crops.of(np.array([[0.0, 0.0, 1.0]]), image.shape[:2], plan.input_size)
        _, values, raw = await self._call(plan, whole.cut(image), gradients=False)
        return float(values[0]), raw[0]

    async def _gradients(
        self, plan: VisualizePlan, crops: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        gradients, values, _ = await self._call(plan, crops, gradients=True)
        return gradients, values

    async def _call(
        self, plan: VisualizePlan, pixels: np.ndarray, gradients: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Crops [K, h, w, 3] (RGB values) through the model in batches of its
        max_batch_size -> (d objective / d pixel value [K, h, w, 3] (empty without
        `gradients`), objective values [K], raw scores [K, classes])."""
        classifier = plan.classifier
        model = classifier.model
        layout = classifier.layout
        batch = await in_thread(normalise, pixels, layout, classifier.preprocessing)
        names = [classifier.output]
        if gradients:
            names.append(INPUT_GRADIENT)
        if plan.direction is not None:
            names.append(ACTIVATIONS)
        grads, values, raws = [], [], []
        for start in range(0, len(batch), model.max_batch_size):
            rows = batch[start : start + model.max_batch_size]
            inputs = {layout.name: rows, **self._objective_inputs(plan, len(rows))}
            answer = await self._inference.infer(model, inputs, names, plan.deadline)
            raw = np.asarray(answer[classifier.output], dtype=np.float64).reshape(len(rows), -1)
            raws.append(raw)
            if plan.direction is None:
                values.append(raw[:, plan.class_index])
            else:
                values.append(_direction_values(plan.direction, answer[ACTIVATIONS], len(rows)))
            if gradients:
                grads.append(_pixel_gradient(plan.classifier, answer[INPUT_GRADIENT]))
        raw = np.concatenate(raws)
        value = np.concatenate(values)
        gradient = np.concatenate(grads) if gradients else np.empty(0)
        if (
            not (np.isfinite(raw).all() and np.isfinite(value).all())
            or not np.isfinite(gradient).all()
        ):
            raise BackendError(f"model {model.name!r} returned non-finite outputs")
        return gradient, value, raw

    @staticmethod
    def _objective_inputs(plan: VisualizePlan, rows: int) -> dict[str, np.ndarray]:
        def column(value: int) -> np.ndarray:
            return np.full((rows, 1), value, dtype=np.int32)

        if plan.direction is None:
            return {GRADIENT_CLASS: column(int(plan.class_index or 0))}
        vector = np.tile(plan.direction.vector.astype(np.float32), (rows, 1))
        return {
            GRADIENT_CLASS: column(-1),
            GRADIENT_LAYER: column(plan.direction.layer),
            GRADIENT_DIRECTION: vector,
            ACTIVATION_LAYER: column(plan.direction.layer),
        }


def outcome_warnings(
    class_index: int | None,
    start_objective: float,
    objective: float,
    probabilities: np.ndarray,
    settings: maco.Settings,
) -> list[str]:
    """What a finished picture failed to reach, said in the result rather than left for the
    caller to notice: a class picture the model does not classify as the class, an
    objective that did not rise."""
    warnings = []
    if objective <= start_objective:
        warnings.append(
            f"the objective did not rise ({start_objective:.4g} -> {objective:.4g}); try more "
            "steps or another learning_rate (docs/maco.md)"
        )
    predicted = int(np.argmax(probabilities))
    if class_index is not None and predicted != class_index:
        warnings.append(
            f"the picture is classified as class {predicted} (p = "
            f"{probabilities[predicted]:.3g}), not class {class_index} (p = "
            f"{probabilities[class_index]:.3g}); where the picture's size is the model's input "
            f"size, crops of {settings.box_start:g} -> {settings.box_end:g} of it never show "
            "the model the whole picture: try box_start 1.0, box_end 0.5, or more steps "
            "(docs/maco.md)"
        )
    return warnings


def _direction_values(direction: Direction, activations: np.ndarray, rows: int) -> np.ndarray:
    """The spatial mean of sum_c d_c a_c per sample, from ACTIVATIONS [B, C*H*W]."""
    flat = np.asarray(activations, dtype=np.float64).reshape(rows, len(direction.vector), -1)
    return np.einsum("bcp,c->b", flat, direction.vector) / flat.shape[2]


def _pixel_gradient(classifier: PlannedClassifier, gradient: np.ndarray) -> np.ndarray:
    """INPUT_GRADIENT in the model's layout -> d / d pixel value [K, h, w, 3]: a uint8
    model's is already per pixel value (the open-model contract); a float model's is
    per normalised value, (pixel / 255 - mean) / std, so divided by 255 * std."""
    layout = classifier.layout
    values = np.asarray(gradient, dtype=np.float64)
    if layout.channels_first:
        values = values.transpose(0, 2, 3, 1)
    if layout.datatype != "UINT8":
        std = classifier.preprocessing.std
        values = values / (255.0 * np.asarray(std if std is not None else 1.0))
    return values
