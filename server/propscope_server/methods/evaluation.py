"""Fidelity metrics of an attribution map (EvaluateAttribution): Deletion and
Insertion (Petsiuk et al.), MuFidelity and average stability (Bhatt et al. 2020), with
Xplique's definitions (scoring/fidelity.py).

A given map is brought onto the model's view with the image's own geometry, and
every metric perturbs the view, so a map computed elsewhere (Captum on the original
image) and one computed here are judged on the same pixels the model sees."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass

import numpy as np

from propscope_server import metrics
from propscope_server.backends.preprocessing import map_to_view
from propscope_server.config import Settings
from propscope_server.domain import (
    DeletionSpec,
    EvaluateSpec,
    EvaluationAccepted,
    EvaSpec,
    MetricOutcome,
    MuFidelitySpec,
    PassesProgress,
    StabilitySpec,
    method_name,
)
from propscope_server.inference import Inference
from propscope_server.methods.attribution import (
    TargetPlan,
    baseline_image,
    perturbation_batch,
    plan_eva_target,
    plan_target,
    view_attribution,
)
from propscope_server.orchestration.classifier import outputs_of_pixels, target_scores
from propscope_server.orchestration.runner import Finished, with_progress
from propscope_server.scoring import fidelity
from propscope_server.threads import in_thread


def constant_explanation(view_map: np.ndarray) -> tuple[str, ...]:
    """A constant map orders pixels by position only: say so beside the value."""
    if np.ptp(view_map) > 0:
        return ()
    return ("the map is constant: the order in which it removes pixels is arbitrary (by position)",)


# Per metric: what is set to the baseline, the inputs scored, how their drops are
# averaged (fidelity.typical_drop), and what a baseline that adds evidence does to it.
EVIDENCE_EFFECTS = {
    "mu_fidelity": (
        "the subsets",
        "subsets",
        "median",
        "MuFidelity rewards maps that give the baselined regions negative attribution and a "
        "map of non-negative importance (Sobol, RISE) scores low or negative however faithful "
        "it is",
    ),
    "deletion": (
        "the map's pixels",
        "steps of the curve",
        "mean",
        "the curve rises where Deletion assumes it falls and the area is not low even for a "
        "faithful map",
    ),
    "insertion": (
        "the pixels not yet inserted",
        "steps of the curve",
        "mean",
        "the curve climbs above the image's own score and the area is high even for a random map",
    ),
}


def baseline_evidence(
    target: TargetPlan, metric: str, baseline: str, score_drops: np.ndarray
) -> tuple[str, ...]:
    """The warning, when the baseline raised the target score (fidelity.baseline_raises_score
    with the metric's average); else none."""
    regions, inputs, average, effect = EVIDENCE_EFFECTS[metric]
    if not fidelity.baseline_raises_score(score_drops, average):
        return ()
    index = target.target.class_index
    label = target.classifier.label(index)
    named = f"class {index} ({label})" if label else f"class {index}"
    raised = int(np.sum(score_drops < 0))
    return (
        f"setting {regions} to the baseline ({baseline}) raised the target "
        f"{target.target.score} on {raised} of the {len(score_drops)} {inputs} ({average} drop "
        f"{fidelity.typical_drop(score_drops, average):.3g}): the baseline itself reads as "
        f"evidence for {named}, so {effect}; a baseline that removes evidence (e.g. "
        "mean_colour or blur) tests the map",
    )


def metric_passes(options: DeletionSpec | MuFidelitySpec | StabilitySpec) -> int:
    """Forward passes one metric runs."""
    if isinstance(options, DeletionSpec):
        return options.steps + 1
    if isinstance(options, MuFidelitySpec):
        return options.nb_samples
    return (options.nb_samples + 1) * options.method.forward_passes


@dataclass(frozen=True)
class EvaluationPlan:
    spec: EvaluateSpec
    target: TargetPlan
    view_map: np.ndarray | None  # the given map over the view [h, w]
    passes: int


class Evaluation:
    """The EvaluateAttribution RPC's method: one MetricOutcome per requested metric."""

    def __init__(self, inference: Inference, settings: Settings) -> None:
        self._inference = inference
        self._settings = settings

    async def plan(self, spec: EvaluateSpec, deadline: float | None) -> EvaluationPlan:
        grids = []
        for name, options in spec.metrics:
            if isinstance(options, StabilitySpec):
                method = method_name(options.method)
                grids.append((options.method.grid, f"stability.{method}.grid_size"))
            if isinstance(options, MuFidelitySpec):
                grids.append((options.grid, f"{name}.grid_size"))
        target = await plan_target(
            self._inference,
            spec.classifier,
            spec.image,
            spec.target_score,
            spec.metrics[0][0],
            self._settings,
            deadline,
            grids=tuple(grids),
        )
        for _, options in spec.metrics:
            if isinstance(options, StabilitySpec) and isinstance(options.method, EvaSpec):
                target = await plan_eva_target(
                    self._inference, target, options.method, "stability."
                )
        view_map = None
        if spec.explanation is not None:
            height, width = target.view.shape[:2]
            view_map = await in_thread(
                map_to_view,
                spec.explanation,
                height,
                width,
                target.classifier.preprocessing.resize or "squash",
            )
        return EvaluationPlan(
            spec=spec,
            target=target,
            view_map=view_map,
            passes=sum(metric_passes(options) for _, options in spec.metrics),
        )

    async def run(self, plan: EvaluationPlan) -> AsyncIterator[object]:
        spec = plan.spec
        yield EvaluationAccepted(
            metrics=tuple(name for name, _ in spec.metrics),
            classifier=plan.target.planned(),
            planned_forward_passes=plan.passes,
        )
        done = 0
        for name, options in spec.metrics:
            started = time.perf_counter()

            async def work(
                emit: Callable[[object], None], name: str = name, options: object = options
            ) -> MetricOutcome:
                def count(passes: int) -> None:
                    nonlocal done
                    done += passes
                    emit(PassesProgress(done, plan.passes))

                return await self._metric(plan, name, options, count)

            async with aclosing(with_progress(work)) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        outcome = event.value
                    else:
                        yield event
            metrics.FORWARD_PASSES.labels(method=name).inc(outcome.forward_passes)
            metrics.METHOD_SECONDS.labels(method=name).observe(time.perf_counter() - started)
            yield outcome

    async def _metric(
        self,
        plan: EvaluationPlan,
        name: str,
        options: DeletionSpec | MuFidelitySpec | StabilitySpec,
        count: Callable[[int], None],
    ) -> MetricOutcome:
        target = plan.target
        view = target.view
        score_word = target.target.score
        if isinstance(options, StabilitySpec):
            return await self._stability(plan, options, count)
        assert plan.view_map is not None
        baseline = baseline_image(view, options.baseline, 0.0, target.classifier)
        height, width = view.shape[:2]
        if isinstance(options, DeletionSpec):
            insertion = name == "insertion"
            fractions = fidelity.perturbed_counts(
                height * width, options.steps, options.max_percentage
            ) / (height * width)

            def curve_images(start: int, stop: int) -> np.ndarray:
                return fidelity.deletion_images(
                    view,
                    plan.view_map,
                    options.steps,
                    options.max_percentage,
                    baseline,
                    insertion,
                    slice(start, stop),
                )[1]

            scores = await self._batched_scores(target, options.steps + 1, curve_images, count)
            warnings = constant_explanation(plan.view_map)
            if np.ptp(scores) == 0:
                warnings += (f"the target {score_word} did not move along the curve",)
            drops = fidelity.curve_score_drops(target.original_score, fractions, scores, insertion)
            warnings += baseline_evidence(target, name, options.baseline, drops)
            return MetricOutcome(
                metric=name,
                value=float(fidelity.curve_area(fractions, scores)),
                settings=(
                    f"steps {options.steps}, max fraction {options.max_percentage:g}, "
                    f"baseline {options.baseline}, target {score_word}"
                ),
                target_score=score_word,
                forward_passes=len(scores),
                fractions=tuple(float(f) for f in fractions),
                scores=tuple(float(s) for s in scores),
                warnings=warnings,
            )
        rng = np.random.default_rng([plan.spec.seed, 1])
        subsets = fidelity.mufidelity_subsets(
            options.grid, options.subset_percent, options.nb_samples, rng
        )
        sums: list[np.ndarray] = []

        def subset_images(start: int, stop: int) -> np.ndarray:
            """The views with each subset at the baseline; their attribution sums, kept
            in order, come from the same masks."""
            masks = fidelity.subset_pixel_masks(subsets[start:stop], height, width)
            sums.append(fidelity.subset_attribution_sums(plan.view_map, masks))
            return np.where(masks[..., None], baseline[None], view[None]).astype(np.float32)

        perturbed = await self._batched_scores(target, len(subsets), subset_images, count)
        score_drops, attribution_sums = target.original_score - perturbed, np.concatenate(sums)
        warnings = constant_explanation(plan.view_map)
        if np.ptp(score_drops) == 0 or np.ptp(attribution_sums) == 0:
            varied = "score drops" if np.ptp(score_drops) == 0 else "attribution sums"
            warnings += (
                f"the {varied} are the same for every subset: the correlation is undefined and "
                "reported as 0, as Xplique does, not measured",
            )
        warnings += baseline_evidence(target, name, options.baseline, score_drops)
        return MetricOutcome(
            metric=name,
            value=float(fidelity.mu_fidelity(target.original_score, perturbed, attribution_sums)),
            settings=(
                f"grid {options.grid}, subset {options.subset_percent:g}, samples "
                f"{options.nb_samples}, baseline {options.baseline}, target {score_word}"
            ),
            target_score=score_word,
            forward_passes=len(subsets),
            attribution_sums=tuple(float(a) for a in attribution_sums),
            score_drops=tuple(float(d) for d in score_drops),
            warnings=warnings,
        )

    async def _batched_scores(
        self,
        target: TargetPlan,
        total: int,
        make_images: Callable[[int, int], np.ndarray],
        count: Callable[[int], None],
    ) -> np.ndarray:
        """The target scores of `total` perturbed views, made `make_images(start, stop)`
        one bounded batch at a time (in a thread) and classified in order."""
        batch = perturbation_batch(target.classifier, target.view)
        parts = []
        for start in range(0, total, batch):
            images = await in_thread(make_images, start, min(start + batch, total))
            parts.append(await self._scores(target, images))
            count(len(images))
        return np.concatenate(parts)

    async def _stability(
        self, plan: EvaluationPlan, options: StabilitySpec, count: Callable[[int], None]
    ) -> MetricOutcome:
        target = plan.target
        maps, warnings = [], set()
        for sample in range(options.nb_samples + 1):
            view = target.view
            if sample:  # one noisy view at a time: a large view's copies need not all fit
                rng = np.random.default_rng([plan.spec.seed, 2, sample])
                view = (
                    await in_thread(fidelity.stability_noise, target.view, options.radius, 1, rng)
                )[0]
            found = await view_attribution(
                self._inference,
                target,
                view.astype(np.float32),
                options.method,
                options.perturbation,
                plan.spec.seed,
                self._settings,
                count,
            )
            maps.append(found.view_map)
            warnings.update(found.warnings)  # a flat or constant map reads as "perfectly stable"
        value, distances = fidelity.average_stability(maps[0], np.stack(maps[1:]))
        method = method_name(options.method)
        return MetricOutcome(
            metric="stability",
            value=float(value),
            settings=(
                f"radius {options.radius:g}, samples {options.nb_samples}, method {method}, "
                f"target {target.target.score}"
            ),
            target_score=target.target.score,
            forward_passes=(options.nb_samples + 1) * options.method.forward_passes,
            distances=tuple(float(d) for d in distances),
            warnings=tuple(sorted(warnings)),
        )

    async def _scores(self, target: TargetPlan, images: np.ndarray) -> np.ndarray:
        raw = await outputs_of_pixels(self._inference, target.classifier, images, target.deadline)
        return target_scores(target.classifier, raw, target.target)
