"""EvaluateConsistency: MeGe and ReCo (Fel, Vigouroux et al., WACV 2022) of several
explainers over several models, typically one model's fold versions
(docs/consistency.md).

Every explainer maps every image on every model; the maps of each pair of models on
each image are compared by scoring/consistency.py. The black-box explainers (Sobol,
RISE) reuse Attribute's code on the image as each model sees it; the gradient
explainers (saliency, gradient x input) read one INPUT_GRADIENT pass of an open model
per image; the random explainer draws uniform values and runs nothing. Every map is
compared over the image's own pixels (map_to_image), so models with different input
sizes can be compared."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np

from propscope_server import metrics
from propscope_server.backends.preprocessing import map_to_image, normalise, resize
from propscope_server.config import Settings
from propscope_server.consistency_domain import (
    EXPLAINERS,
    GRADIENT_EXPLAINERS,
    ConsistencyAccepted,
    ConsistencyDone,
    ConsistencyProgress,
    ConsistencySpec,
    ExplainerConsistency,
    ModelOutcome,
)
from propscope_server.domain import PerturbationSpec
from propscope_server.errors import (
    BackendError,
    InvalidArgument,
    ResourceExhausted,
)
from propscope_server.inference import Inference, ModelDescription
from propscope_server.methods import BY_NAME, require
from propscope_server.methods.attribution import TargetPlan, check_grid, view_attribution
from propscope_server.methods.base import model_capabilities, require_inputs
from propscope_server.orchestration.classifier import (
    DETECTED_SOURCE,
    PlannedClassifier,
    Target,
    check_target_score,
    outputs_of_pixels,
    plan_classifier,
)
from propscope_server.orchestration.runner import Finished, with_progress
from propscope_server.scoring import consistency as scoring
from propscope_server.threads import in_thread

# The registry's name for the RPC's black-box explainers (sobol, rise, random); the
# gradient explainers are registered under their own names (methods/__init__.py).
METHOD = "consistency"
GRADIENT_INPUT = "GRADIENT_CLASS"
GRADIENT_OUTPUT = "INPUT_GRADIENT"
# Progress events per explainer, at most (one per batch would be thousands).
PROGRESS_EVENTS = 100


def registry_name(explainer: str) -> str:
    """The registry entry whose capabilities `explainer` needs."""
    return explainer if explainer in GRADIENT_EXPLAINERS else METHOD


@dataclass(frozen=True)
class ModelPlan:
    classifier: PlannedClassifier
    views: tuple[np.ndarray, ...]  # float32 [h, w, 3] per image, as the model sees it
    predicted: tuple[int, ...]


@dataclass(frozen=True)
class ConsistencyPlan:
    spec: ConsistencySpec
    models: tuple[ModelPlan, ...]
    explainers: tuple[str, ...]
    targets: tuple[int, ...]  # the class explained on each image
    target_score: str
    planned_passes: int
    passes_done: int  # planning's passes: detections and predictions
    warnings: tuple[str, ...]
    deadline: float | None
    started: float


def _choose_explainers(
    spec: ConsistencySpec, models: list[ModelDescription]
) -> tuple[tuple[str, ...], list[str]]:
    """The explainers to run and the warnings: asked for ones are required of every
    model (FailedPrecondition naming the capability); when none is asked for, every
    explainer all the models serve."""
    if spec.explainers:
        for explainer in spec.explainers:
            for model in models:
                require(registry_name(explainer), model)
                if explainer in GRADIENT_EXPLAINERS:
                    _check_gradient_contract(model)
        return spec.explainers, []
    chosen, warnings = [], []
    for explainer in EXPLAINERS:
        needs = BY_NAME[registry_name(explainer)].needs
        lacking = [m.name for m in models if needs & ~model_capabilities(m)]
        if lacking:
            warnings.append(
                f"{explainer} left out: it needs gradients, which "
                f"{', '.join(sorted(set(lacking)))} does not declare (propscope.capabilities)"
            )
        else:
            for model in models if explainer in GRADIENT_EXPLAINERS else ():
                _check_gradient_contract(model)
            chosen.append(explainer)
    return tuple(chosen), warnings


def _check_gradient_contract(model: ModelDescription) -> None:
    require_inputs(model, (GRADIENT_INPUT, GRADIENT_OUTPUT), "the gradient explainers")


def planned_passes(spec: ConsistencySpec, explainers: tuple[str, ...], detections: int) -> int:
    """Forward and gradient passes of the whole evaluation: per model and image one
    prediction, the Sobol design, the RISE masks, one gradient pass shared by the
    gradient explainers; plus the output-kind detections planning runs."""
    per_map = 1
    if "sobol" in explainers:
        per_map += spec.sobol.forward_passes
    if "rise" in explainers:
        per_map += spec.rise.forward_passes
    if set(explainers) & set(GRADIENT_EXPLAINERS):
        per_map += 1
    return detections + len(spec.models) * len(spec.images) * per_map


def _duplicates(spec: ConsistencySpec, resolved: list[tuple[str, str]]) -> list[str]:
    seen: dict[tuple[str, str], int] = {}
    warnings = []
    for index, key in enumerate(resolved):
        if key in seen:
            warnings.append(
                f"models[{seen[key]}] and models[{index}] are the same model {key[0]!r} version "
                f"{key[1]}: their maps are identical (distance 0), which measures nothing about "
                "retraining; compare versions trained on different folds"
            )
        else:
            seen[key] = index
    return warnings


class Consistency:
    """The EvaluateConsistency RPC's method: ConsistencyAccepted, ConsistencyProgress,
    ConsistencyDone."""

    def __init__(self, inference: Inference, settings: Settings) -> None:
        self._inference = inference
        self._settings = settings

    async def plan(self, spec: ConsistencySpec, deadline: float | None) -> ConsistencyPlan:
        started = time.perf_counter()
        described = [
            await self._inference.describe(ref.name, ref.version, deadline) for ref in spec.models
        ]
        # Before plan_classifier, whose output-kind detection may run a forward pass: a
        # model that cannot serve an explainer is refused with nothing computed.
        for model in described:
            if model.role != "editor" and not model.config_problem:
                require(METHOD, model)
        explainers, warnings = _choose_explainers(spec, described)
        if "sobol" in explainers:
            for image in spec.images:
                check_grid(spec.sobol.grid, image.shape[:2], "sobol.grid_size")
        # Before plan_classifier too, which may load a model on demand or run a detection.
        self._check_budget(planned_passes(spec, explainers, 0))
        classifiers = [
            await plan_classifier(self._inference, ref, spec.images[0], self._settings, deadline)
            for ref in spec.models
        ]
        _check_same_classes(classifiers, warnings)
        detections = sum(DETECTED_SOURCE in c.preprocessing_sources for c in classifiers)
        planned = planned_passes(spec, explainers, detections)
        self._check_budget(planned)
        target_score = spec.target_score
        if target_score == "auto":
            logits = all(c.preprocessing.output_kind == "logits" for c in classifiers)
            target_score = "logit" if logits else "log_odds"
        for classifier in classifiers:
            check_target_score(classifier, target_score)
            warnings.extend(classifier.warnings)
            if spec.labels is not None and classifier.classes:
                for index, label in enumerate(spec.labels):
                    if label >= classifier.classes:
                        raise InvalidArgument(
                            f"labels[{index}] is {label}; model {classifier.model.name!r} has "
                            f"{classifier.classes} classes (0..{classifier.classes - 1})",
                            field=f"labels[{index}]",
                        )
        models = [await self._predict(c, spec, deadline) for c in classifiers]
        resolved = [(c.model.name, c.model.version) for c in classifiers]
        warnings.extend(_duplicates(spec, resolved))
        targets = spec.labels if spec.labels is not None else models[0].predicted
        return ConsistencyPlan(
            spec=spec,
            models=tuple(models),
            explainers=explainers,
            targets=tuple(int(t) for t in targets),
            target_score=target_score,
            planned_passes=planned,
            passes_done=detections + len(models) * len(spec.images),
            warnings=tuple(warnings),
            deadline=deadline,
            started=started,
        )

    def _check_budget(self, planned: int) -> None:
        limit = self._settings.limits.max_consistency_passes
        if planned > limit:
            raise ResourceExhausted(
                f"the evaluation needs {planned} forward passes; the limit "
                f"max_consistency_passes is {limit} per request; use fewer images or models, "
                "a smaller sobol.nb_design or rise.nb_samples, or fewer explainers",
                field="images",
            )

    async def _predict(
        self, classifier: PlannedClassifier, spec: ConsistencySpec, deadline: float | None
    ) -> ModelPlan:
        """Each image as the model sees it, and the class it predicts."""
        layout, mode = classifier.layout, classifier.preprocessing.resize or "squash"
        views, predicted = [], []
        for image in spec.images:
            view = (await in_thread(resize, image[None], layout.height, layout.width, mode))[0]
            view = view.astype(np.float32)
            raw = await outputs_of_pixels(self._inference, classifier, view[None], deadline)
            views.append(view)
            predicted.append(int(raw[0].argmax()))
        return ModelPlan(classifier, tuple(views), tuple(predicted))

    async def run(self, plan: ConsistencyPlan) -> AsyncIterator[object]:
        spec = plan.spec
        yield ConsistencyAccepted(
            models=tuple(
                ModelOutcome(m.classifier.model.name, m.classifier.model.version)
                for m in plan.models
            ),
            explainers=plan.explainers,
            image_count=len(spec.images),
            labels_given=spec.labels is not None,
            planned_passes=plan.planned_passes,
            warnings=plan.warnings,
        )
        done = plan.passes_done
        results = []
        # One gradient pass per model and image serves both gradient explainers.
        gradients: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for explainer in plan.explainers:
            explainer_started = time.perf_counter()

            async def work(
                emit: Callable[[object], None], explainer: str = explainer
            ) -> np.ndarray:
                nonlocal done
                step = max(1, plan.planned_passes // PROGRESS_EVENTS)
                last = done

                def progress(count: int) -> None:
                    nonlocal done, last
                    done += count
                    if done - last >= step:
                        last = done
                        emit(ConsistencyProgress(done, plan.planned_passes, explainer))

                return await self._maps(plan, explainer, progress, gradients)

            async with aclosing(with_progress(work)) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        maps, map_warnings = event.value
                    else:
                        yield event
            metrics.FORWARD_PASSES.labels(method=registry_name(explainer)).inc(
                _explainer_passes(plan, explainer)
            )
            results.append(
                await in_thread(
                    _score,
                    plan,
                    explainer,
                    maps,
                    map_warnings,
                    time.perf_counter() - explainer_started,
                )
            )
        yield ConsistencyProgress(done, plan.planned_passes, "")
        yield ConsistencyDone(
            explainers=tuple(results),
            models=tuple(_model_outcome(m, spec.labels) for m in plan.models),
            passes=done,
            total_s=time.perf_counter() - plan.started,
            warnings=plan.warnings,
        )

    async def _maps(
        self,
        plan: ConsistencyPlan,
        explainer: str,
        progress: Callable[[int], None],
        gradients: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
    ) -> tuple[np.ndarray, tuple[str, ...]]:
        """Maps [models, images, H, W] over the images (which must share a size for the
        stack; each map is over its own image otherwise, held as an object array), and
        the maps' warnings. Models run side by side: each version is its own worker."""
        images = plan.spec.images
        maps: list[list[np.ndarray]] = [[None] * len(images) for _ in plan.models]  # type: ignore[list-item]
        warnings: list[str] = []

        async def one_model(k: int, model: ModelPlan) -> None:
            for n, image in enumerate(images):
                view_map, map_warnings = await self._view_map(
                    plan, explainer, model, (k, n), progress, gradients
                )
                warnings.extend(
                    f"{model.classifier.model.name} v{model.classifier.model.version} image {n}: "
                    f"{w}"
                    for w in map_warnings
                )
                maps[k][n] = await in_thread(
                    map_to_image,
                    view_map,
                    image.shape[0],
                    image.shape[1],
                    model.classifier.preprocessing.resize or "squash",
                )

        try:
            async with asyncio.TaskGroup() as group:
                for k, model in enumerate(plan.models):
                    group.create_task(one_model(k, model))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        stacked = np.empty((len(plan.models), len(images)), dtype=object)
        for k, row in enumerate(maps):
            for n, values in enumerate(row):
                stacked[k, n] = values
        return stacked, tuple(warnings)

    async def _view_map(
        self,
        plan: ConsistencyPlan,
        explainer: str,
        model: ModelPlan,
        where: tuple[int, int],
        progress: Callable[[int], None],
        gradients: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]],
    ) -> tuple[np.ndarray, tuple[str, ...]]:
        """One map over the view of image n by model k (`where`: k, n)."""
        n = where[1]
        spec, view = plan.spec, model.views[n]
        target = Target(plan.targets[n], plan.target_score)
        if explainer in ("sobol", "rise"):
            target_plan = TargetPlan(
                classifier=model.classifier,
                view=view,
                target=target,
                original_score=0.0,
                passes=0,
                deadline=plan.deadline,
            )
            method = spec.sobol if explainer == "sobol" else spec.rise
            found = await view_attribution(
                self._inference,
                target_plan,
                view,
                method,
                PerturbationSpec(),
                spec.seed,
                self._settings,
                progress,
            )
            return found.view_map, found.warnings
        if explainer == "random":
            identity = f"{model.classifier.model.name}:{model.classifier.model.version}"
            rng = np.random.default_rng([spec.seed, n, zlib.crc32(identity.encode())])
            return rng.random(view.shape[:2]), ()
        if where not in gradients:
            gradients[where] = await self._gradient(model.classifier, view, target, plan.deadline)
            progress(1)
        gradient, model_input = gradients[where]
        if explainer == "saliency":
            return np.abs(gradient).max(axis=-1), ()
        return (gradient * model_input).sum(axis=-1), ()

    async def _gradient(
        self,
        classifier: PlannedClassifier,
        view: np.ndarray,
        target: Target,
        deadline: float | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """d logit(target) / d input and the input, both [h, w, 3] (channels last): the
        input as the model takes it (pixel values for a UINT8 model, normalised values
        for a float one)."""
        layout = classifier.layout
        batch = await in_thread(normalise, view[None], layout, classifier.preprocessing)
        inputs = {
            layout.name: batch,
            GRADIENT_INPUT: np.full((1, 1), target.class_index, dtype=np.int32),
        }
        answer = await self._inference.infer(
            classifier.model, inputs, [classifier.output, GRADIENT_OUTPUT], deadline
        )
        gradient = np.asarray(answer[GRADIENT_OUTPUT], dtype=np.float64).reshape(batch.shape)
        if not np.isfinite(gradient).all():
            raise BackendError(f"model {classifier.model.name!r} returned non-finite gradients")
        model_input = batch.astype(np.float64)
        if layout.channels_first:
            gradient, model_input = (
                gradient.transpose(0, 2, 3, 1),
                model_input.transpose(0, 2, 3, 1),
            )
        return gradient[0], model_input[0]


def _explainer_passes(plan: ConsistencyPlan, explainer: str) -> int:
    maps = len(plan.models) * len(plan.spec.images)
    if explainer == "sobol":
        return maps * plan.spec.sobol.forward_passes
    if explainer == "rise":
        return maps * plan.spec.rise.forward_passes
    if explainer == "saliency" or (
        explainer == "gradient_x_input" and "saliency" not in plan.explainers
    ):
        return maps
    return 0


def _model_outcome(model: ModelPlan, labels: tuple[int, ...] | None) -> ModelOutcome:
    name, version = model.classifier.model.name, model.classifier.model.version
    accuracy = None
    if labels is not None:
        accuracy = float(np.mean(np.asarray(model.predicted) == np.asarray(labels)))
    return ModelOutcome(name, version, model.predicted, accuracy)


def _score(
    plan: ConsistencyPlan,
    explainer: str,
    maps: np.ndarray,
    map_warnings: tuple[str, ...],
    seconds: float,
) -> ExplainerConsistency:
    """MeGe, ReCo and the pair counts of one explainer's maps, with what the numbers
    cannot say in the warnings."""
    predictions = np.array([m.predicted for m in plan.models])
    labels = None if plan.spec.labels is None else np.asarray(plan.spec.labels)
    pairs = scoring.pair_distances(maps, predictions, labels)
    warnings = list(map_warnings)
    mege = scoring.mege(pairs.agreeing)
    reco = scoring.reco(pairs.agreeing, pairs.disagreeing)
    if mege is None:
        warnings.append(
            "MeGe is undefined: no pair of models agreed on any image"
            + (" (both right)" if labels is not None else "")
        )
    if reco is None:
        if len(pairs.disagreeing) == 0:
            warnings.append(
                "ReCo is undefined: no pair of models disagreed on any image, so no threshold "
                "can tell agreeing from disagreeing pairs; add images the models disagree on"
            )
        else:
            warnings.append("ReCo is undefined: no agreeing pair to compare with")
    if pairs.both_wrong:
        warnings.append(f"{pairs.both_wrong} pairs left out: both models wrong (Xplique's rule)")
    if pairs.undefined:
        warnings.append(
            f"{pairs.undefined} pairs left out: a constant map, whose Spearman correlation is "
            "undefined"
        )
    return ExplainerConsistency(
        explainer=explainer,
        mege=mege,
        reco=reco,
        mean_distance_agreeing=float(np.mean(pairs.agreeing)) if len(pairs.agreeing) else None,
        mean_distance_disagreeing=(
            float(np.mean(pairs.disagreeing)) if len(pairs.disagreeing) else None
        ),
        agreeing_pairs=len(pairs.agreeing),
        disagreeing_pairs=len(pairs.disagreeing),
        both_wrong_pairs=pairs.both_wrong,
        undefined_pairs=pairs.undefined,
        seconds=seconds,
        warnings=tuple(warnings),
    )


def _check_same_classes(classifiers: list[PlannedClassifier], warnings: list[str]) -> None:
    """Models agree or disagree by class index, which means nothing across different class
    lists: a different class count is refused, different labels are warned about."""
    counts = {c.model.name: c.classes for c in classifiers if c.classes}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name!r} {count}" for name, count in counts.items())
        raise InvalidArgument(
            f"the models output different numbers of classes ({listed}); MeGe and ReCo "
            "compare predictions by class index, so compare models of one task",
            field="models",
        )
    labels = {c.class_labels for c in classifiers if c.class_labels}
    if len(labels) > 1:
        warnings.append(
            "the models name their classes differently ("
            + "; ".join(", ".join(found) for found in sorted(labels))
            + "): predictions are compared by class index"
        )
