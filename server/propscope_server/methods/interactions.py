"""Sobol indices over composed semantic edits (Interactions): which properties a
classifier uses together (docs/interactions.md).

The factors are the P properties' strengths. Each design row's image is the request's
image edited by every property in turn, in the request's order, at the row's
strengths; each edit honours its property's region (outside it the edit's input is
kept). Rows share prefixes of strengths, so the composition runs stage by stage
(scoring/interactions.py's edit_schedule): editor k is called once per distinct
prefix (s_1..s_{k-1}) with every distinct s_k under it. A strength of exactly 0 is the
identity. Every composed image, intermediate ones included, is a cached artefact keyed
by the image and every edit so far, so a second classifier (or a request sharing the
first properties) costs classifications only. Identical rows (with two properties the
pair's rows are B's) are composed and classified once."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np

from propscope_server import metrics
from propscope_server.cache import ArtefactCache, artefact_key
from propscope_server.config import Settings
from propscope_server.errors import FailedPrecondition
from propscope_server.inference import Inference
from propscope_server.interactions_domain import (
    InteractionsAccepted,
    InteractionsOutcome,
    InteractionsProgress,
    InteractionsSpec,
)
from propscope_server.methods.attribution import TargetPlan, plan_target
from propscope_server.orchestration.classifier import outputs, target_scores
from propscope_server.orchestration.explain import (
    PlannedEditor,
    cache_namespace,
    image_digest,
    plan_editor,
    uses_automatic_region,
)
from propscope_server.orchestration.runner import Finished, with_progress
from propscope_server.regions import composite, object_mask_reliability
from propscope_server.scoring.interactions import (
    Design,
    EditStage,
    edit_schedule,
    estimate_indices,
    interaction_design,
)
from propscope_server.threads import in_thread

METHOD = "interactions"
# Cache calls of one request in flight at once: a design's lookups all at once opened as
# many Redis connections at once, which timed out on a small machine (and a timeout turns
# the cache off for a while).
CACHE_CONCURRENCY = 8
Prefix = tuple[float, ...]


def effective(prefix: Prefix) -> Prefix:
    """The prefix whose image this one's is: trailing strengths of 0 edit nothing."""
    end = len(prefix)
    while end and prefix[end - 1] == 0.0:
        end -= 1
    return prefix[:end]


@dataclass(frozen=True)
class InteractionsPlan:
    spec: InteractionsSpec
    target: TargetPlan
    editors: tuple[PlannedEditor, ...]  # composition order; empty with provided_design
    design: Design
    rows: np.ndarray  # float32 [U, P]: the distinct design rows, composed and classified
    row_of: np.ndarray  # [R]: each design row's index into `rows`
    stages: tuple[EditStage, ...]
    edits: int  # edited images composing every row takes, without the cache
    namespace: str
    image_digest: str
    warnings: tuple[str, ...]  # about the edits (Accepted adds the classifier's)

    @property
    def images(self) -> int:
        return len(self.rows)

    @property
    def forward_passes(self) -> int:
        return self.images + self.target.passes


class Interactions:
    """The Interactions RPC's method."""

    def __init__(self, inference: Inference, cache: ArtefactCache, settings: Settings) -> None:
        self._inference = inference
        self._cache = cache
        self._settings = settings

    async def plan(self, spec: InteractionsSpec, deadline: float | None) -> InteractionsPlan:
        target = await plan_target(
            self._inference,
            spec.classifier,
            spec.image,
            spec.target_score,
            METHOD,
            self._settings,
            deadline,
        )
        editors: tuple[PlannedEditor, ...] = ()
        if spec.provided_design is None:
            editors = tuple(
                [
                    await plan_editor(self._inference, prop, f"properties[{i}].editor", deadline)
                    for i, prop in enumerate(spec.properties)
                ]
            )
            used = {(e.description.name, e.description.version): e.description for e in editors}
            await asyncio.gather(
                *(self._inference.require_ready(model, deadline) for model in used.values())
            )
        design = await in_thread(
            interaction_design, len(spec.properties), spec.design_size, spec.seed, spec.pair
        )
        if spec.provided_design is None:
            rows, row_of = np.unique(design.rows, axis=0, return_inverse=True)
            stages = tuple(await in_thread(edit_schedule, rows))
        else:  # the caller's images: each row its own
            rows, row_of, stages = design.rows, np.arange(len(design.rows)), ()
        warnings: tuple[str, ...] = ()
        if any(uses_automatic_region(editor) for editor in editors):
            warning = await in_thread(object_mask_reliability, spec.image)
            warnings = (warning,) if warning else ()
        return InteractionsPlan(
            spec=spec,
            target=target,
            editors=editors,
            design=design,
            rows=rows,
            row_of=np.asarray(row_of).reshape(-1),
            stages=stages,
            edits=sum(stage.edits for stage in stages),
            namespace=cache_namespace(self._settings, spec.tenant),
            image_digest=image_digest(spec.image),
            warnings=warnings,
        )

    async def run(self, plan: InteractionsPlan) -> AsyncIterator[object]:
        spec, target = plan.spec, plan.target
        metrics.EDITS_PER_REQUEST.observe(plan.edits)
        yield InteractionsAccepted(
            model_version=target.classifier.model.version,
            composition_order=spec.names,
            design_size=spec.design_size,
            bootstrap=spec.bootstrap,
            confidence=spec.confidence,
            target_score=target.target.score,
            planned_images=plan.images,
            planned_edits=plan.edits,
            planned_forward_passes=plan.forward_passes,
            warnings=(*target.classifier.warnings, *plan.warnings),
        )

        async def work(emit: Callable[[object], None]) -> InteractionsOutcome:
            if spec.provided_design is None:
                composer = Composer(self._inference, self._cache, self._settings, plan, emit)
                images, hits, edits = await composer.compose()
            else:
                images, hits, edits = np.stack(spec.provided_design), 0, 0
            scores = await self._classify(plan, images, emit)
            estimate = await in_thread(
                estimate_indices,
                plan.design,
                scores[plan.row_of],
                spec.bootstrap,
                spec.confidence,
                spec.seed,
                spec.names,
                self._settings.limits.max_interaction_design_size,
            )
            pair = plan.design.pair
            return InteractionsOutcome(
                estimate=estimate,
                composition_order=spec.names,
                pair_names=(spec.names[pair[0]], spec.names[pair[1]]) if pair else None,
                target_class=target.target.class_index,
                target_label=target.classifier.label(target.target.class_index),
                target_score=target.target.score,
                cache_hits=hits,
                cache_misses=plan.images - hits if spec.provided_design is None else 0,
                edits=edits,
                forward_passes=plan.forward_passes,
                warnings=plan.warnings,
            )

        async with aclosing(with_progress(work)) as events:
            async for event in events:
                yield event.value if isinstance(event, Finished) else event

    async def _classify(
        self, plan: InteractionsPlan, images: np.ndarray, emit: Callable[[object], None]
    ) -> np.ndarray:
        """The target score of every image, in batches of the model's max_batch_size, a
        few in flight at once; scores land in fixed slots (deterministic whatever order
        Triton answers in)."""
        classifier, target = plan.target.classifier, plan.target.target
        batch = classifier.model.max_batch_size
        scores = np.empty(len(images), np.float64)
        limit = asyncio.Semaphore(self._settings.attribution_concurrency)
        done = 0

        async def one_batch(start: int) -> None:
            nonlocal done
            stop = min(start + batch, len(images))
            async with limit:
                raw = await outputs(
                    self._inference, classifier, images[start:stop], plan.target.deadline
                )
            scores[start:stop] = target_scores(classifier, raw, target)
            done += stop - start
            emit(InteractionsProgress("classify", done, len(images)))

        try:
            async with asyncio.TaskGroup() as group:
                for start in range(0, len(images), batch):
                    group.create_task(one_batch(start))
        except ExceptionGroup as failed:
            # The first batch's error, as one call would raise it (the API maps it).
            raise failed.exceptions[0] from None
        metrics.FORWARD_PASSES.labels(method=METHOD).inc(len(images))
        return scores


class Composer:
    """One request's composition: the cache is asked for every final image, then for
    the prefixes the missing ones need (back to the request's image); the stages edit
    only what is still missing, store each composed image, and drop intermediates once
    no later stage reads them."""

    def __init__(
        self,
        inference: Inference,
        cache: ArtefactCache,
        settings: Settings,
        plan: InteractionsPlan,
        emit: Callable[[object], None],
    ) -> None:
        self._inference = inference
        self._cache = cache
        self._settings = settings
        self._plan = plan
        self._emit = emit
        spec = plan.spec
        self._image = spec.image
        self._seed = spec.seed % 2**63
        self._edit_parts = [
            (
                editor.description.name,
                editor.description.version,
                editor.parameters,
                _region_digest(prop.region),
            )
            for editor, prop in zip(plan.editors, spec.properties, strict=True)
        ]
        self._known: dict[Prefix, np.ndarray] = {(): spec.image}
        self._cache_calls = asyncio.Semaphore(CACHE_CONCURRENCY)

    def key(self, prefix: Prefix) -> str:
        parts: list[str | bytes] = [self._plan.image_digest]
        for (name, version, parameters, region), strength in zip(
            self._edit_parts, prefix, strict=False
        ):
            parts += [
                name,
                version,
                parameters,
                region,
                np.float32(strength).tobytes(),
                str(self._seed),
            ]
        return artefact_key("composed", self._plan.namespace, parts)

    async def _get(self, prefix: Prefix) -> np.ndarray | None:
        async with self._cache_calls:
            return await self._cache.get(self.key(prefix))

    async def _put(self, prefix: Prefix, image: np.ndarray) -> None:
        async with self._cache_calls:
            await self._cache.put(self.key(prefix), image)

    async def _lookup(self, prefixes: set[Prefix]) -> set[Prefix]:
        """Looks `prefixes` up in the cache; the ones it lacks."""
        ordered = sorted(prefixes)
        found = await asyncio.gather(*(self._get(p) for p in ordered))
        missing = set()
        for prefix, value in zip(ordered, found, strict=True):
            hit = value is not None and value.shape == self._image.shape
            metrics.CACHE_LOOKUPS.labels(result="hit" if hit else "miss").inc()
            if hit:
                self._known[prefix] = value
            else:
                missing.add(prefix)
        return missing

    async def compose(self) -> tuple[np.ndarray, int, int]:
        """(every distinct row's image [U, H, W, 3], final images the cache held, edited
        images made)."""
        finals = [effective(tuple(float(s) for s in row)) for row in self._plan.rows]
        missing = await self._lookup(set(finals) - {()})
        hits = sum(1 for final in finals if final not in missing)
        required: set[Prefix] = set()
        pending = missing
        while pending:
            required |= pending
            parents = {effective(p[:-1]) for p in pending} - {()}
            pending = await self._lookup(parents - required - self._known.keys())
        edits = await self._edit(required, set(finals))
        images = np.stack([self._known[final] for final in finals])
        return images, hits, edits

    def _todo(self, required: set[Prefix]) -> list[list[tuple[Prefix, list[float]]]]:
        """Per stage, the calls that make required images: (input prefix, strengths)."""
        stages = []
        for stage in self._plan.stages:
            calls = []
            for call in stage.calls:
                strengths = [s for s in call.strengths if (*call.prefix, s) in required]
                if strengths:
                    calls.append((call.prefix, strengths))
            stages.append(calls)
        return stages

    async def _edit(self, required: set[Prefix], finals: set[Prefix]) -> int:
        todo = self._todo(required)
        total = sum(len(strengths) for calls in todo for _, strengths in calls)
        last_read = {effective(prefix): k for k, calls in enumerate(todo) for prefix, _ in calls}
        limit = asyncio.Semaphore(self._settings.interaction_concurrency)
        done = 0
        for k, calls in enumerate(todo):
            if not calls:
                continue
            changed = False
            made: list[Prefix] = []

            async def one_call(
                prefix: Prefix, strengths: list[float], k: int = k, made: list[Prefix] = made
            ) -> None:
                nonlocal done, changed
                source = self._known[effective(prefix)]
                async with limit:
                    images = await self._edit_call(k, source, strengths)
                changed |= not bool((images == source).all())
                for strength, image in zip(strengths, images, strict=True):
                    self._known[(*prefix, strength)] = image
                    made.append((*prefix, strength))
                done += len(strengths)
                self._emit(InteractionsProgress("edit", done, total))

            try:
                async with asyncio.TaskGroup() as group:
                    for prefix, strengths in calls:
                        group.create_task(one_call(prefix, strengths))
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
            if not changed:
                name = self._plan.spec.properties[k].name
                raise FailedPrecondition(
                    f"property {name!r}: the edit left every image equal to its input (e.g. a "
                    "hue edit on a grey image, or a region outside what the edit changes), so "
                    "its strength cannot move the prediction; choose an edit that changes this "
                    "image",
                    field=f"properties[{k}]",
                )
            # Cached only once the stage is known to change something: a refused edit's
            # images, cached, would let the same request pass unchecked the next time.
            await asyncio.gather(*(self._put(prefix, self._known[prefix]) for prefix in made))
            for prefix, last in last_read.items():
                if last == k and prefix and prefix not in finals:
                    self._known.pop(prefix, None)
        return total

    async def _edit_call(self, k: int, source: np.ndarray, strengths: list[float]) -> np.ndarray:
        """Editor k on `source` at `strengths` -> [n, H, W, 3], confined to its region."""
        editor = self._plan.editors[k]
        path = await self._inference.edit(
            editor.description,
            source,
            np.asarray(strengths, dtype=np.float32),
            editor.parameters,
            [self._seed],
            self._plan.target.deadline,
        )
        images = path[0]
        region = self._plan.spec.properties[k].region
        if region is not None:
            images = await in_thread(composite, images, source, region)
        return images


def _region_digest(region: np.ndarray | None) -> str:
    if region is None:
        return ""
    return hashlib.sha256(np.ascontiguousarray(region, dtype=np.float32).tobytes()).hexdigest()
