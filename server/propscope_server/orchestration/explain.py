"""Runs one explanation: for each property, get its paths (cache or editor),
classify them in one batched call, score them, and report as each finishes.
Edit progress is reported as the cache answers and as the editor works.

Everything that can be refused is checked in `plan()` before any work, so a
bad request fails with one clear error and never half-streams.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from propscope_server import metrics
from propscope_server.cache import ArtefactCache, path_key
from propscope_server.config import Settings
from propscope_server.domain import (
    Accepted,
    Done,
    Event,
    ExplainSpec,
    Progress,
    PropertyOutcome,
    PropertySpec,
    SampleOutcome,
    StageTimes,
)
from propscope_server.editor_contract import (
    InvalidParameters,
    ReportProgress,
    canonical_parameters,
)
from propscope_server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PropscopeError,
    Unavailable,
)
from propscope_server.inference import Inference, ModelDescription
from propscope_server.orchestration.classifier import (
    PlannedClassifier,
    outputs,
    plan_classifier,
)
from propscope_server.orchestration.classifier import probabilities as classifier_probabilities
from propscope_server.regions import composite, object_mask_reliability, unchanged
from propscope_server.scoring.property_gradient import Decision, score_property
from propscope_server.threads import in_thread

logger = logging.getLogger(__name__)

# Triton unreachable, or the caller's deadline passed.
CALL_ERRORS = (Unavailable, DeadlineExceeded)
# The cache namespace of every tenant when PROPSCOPE_CACHE_SHARED_NAMESPACE is set; a
# tenant's own is "tenant.<name>", so no tenant name can reach it.
SHARED_NAMESPACE = "shared"
# Spreads sample indices over the seed space so sample seeds never collide.
SAMPLE_SEED_STRIDE = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class PlannedEditor:
    description: ModelDescription
    parameters: str  # canonical JSON, resolved against the editor's schema


async def plan_editor(
    inference: Inference, prop: PropertySpec, field: str, deadline: float | None
) -> PlannedEditor:
    """Describes the editor of `prop` and resolves its parameters against its schema
    (Explain's properties, BuildGraph's repair property); refusals name `field` (the
    request's path to the editor) and the part of it to change."""
    assert prop.editor is not None
    try:
        editor = await inference.describe(prop.editor.model, prop.editor.version, deadline)
    except NotFound as error:
        raise NotFound(
            f"property {prop.name!r} ({field}.model): {error}", field=f"{field}.model"
        ) from None
    if editor.role != "editor" or editor.editor_schema is None:
        raise InvalidArgument(
            f"property {prop.name!r}: model {editor.name!r} is not an editor "
            "(ListModels shows the editors)",
            field=f"{field}.model",
        )
    try:
        resolved = editor.editor_schema.resolve(prop.editor.parameters)
    except InvalidParameters as error:
        parameter = f"{field}.parameters[{error.parameter!r}]" if error.parameter else None
        raise InvalidArgument(
            f"property {prop.name!r}, editor {editor.name!r}: {error}",
            field=parameter or f"{field}.parameters",
        ) from None
    return PlannedEditor(editor, canonical_parameters(resolved))


@dataclass(frozen=True)
class Plan:
    spec: ExplainSpec
    classifier: PlannedClassifier
    editors: dict[str, PlannedEditor]  # by property name
    image_digest: str
    cache_namespace: str
    deadline: float | None  # time.monotonic() value: bounds every backend call


@dataclass
class EditProgress:
    """A property's Progress("edit") events: images done of the images it has to edit,
    counted over all its path lengths (an adaptive property's total grows). Sent only
    when the count grows, so a chatty editor costs the stream nothing."""

    emit: Callable[[Event], None]
    property_name: str
    done_before: int  # the images of the property's shorter paths, all done
    images: int  # the images of the path length now edited (samples x steps)
    sent: int = -1

    def report(self, done: int) -> None:
        if done > self.sent:
            self.sent = done
            total = self.done_before + self.images
            self.emit(Progress("edit", self.property_name, self.done_before + done, total))

    def editor_reports(self, cached: int, edited: int) -> ReportProgress:
        """What the editor's (units done, units in all) mean in images: `cached` images
        are done, and that share of the `edited` ones. The units are clamped into
        [0, total - 1]: the last unit is the editor's answer, so a report that claims
        more (or less than nothing) cannot take the final event's count."""

        def report(units: int, total: int) -> None:
            total = max(total, 1)
            self.report(cached + edited * min(max(units, 0), total - 1) // total)

        return report


def sample_seed(seed: int, sample: int) -> int:
    return (seed + sample * SAMPLE_SEED_STRIDE) % 2**63


def cache_namespace(settings: Settings, tenant: str) -> str:
    return SHARED_NAMESPACE if settings.cache_shared_namespace else f"tenant.{tenant}"


def image_digest(image: np.ndarray) -> str:
    hasher = hashlib.sha256(str(image.shape).encode())
    hasher.update(np.ascontiguousarray(image).tobytes())
    return hasher.hexdigest()


class Explainer:
    """Property-gradient explanations over a Triton backend and a path cache."""

    def __init__(self, backend: Inference, cache: ArtefactCache, settings: Settings) -> None:
        self._backend = backend
        self._cache = cache
        self._settings = settings

    async def plan(self, spec: ExplainSpec, deadline: float | None = None) -> Plan:
        classifier = await plan_classifier(
            self._backend, spec.classifier, spec.image, self._settings, deadline
        )
        editors = {}
        for index, prop in enumerate(spec.properties):
            if prop.editor is not None:
                editors[prop.name] = await self._plan_editor(index, prop, deadline)
        used = {
            (e.description.name, e.description.version): e.description for e in editors.values()
        }
        await asyncio.gather(*(self._backend.require_ready(m, deadline) for m in used.values()))
        return Plan(
            spec=spec,
            classifier=classifier,
            editors=editors,
            image_digest=image_digest(spec.image),
            cache_namespace=cache_namespace(self._settings, spec.tenant),
            deadline=deadline,
        )

    async def _plan_editor(
        self, index: int, prop: PropertySpec, deadline: float | None
    ) -> PlannedEditor:
        return await plan_editor(self._backend, prop, f"properties[{index}].editor", deadline)

    async def run(self, plan: Plan) -> AsyncIterator[Event]:
        """Accepted, then Progress and one PropertyOutcome per property as each
        finishes, then Done. Closing the iterator cancels outstanding work.
        CALL_ERRORS end the whole call: they would fail every property alike."""
        spec = plan.spec
        started = time.perf_counter()
        shapes = [(p, *spec.path_shape(p)) for p in spec.properties]
        edited = sum(paths * length for p, paths, length in shapes if p.editor is not None)
        classified = sum(paths * (length + 1) for _, paths, length in shapes)
        metrics.EDITS_PER_REQUEST.observe(edited)
        yield Accepted(
            property_names=tuple(p.name for p in spec.properties),
            samples=spec.samples,
            steps=spec.steps,
            permutations=spec.permutations,
            alpha=spec.alpha,
            model_version=plan.classifier.model.version,
            planned_edits=edited,
            planned_classifications=classified,
            min_probability_change=spec.min_probability_change,
            adaptive=spec.adaptive,
            max_steps=spec.max_steps or spec.steps,
            preprocessing=plan.classifier.preprocessing,
            preprocessing_sources=plan.classifier.preprocessing_sources,
            warnings=spec.warnings + plan.classifier.warnings,
            class_labels=plan.classifier.class_labels,
        )
        queue: asyncio.Queue[Event] = asyncio.Queue()
        times = StageTimes()
        limit = asyncio.Semaphore(self._settings.property_concurrency)

        async def explain_one(prop: PropertySpec) -> None:
            try:
                async with limit:
                    outcome = await self._explain_property(plan, prop, queue.put_nowait, times)
            except Exception as error:  # a bug must fail one property, never hang the stream
                logger.exception("property %r failed", prop.name)
                outcome = PropertyOutcome(property_name=prop.name, error=error)
            queue.put_nowait(outcome)

        tasks = [asyncio.create_task(explain_one(p)) for p in spec.properties]
        failed = 0
        try:
            remaining = len(tasks)
            while remaining:
                event = await queue.get()
                if isinstance(event, PropertyOutcome):
                    if isinstance(event.error, CALL_ERRORS):
                        raise event.error
                    remaining -= 1
                    failed += event.error is not None
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        yield Done(total_s=time.perf_counter() - started, stages=times, properties_failed=failed)

    async def _explain_property(
        self,
        plan: Plan,
        prop: PropertySpec,
        emit: Callable[[Event], None],
        times: StageTimes,
    ) -> PropertyOutcome:
        """Adaptive paths: while the test cannot reach alpha for the curve's values, the
        path is edited again with twice the steps, up to max_steps."""
        spec = plan.spec
        steps = spec.path_shape(prop)[1]
        edits = 0
        try:
            warnings: tuple[str, ...] = ()
            if uses_automatic_region(plan.editors.get(prop.name)):
                warning = await in_thread(object_mask_reliability, spec.image)
                warnings = (warning,) if warning else ()
            while True:
                progress = EditProgress(emit, prop.name, edits, spec.samples * steps)
                paths, hits = await self._paths(plan, prop, steps, progress, times)
                if prop.editor is not None:
                    edits += len(paths) * steps
                stacked = np.stack(paths)  # [S, N + 1, H, W, 3]
                if prop.editor is not None and unchanged(stacked[:, 1:], spec.image):
                    raise FailedPrecondition(
                        f"property {prop.name!r}: the edit left every image of the path equal "
                        "to the original (e.g. a hue edit on a grey image, or a region outside "
                        "what the edit changes), so there is nothing to measure; choose an edit "
                        "that changes this image"
                    )
                outcome = await self._score(plan, prop, stacked, hits, emit, times)
                assert outcome.score is not None
                longer = steps * 2
                if not (
                    spec.adaptive
                    and prop.editor is not None
                    and outcome.score.decision is Decision.CANNOT_REACH_ALPHA
                    and longer <= spec.max_steps
                ):
                    break
                logger.info(
                    "property %r: the test cannot reach alpha at N = %d; extending to N = %d",
                    prop.name,
                    steps,
                    longer,
                )
                steps = longer
        except PropscopeError as error:
            return PropertyOutcome(property_name=prop.name, error=error)
        return dataclasses.replace(outcome, steps=steps, edits=edits, warnings=warnings)

    async def _score(
        self,
        plan: Plan,
        prop: PropertySpec,
        stacked: np.ndarray,
        hits: list[bool],
        emit: Callable[[Event], None],
        times: StageTimes,
    ) -> PropertyOutcome:
        with _timed(times, "classify_s"):
            raw = await outputs(
                self._backend,
                plan.classifier,
                stacked.reshape(-1, *stacked.shape[2:]),
                plan.deadline,
            )
            probabilities = classifier_probabilities(plan.classifier, raw)
        emit(Progress("classify", prop.name, len(stacked), len(stacked)))
        probabilities = probabilities.reshape(len(stacked), stacked.shape[1], -1)
        predicted = probabilities.argmax(axis=-1)
        target = plan.spec.classifier.target_class
        if target is None:
            target = int(predicted[0, 0])
        if target >= probabilities.shape[-1]:
            raise InvalidArgument(
                f"target_class {target} is out of range: the model has "
                f"{probabilities.shape[-1]} classes"
            )
        curves = probabilities[..., target]  # finite: outputs() refuses non-finite outputs
        seed = (plan.spec.seed, zlib.crc32(prop.name.encode()))
        with _timed(times, "score_s"):
            score = await in_thread(
                score_property,
                curves,
                predicted,
                plan.spec.permutations,
                plan.spec.alpha,
                seed,
                plan.spec.min_probability_change,
            )
        samples = tuple(
            SampleOutcome(
                seed=sample_seed(plan.spec.seed, s),
                score=score.sample_scores[s],
                p_value=score.sample_p_values[s],
                prediction_curve=curves[s].astype(np.float32),
                predicted_classes=predicted[s],
                cache_hit=bool(hits) and hits[s],
                path=stacked[s] if plan.spec.return_path_images else None,
            )
            for s in range(len(stacked))
        )
        return PropertyOutcome(
            property_name=prop.name,
            score=score,
            target_class=target,
            samples=samples,
            cache_hits=sum(hits),
            cache_misses=len(hits) - sum(hits),
            target_label=plan.classifier.label(target),
        )

    async def _paths(
        self,
        plan: Plan,
        prop: PropertySpec,
        steps: int,
        progress: EditProgress,
        times: StageTimes,
    ) -> tuple[list[np.ndarray], list[bool]]:
        """[x_0, x_1..x_N] per sample, and whether each came from the cache. The
        samples the cache lacks are edited in one editor call, whose own progress is
        reported as it comes. The cache holds what the editor returned; a region is
        applied after, so every region shares it."""
        original = plan.spec.image[None]
        if prop.provided_path is not None:
            return [np.concatenate([original, np.stack(prop.provided_path)])], []
        editor = plan.editors[prop.name]
        strengths = np.arange(1, steps + 1, dtype=np.float32) / steps
        seeds = [sample_seed(plan.spec.seed, s) for s in range(plan.spec.samples)]
        keys = [
            path_key(
                plan.cache_namespace,
                plan.image_digest,
                editor.description.name,
                editor.description.version,
                editor.parameters,
                strengths,
                seed,
            )
            for seed in seeds
        ]
        with _timed(times, "cache_s"):
            paths = list(await asyncio.gather(*(self._cache.get(key) for key in keys)))
        expected = (steps, *plan.spec.image.shape)
        hits = [path is not None and path.shape == expected for path in paths]
        for hit in hits:
            metrics.CACHE_LOOKUPS.labels(result="hit" if hit else "miss").inc()
        missing = [s for s, hit in enumerate(hits) if not hit]
        cached = sum(hits) * steps
        progress.report(cached)
        if missing:
            with _timed(times, "edit_s"):
                edited = await self._backend.edit(
                    editor.description,
                    plan.spec.image,
                    strengths,
                    editor.parameters,
                    [seeds[s] for s in missing],
                    plan.deadline,
                    progress=progress.editor_reports(cached, len(missing) * steps),
                )
            with _timed(times, "cache_s"):
                await asyncio.gather(
                    *(
                        self._cache.put(keys[s], path)
                        for s, path in zip(missing, edited, strict=True)
                    )
                )
            for s, path in zip(missing, edited, strict=True):
                paths[s] = path
        progress.report(plan.spec.samples * steps)
        if prop.region is not None:
            paths = [
                await in_thread(composite, path, plan.spec.image, prop.region) for path in paths
            ]
        return [np.concatenate([original, path]) for path in paths], hits


@contextmanager
def _timed(times: StageTimes, stage: str):  # noqa: ANN202 - a context manager
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        setattr(times, stage, getattr(times, stage) + elapsed)
        metrics.STAGE_SECONDS.labels(stage=stage.removesuffix("_s")).observe(elapsed)


# Procedural parameters under which the editor estimates the object itself.
AUTOMATIC_REGIONS = ("object", "background")


def uses_automatic_region(editor: PlannedEditor | None) -> bool:
    """Whether the edit relies on the editor's own object/background split."""
    return editor is not None and automatic_region(json.loads(editor.parameters))


def automatic_region(parameters: Mapping[str, object]) -> bool:
    """Whether editor parameters ask for the editor's own object/background split."""
    return parameters.get("region") in AUTOMATIC_REGIONS or parameters.get("operation") == "scale"
