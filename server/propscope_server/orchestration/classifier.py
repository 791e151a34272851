"""The classifier every method explains, resolved once per request: its input layout,
the output to read, the preprocessing (request > model config > gateway file, the
output kind detected when nobody declares it), the class labels, and the target
operator (a class's probability or logit) that turns outputs into the scores a
method explains.

Everything that can be refused is refused here, before any method's work."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from propscope_server.backends.preprocessing import (
    InputLayout,
    detection_warning,
    input_layout,
    looks_like_probabilities,
    normalise,
    resolve,
    to_model_input,
    to_probabilities,
)
from propscope_server.config import PreprocessingConfig, Settings
from propscope_server.domain import ClassifierRef
from propscope_server.errors import BackendError, FailedPrecondition, InvalidArgument
from propscope_server.inference import Inference, ModelDescription
from propscope_server.open_contract import OPTIONAL_OUTPUTS
from propscope_server.threads import in_thread

logger = logging.getLogger(__name__)

# Where the output kind came from when no source declared it (one forward pass decided).
DETECTED_SOURCE = "output_kind: detected from the outputs"
# Probabilities below this count as this in log-odds: a float32 model's exact 0 or 1.
LOG_ODDS_FLOOR = 1e-300


@dataclass(frozen=True)
class PlannedClassifier:
    model: ModelDescription
    layout: InputLayout
    output: str
    classes: int  # 0 when the output's shape does not say
    preprocessing: PreprocessingConfig  # every field resolved, output_kind included
    preprocessing_sources: tuple[str, ...]
    warnings: tuple[str, ...]
    class_labels: tuple[str, ...]

    def label(self, target: int) -> str:
        return self.class_labels[target] if target < len(self.class_labels) else ""


@dataclass(frozen=True)
class Target:
    """The target operator: which class, and whether its probability or its logit."""

    class_index: int
    score: str = "probability"


async def plan_classifier(
    inference: Inference,
    ref: ClassifierRef,
    image: np.ndarray,
    settings: Settings,
    deadline: float | None,
) -> PlannedClassifier:
    """Describes and checks the classifier; when no source declares the output kind, one
    forward pass on `image` decides it (said in the warnings)."""
    model = await inference.describe(ref.name, ref.version, deadline)
    if model.role == "editor":
        raise InvalidArgument(f"model {model.name!r} is an editor, not a classifier")
    if model.config_problem:
        raise FailedPrecondition(
            f"model {model.name!r}: {model.config_problem}; fix its config.pbtxt "
            "or pass model.preprocessing in the request"
        )
    if model.max_batch_size == 0:
        raise FailedPrecondition(
            f"model {model.name!r} has max_batch_size 0; propscope needs a batching classifier"
        )
    required = model.required_inputs
    if len(required) != 1:
        raise InvalidArgument(
            f"model {model.name!r} takes {len(required)} required inputs; "
            "propscope explains single-image classifiers (other inputs must be optional)"
        )
    tensor = required[0]
    layout = input_layout(tensor.name, tensor.datatype, tensor.shape, model.name)
    output = ref.output or model.outputs[0].name
    outputs = {t.name: t for t in model.outputs}
    if output not in outputs:
        raise InvalidArgument(
            f"model {model.name!r} has no output {output!r}; it has {', '.join(outputs)}"
        )
    if output in OPTIONAL_OUTPUTS and output != model.outputs[0].name:
        # Explained as scores, CHANNEL_MEANS would pass for 112 "classes" and the others
        # fail in the model (ACTIVATIONS needs ACTIVATION_LAYER, gradients GRADIENT_CLASS).
        raise InvalidArgument(
            f"model.output {output!r} is one of model {model.name!r}'s open-model outputs, "
            f"not class scores; leave model.output empty for {model.outputs[0].name!r}",
            field="model.output",
        )
    classes = int(np.prod(outputs[output].shape)) if outputs[output].shape else 0
    target = ref.target_class
    if target is not None and classes > 0 and target >= classes:
        raise InvalidArgument(
            f"target_class {target} is out of range: model {model.name!r} has {classes} classes"
        )
    await inference.require_ready(model, deadline)
    resolved = resolve(
        model.name,
        layout.datatype,
        [
            ("request", ref.preprocessing),
            ("model config", model.preprocessing),
            ("gateway file", settings.preprocessing.get(model.name)),
        ],
    )
    warnings = list(resolved.warnings)
    labels = _class_labels(ref, model, classes, warnings)
    preprocessing, sources = resolved.config, resolved.sources
    if preprocessing.output_kind is None:
        batch = await in_thread(to_model_input, image[None], layout, preprocessing)
        raw = (await inference.infer(model, {layout.name: batch}, [output], deadline))[output]
        kind = "probabilities" if looks_like_probabilities(raw) else "logits"
        preprocessing = preprocessing.model_copy(update={"output_kind": kind})
        sources = (*sources, DETECTED_SOURCE)
        warnings.append(detection_warning(model.name, kind))
    for warning in warnings:
        logger.warning("%s", warning)
    return PlannedClassifier(
        model=model,
        layout=layout,
        output=output,
        classes=classes,
        preprocessing=preprocessing,
        preprocessing_sources=tuple(sources),
        warnings=tuple(warnings),
        class_labels=labels,
    )


async def outputs(
    inference: Inference,
    classifier: PlannedClassifier,
    images: np.ndarray,
    deadline: float | None,
) -> np.ndarray:
    """[B, H, W, 3] uint8 images -> the model's raw outputs [B, C] (float64)."""
    batch = await in_thread(to_model_input, images, classifier.layout, classifier.preprocessing)
    return await _run(inference, classifier, batch, deadline)


async def outputs_of_pixels(
    inference: Inference,
    classifier: PlannedClassifier,
    pixels: np.ndarray,
    deadline: float | None,
) -> np.ndarray:
    """[B, h, w, 3] float32 RGB values in [0, 255] already at the model's input size
    (perturbed by a method) -> raw outputs [B, C]. A UINT8 model gets them rounded."""
    batch = await in_thread(normalise, pixels, classifier.layout, classifier.preprocessing)
    return await _run(inference, classifier, batch, deadline)


async def _run(
    inference: Inference, classifier: PlannedClassifier, batch: np.ndarray, deadline: float | None
) -> np.ndarray:
    raw = (
        await inference.infer(
            classifier.model, {classifier.layout.name: batch}, [classifier.output], deadline
        )
    )[classifier.output]
    raw = np.asarray(raw, dtype=np.float64).reshape(len(batch), -1)
    if not np.isfinite(raw).all():
        raise BackendError(f"model {classifier.model.name!r} returned non-finite outputs")
    return raw


def same_shape_runs(inputs: Sequence[np.ndarray]) -> Iterator[tuple[int, int]]:
    """(start, stop) of each run of consecutive model inputs of one shape: a
    variable-size model's inputs of other sizes go in batches of their own."""
    start = 0
    while start < len(inputs):
        stop = start + 1
        while stop < len(inputs) and inputs[stop].shape == inputs[start].shape:
            stop += 1
        yield start, stop
        start = stop


async def forward_rows(
    inference: Inference,
    classifier: PlannedClassifier,
    model_input: np.ndarray,
    extra: Mapping[str, np.ndarray],
    rows: int,
    outputs: Sequence[str],
    deadline: float | None,
    on_batch: Callable[[int], None] | None = None,
    concurrency: int = 1,
    batch: int | None = None,
) -> tuple[np.ndarray, ...]:
    """An open model's `rows` passes, each with its row of the `extra` inputs, of one
    input (model_input [1, ...], repeated) or of `rows` inputs (model_input [rows, ...]),
    in batches of `batch` rows (default max_batch_size) -> (raw outputs [rows, classes],
    then each of `outputs` [rows, ...]) as float64. Up to `concurrency` batches are in
    flight at once (Triton runs one while the gateway sends the next); `on_batch` hears
    each batch's rows."""
    model = classifier.model
    batch = min(batch or model.max_batch_size, model.max_batch_size)
    names = (classifier.output, *outputs)
    starts = range(0, rows, batch)
    parts: list[list[np.ndarray]] = [[] for _ in starts]
    limit = asyncio.Semaphore(concurrency)

    async def one_batch(k: int, start: int) -> None:
        stop = min(start + batch, rows)
        async with limit:
            images = (
                model_input[start:stop]
                if len(model_input) == rows
                else np.repeat(model_input, stop - start, axis=0)
            )
            inputs = {classifier.layout.name: images}
            inputs.update({name: value[start:stop] for name, value in extra.items()})
            answer = await inference.infer(model, inputs, list(names), deadline)
        parts[k] = [
            np.asarray(answer[name], dtype=np.float64).reshape(stop - start, -1) for name in names
        ]
        if on_batch is not None:
            on_batch(stop - start)

    try:
        async with asyncio.TaskGroup() as group:
            for k, start in enumerate(starts):
                group.create_task(one_batch(k, start))
    except ExceptionGroup as failed:
        # The first batch's error, as one call would raise it (the API maps a domain
        # error to its status; an ExceptionGroup would read as INTERNAL).
        raise failed.exceptions[0] from None
    arrays = tuple(np.concatenate(part) for part in zip(*parts, strict=True))
    if not all(np.isfinite(a).all() for a in arrays):
        raise BackendError(f"model {model.name!r} returned non-finite outputs")
    return arrays


def probabilities(classifier: PlannedClassifier, raw: np.ndarray) -> np.ndarray:
    """Raw outputs [B, C] -> probabilities, by the resolved output kind."""
    return to_probabilities(raw, classifier.preprocessing.output_kind or "logits")


def check_target_score(classifier: PlannedClassifier, score: str) -> None:
    """A logit cannot be recovered from a probabilities model: refused, not guessed."""
    if score == "logit" and classifier.preprocessing.output_kind == "probabilities":
        source = next(
            (s for s in classifier.preprocessing_sources if s.startswith("output_kind")),
            "output_kind",
        )
        raise FailedPrecondition(
            f"target_score LOGIT: model {classifier.model.name!r} returns probabilities "
            f"({source}), from which no logit can be recovered; ask for LOG_ODDS (the "
            "unsaturated margin) or PROBABILITY",
            field="target_score",
        )


def target_scores(classifier: PlannedClassifier, raw: np.ndarray, target: Target) -> np.ndarray:
    """Raw outputs [B, C] -> the target operator's value per image [B]."""
    if target.class_index >= raw.shape[1]:
        raise InvalidArgument(
            f"target_class {target.class_index} is out of range: the model has "
            f"{raw.shape[1]} classes",
            field="model.target_class",
        )
    if target.score == "logit":
        return raw[:, target.class_index]
    values = probabilities(classifier, raw)
    if target.score == "log_odds":
        others = np.delete(values, target.class_index, axis=1).sum(axis=1)
        inside = np.maximum(values[:, target.class_index], LOG_ODDS_FLOOR)
        return np.log(inside) - np.log(np.maximum(others, LOG_ODDS_FLOOR))
    return values[:, target.class_index]


def _class_labels(
    ref: ClassifierRef, model: ModelDescription, classes: int, warnings: list[str]
) -> tuple[str, ...]:
    """The request's labels, else the model's; a count that does not match the model's
    classes is refused (request) or dropped with a warning (config)."""
    if ref.class_labels:
        if classes > 0 and len(ref.class_labels) != classes:
            raise InvalidArgument(
                f"model.class_labels has {len(ref.class_labels)} names; model "
                f"{model.name!r} has {classes} classes",
                field="model.class_labels",
            )
        return ref.class_labels
    if classes > 0 and model.class_labels and len(model.class_labels) != classes:
        warnings.append(
            f"model {model.name!r} declares {len(model.class_labels)} class labels "
            f"for {classes} classes; they are not shown"
        )
        return ()
    return model.class_labels
