"""Attribution maps: Sobol total-order indices (Fel et al. 2021) and RISE (Petsiuk et
al. 2018), black-box, on any classifier that serves forward passes; EVA (Fel et al.
2023, methods/eva.py) on an open model that propagates bounds.

Both work on the image as the model sees it (the *view*: resized by the model's
resize mode, RGB values before its normalisation), perturb it in batches of the
model's max_batch_size (a few in flight at once, so Triton works while the gateway
perturbs the next), and map the result back onto the image. Scores land in fixed
slots and are reduced in order, so a map is bit-identical whatever order Triton
answers in, and is cached like a path."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass

import numpy as np

from propscope_server import metrics
from propscope_server.backends.preprocessing import (
    image_region,
    map_to_image,
    resize,
    resize_values,
)
from propscope_server.cache import ArtefactCache, artefact_key
from propscope_server.config import Settings
from propscope_server.domain import (
    AttributeSpec,
    AttributionAccepted,
    AttributionMethod,
    AttributionOutcome,
    ClassifierPlanned,
    ClassifierRef,
    EvaSpec,
    PassesProgress,
    PerturbationSpec,
    RiseSpec,
    SobolSpec,
    ViewAttribution,
    method_name,
)
from propscope_server.errors import InvalidArgument
from propscope_server.inference import Inference
from propscope_server.methods import eva, require
from propscope_server.orchestration.classifier import (
    DETECTED_SOURCE,
    PlannedClassifier,
    Target,
    check_target_score,
    outputs_of_pixels,
    plan_classifier,
    target_scores,
)
from propscope_server.orchestration.explain import cache_namespace, image_digest
from propscope_server.orchestration.runner import Finished, with_progress
from propscope_server.scoring import perturbation, rise, sobol
from propscope_server.threads import in_thread

# Part of every map's cache key: bump it when a change to the code changes maps (a
# default, the design, an estimator), so that no cached map of the old code is served.
MAP_ALGORITHM_VERSION = 1
# Default blur of the BLUR baseline and kind: this fraction of the view's longer side.
DEFAULT_BLUR_FRACTION = 0.02


@dataclass(frozen=True)
class TargetPlan:
    """The classifier, the view of the image and the target, resolved once; shared by
    Attribute and EvaluateAttribution."""

    classifier: PlannedClassifier
    view: np.ndarray  # float32 [h, w, 3], RGB values 0..255 as the model sees them
    target: Target
    original_score: float
    passes: int  # forward passes planning ran (the original, a detection)
    deadline: float | None
    # (top, left, height, width) of the view showing the image (letterbox pads the
    # rest); None: all of it
    image_region: tuple[int, int, int, int] | None = None

    def planned(self) -> ClassifierPlanned:
        return ClassifierPlanned(
            model_version=self.classifier.model.version,
            target_class=self.target.class_index,
            target_label=self.classifier.label(self.target.class_index),
            target_score=self.target.score,
            preprocessing=self.classifier.preprocessing,
            preprocessing_sources=self.classifier.preprocessing_sources,
            warnings=self.classifier.warnings,
        )


async def plan_target(
    inference: Inference,
    ref: ClassifierRef,
    image: np.ndarray,
    target_score: str,
    method: str,
    settings: Settings,
    deadline: float | None,
    grids: tuple[tuple[int, str], ...] = (),
) -> TargetPlan:
    """Resolves the classifier, checks it supports `method` and that each (grid,
    field) fits the model's input, then runs the original once: its score, and its
    predicted class when no target class is given."""
    classifier = await plan_classifier(inference, ref, image, settings, deadline)
    require(method, classifier.model)
    if target_score == "auto":
        logits = classifier.preprocessing.output_kind == "logits"
        target_score = "logit" if logits else "log_odds"
    check_target_score(classifier, target_score)
    layout = classifier.layout
    view = await in_thread(
        resize,
        image[None],
        layout.height,
        layout.width,
        classifier.preprocessing.resize or "squash",
    )
    view = view[0].astype(np.float32)
    for grid, field in grids:
        check_grid(grid, view.shape, field)
    raw = await outputs_of_pixels(inference, classifier, view[None], deadline)
    target_class = ref.target_class if ref.target_class is not None else int(raw[0].argmax())
    target = Target(target_class, target_score)
    return TargetPlan(
        classifier=classifier,
        view=view,
        target=target,
        original_score=float(target_scores(classifier, raw, target)[0]),
        passes=1 + int(DETECTED_SOURCE in classifier.preprocessing_sources),
        deadline=deadline,
        image_region=image_region(
            image.shape[:2], view.shape[:2], classifier.preprocessing.resize or "squash"
        ),
    )


def baseline_image(
    view: np.ndarray, baseline: str, sigma: float, classifier: PlannedClassifier
) -> np.ndarray:
    """The pixels a removed region becomes, [h, w, 3] float32."""
    if baseline == "black":
        return np.zeros_like(view)
    if baseline == "mean_colour":
        return np.broadcast_to(view.mean(axis=(0, 1)), view.shape).astype(np.float32)
    if baseline == "blur":
        return perturbation.gaussian_blur(view, blur_sigma(view, sigma))
    # input_zero: the pixel value the model's normalisation maps to 0 (a UINT8 model
    # normalises inside; the mean it declares is where its zero is).
    mean = classifier.preprocessing.mean
    if mean is None:
        return np.zeros_like(view)
    return np.broadcast_to(np.asarray(mean, np.float32) * 255.0, view.shape).astype(np.float32)


# Pixels of perturbed images one batch may hold: a model with a variable input size sees
# the image at its own size, and max_batch_size copies of a large image would not fit.
PERTURBATION_BATCH_PIXELS = 4 * 1024 * 1024


def perturbation_batch(classifier: PlannedClassifier, view: np.ndarray) -> int:
    """Images per batch: the model's max_batch_size, fewer when the view is large."""
    pixels = view.shape[0] * view.shape[1]
    return max(1, min(classifier.model.max_batch_size, PERTURBATION_BATCH_PIXELS // pixels))


def blur_sigma(view: np.ndarray, sigma: float) -> float:
    return sigma if sigma > 0 else DEFAULT_BLUR_FRACTION * max(view.shape[:2])


BASELINE_WORDS = {
    "input_zero": "the model's input zero",
    "black": "black (RGB 0,0,0)",
    "mean_colour": "the image's mean colour",
    "blur": "the image blurred",
}


def describe_perturbation(
    spec: PerturbationSpec, view: np.ndarray, classifier: PlannedClassifier
) -> str:
    """The perturbation in words, as the result must state it."""
    height, width = view.shape[:2]
    sigma = blur_sigma(view, spec.blur_sigma)
    if spec.kind == "blur":
        what = f"blurring (sigma {sigma:.3g} px)"
    else:
        baseline = BASELINE_WORDS[spec.baseline]
        if spec.baseline == "input_zero":
            mean = classifier.preprocessing.mean
            if mean is None:
                baseline += ": black, as the model declares no normalisation mean (propscope.mean)"
            else:
                baseline += f": the normalisation mean {tuple(round(m, 4) for m in mean)}"
        elif spec.baseline == "blur":
            baseline += f" (sigma {sigma:.3g} px)"
        what = f"{spec.kind} toward {baseline}"
    rounding = (
        "rounded to whole pixel values for its UINT8 input"
        if classifier.layout.datatype == "UINT8"
        else f"not rounded ({classifier.layout.datatype} input)"
    )
    return f"{what}, at the model's {height}x{width} input before its normalisation; {rounding}"


async def view_attribution(
    inference: Inference,
    plan: TargetPlan,
    view: np.ndarray,
    method: AttributionMethod,
    spec: PerturbationSpec,
    seed: int,
    settings: Settings,
    progress: Callable[[int], None],
) -> ViewAttribution:
    """`method`'s map of `view` (the original's view, or a noisy one for stability),
    with what an EVA map rests on."""
    if isinstance(method, EvaSpec):
        return await eva.view_eva(
            inference,
            plan.classifier,
            plan.target.class_index,
            view,
            method,
            seed,
            plan.deadline,
            perturbation_batch(plan.classifier, view) * settings.attribution_concurrency,
            settings.attribution_concurrency,
            progress,
            plan.image_region,
        )
    height, width = view.shape[:2]
    baseline = baseline_image(
        view, "blur" if spec.kind == "blur" else spec.baseline, spec.blur_sigma, plan.classifier
    )
    kind = "inpainting" if spec.kind == "blur" else spec.kind
    batch = perturbation_batch(plan.classifier, view)
    passes = method.forward_passes
    scores = np.empty(passes, dtype=np.float64)
    if isinstance(method, SobolSpec):
        channels = 3 if method.per_channel else 1
        a, b = await in_thread(design_of, method, seed)

        def masks_of(start: int, stop: int) -> np.ndarray:
            rows = sobol.design_rows(a, b, start, stop)
            return sobol.upsample_masks(rows, method.grid, height, width, channels)
    else:

        def masks_of(start: int, stop: int) -> np.ndarray:
            return rise_masks(method, seed, start, stop, height, width)

    def perturbed(start: int, stop: int) -> np.ndarray:
        return perturbation.perturb(view, masks_of(start, stop), kind, baseline)

    limit = asyncio.Semaphore(settings.attribution_concurrency)

    async def one_batch(start: int) -> None:
        stop = min(start + batch, passes)
        async with limit:
            pixels = await in_thread(perturbed, start, stop)
            raw = await outputs_of_pixels(inference, plan.classifier, pixels, plan.deadline)
        scores[start:stop] = target_scores(plan.classifier, raw, plan.target)
        progress(stop - start)

    try:
        async with asyncio.TaskGroup() as group:
            for start in range(0, passes, batch):
                group.create_task(one_batch(start))
    except ExceptionGroup as failed:
        # The first batch's error, as it would have come from one call: the API maps a
        # domain error to its status (an ExceptionGroup would read as INTERNAL).
        raise failed.exceptions[0] from None
    if isinstance(method, SobolSpec):
        indices = await in_thread(
            sobol.total_order, scores, method.nb_design, method.dimension, method.estimator
        )
        grid = indices.reshape(method.grid, method.grid, -1).astype(np.float32)
        cells = grid.sum(axis=-1)
        view_map = resize_values(cells, height, width)
        warnings = flat_scores(scores, plan) or constant_map(cells)
        return ViewAttribution((grid if method.per_channel else cells), view_map, warnings)

    def rise_map() -> np.ndarray:
        accumulator = rise.RiseAccumulator(height, width, method.preservation)
        for start in range(0, passes, batch):
            stop = min(start + batch, passes)
            accumulator.add(masks_of(start, stop), scores[start:stop])
        return accumulator.result().astype(np.float32)

    view_map = await in_thread(rise_map)
    grid = resize_values(view_map, method.grid, method.grid, "bilinear")
    return ViewAttribution(grid, view_map, flat_scores(scores, plan) or constant_map(view_map))


def constant_map(values: np.ndarray) -> tuple[str, ...]:
    """A warning when every cell has the same value: no region is told from another
    (e.g. the score moved on masks whose differences the estimator cannot see)."""
    if np.ptp(values) > 0:
        return ()
    return (
        f"the map is constant (every value {float(values.flat[0]):.6g}): it tells no region from "
        "another; try another target score (log_odds or logit), perturbation, or more designs",
    )


# Scores whose spread over the masks is below this are indistinguishable from constant
# (float32 outputs): the map then shows noise, or nothing.
FLAT_SPREAD = 1e-6


def flat_scores(scores: np.ndarray, plan: TargetPlan) -> tuple[str, ...]:
    """A warning when the target score hardly moved over the masks."""
    spread = float(scores.max() - scores.min())
    if spread > FLAT_SPREAD * max(1.0, float(np.abs(scores).max())):
        return ()
    advice = (
        "ask for target score logit or log_odds: a saturated probability hides what moves the model"
        if plan.target.score == "probability"
        else "the model ignores what the masks removed, or another perturbation is needed"
    )
    return (
        f"the target {plan.target.score} varied by only {spread:.3g} over the masks "
        f"(from {scores.min():.6g} to {scores.max():.6g}): the map carries no information; "
        + advice,
    )


def with_warnings(target: TargetPlan, warnings: tuple[str, ...]) -> TargetPlan:
    """`target` with `warnings` added to what Accepted says."""
    classifier = target.classifier
    return dataclasses.replace(
        target,
        classifier=dataclasses.replace(classifier, warnings=(*classifier.warnings, *warnings)),
    )


async def plan_eva_target(
    inference: Inference, target: TargetPlan, method: EvaSpec, prefix: str = ""
) -> TargetPlan:
    """EVA's refusals and its probe row (counted in the plan's passes); the hybrid's
    warning said in Accepted too."""
    await eva.plan_eva(
        inference,
        target.classifier,
        target.target.class_index,
        method,
        target.view,
        target.deadline,
        prefix,
    )
    target = dataclasses.replace(target, passes=target.passes + 1)
    return with_warnings(target, eva.hybrid_warning(method))


@dataclass(frozen=True)
class AttributionPlan:
    spec: AttributeSpec
    target: TargetPlan
    description: str
    cache_key: str


class Attribution:
    """The Attribute RPC's method (sobol or rise, by the spec)."""

    def __init__(self, inference: Inference, cache: ArtefactCache, settings: Settings) -> None:
        self._inference = inference
        self._cache = cache
        self._settings = settings

    async def plan(self, spec: AttributeSpec, deadline: float | None) -> AttributionPlan:
        name = method_name(spec.method)
        target = await plan_target(
            self._inference,
            spec.classifier,
            spec.image,
            # EVA bounds logit margins (the API refuses other scores; plan_eva a
            # probabilities model).
            "auto" if isinstance(spec.method, EvaSpec) else spec.target_score,
            name,
            self._settings,
            deadline,
            grids=((spec.method.grid, f"{name}.grid_size"),),
        )
        if isinstance(spec.method, EvaSpec):
            target = await plan_eva_target(self._inference, target, spec.method)
        classifier = target.classifier
        key = artefact_key(
            "attribution",
            cache_namespace(self._settings, spec.tenant),
            (
                image_digest(spec.image),
                classifier.model.name,
                classifier.model.version,
                classifier.output,
                classifier.preprocessing.model_dump_json(),
                json.dumps(
                    {
                        "algorithm": MAP_ALGORITHM_VERSION,
                        "method": name,
                        **asdict(spec.method),
                        **asdict(spec.perturbation),
                        "target": asdict(target.target),
                        "seed": spec.seed if _seeded(spec.method) else 0,
                    },
                    sort_keys=True,
                ),
            ),
        )
        warning = await in_thread(design_warning, spec.method, spec.seed)
        if warning:
            target = with_warnings(target, (warning,))
        return AttributionPlan(
            spec=spec,
            target=target,
            description=(
                eva.describe(spec.method, classifier, target.view, target.image_region)
                if isinstance(spec.method, EvaSpec)
                else describe_perturbation(spec.perturbation, target.view, classifier)
            ),
            cache_key=key,
        )

    async def run(self, plan: AttributionPlan) -> AsyncIterator[object]:
        started = time.perf_counter()
        spec, target = plan.spec, plan.target
        passes = spec.method.forward_passes
        yield AttributionAccepted(
            method=spec.method,
            perturbation=None
            if isinstance(spec.method, EvaSpec)
            else dataclasses.replace(
                spec.perturbation, blur_sigma=blur_sigma(target.view, spec.perturbation.blur_sigma)
            ),
            classifier=target.planned(),
            planned_forward_passes=passes,
            planned_forward_passes_total=passes + target.passes,
            perturbation_description=plan.description,
        )
        cached = await self._cache.get(plan.cache_key)
        metrics.CACHE_LOOKUPS.labels(result="hit" if cached is not None else "miss").inc()
        if cached is not None:
            found = _unpack(cached, spec.method, target.view.shape[:2])
            ran = 0
        else:
            done = 0

            async def work(emit: Callable[[object], None]) -> ViewAttribution:
                def progress(count: int) -> None:
                    nonlocal done
                    done += count
                    emit(PassesProgress(done, passes))

                return await view_attribution(
                    self._inference,
                    target,
                    target.view,
                    spec.method,
                    spec.perturbation,
                    spec.seed,
                    self._settings,
                    progress,
                )

            async with aclosing(with_progress(work)) as events:
                async for event in events:
                    if isinstance(event, Finished):
                        found = event.value
                    else:
                        yield event
            if not found.warnings:  # a map that carries no information is not kept
                await self._cache.put(plan.cache_key, _pack(found))
            ran = passes
        grid, view_map, warnings, eva_outcome = found.grid, found.view_map, found.warnings, None
        if isinstance(spec.method, EvaSpec) and found.eva is not None:
            eva_outcome = eva.eva_outcome(spec.method, found.eva, target.classifier)
            warnings = (*eva.hybrid_warning(spec.method), *warnings)
        metrics.FORWARD_PASSES.labels(method=method_name(spec.method)).inc(ran)
        image_map = await in_thread(
            map_to_image,
            view_map,
            spec.image.shape[0],
            spec.image.shape[1],
            target.classifier.preprocessing.resize or "squash",
        )
        yield AttributionOutcome(
            map=image_map,
            grid=grid if grid.ndim == 2 else grid.sum(axis=-1),
            channel_grid=grid if grid.ndim == 3 else None,
            forward_passes=ran,
            cache_hit=cached is not None,
            original_score=target.original_score,
            target_class=target.target.class_index,
            target_label=target.classifier.label(target.target.class_index),
            target_score=target.target.score,
            total_s=time.perf_counter() - started,
            warnings=warnings,
            eva=eva_outcome,
        )


# RISE masks are drawn in blocks of this many, each from its own seeded generator, so
# a map does not depend on the model's max_batch_size.
RISE_BLOCK = 64


def rise_masks(
    method: RiseSpec, seed: int, start: int, stop: int, height: int, width: int
) -> np.ndarray:
    """Masks start..stop-1 of the request's sequence [stop - start, h, w, 1]."""
    first, last = start // RISE_BLOCK, (stop - 1) // RISE_BLOCK
    blocks = [
        rise.rise_masks(
            min(RISE_BLOCK, method.nb_samples - block * RISE_BLOCK),
            method.grid,
            method.preservation,
            height,
            width,
            np.random.default_rng([seed, block]),
        )
        for block in range(first, last + 1)
    ]
    offset = start - first * RISE_BLOCK
    return np.concatenate(blocks)[offset : offset + stop - start]


def _seeded(method: AttributionMethod) -> bool:
    """Whether the seed changes the map: RISE's masks, a scrambled design, EVA's
    sampled points."""
    return isinstance(method, RiseSpec | EvaSpec) or method.scrambled


def design_of(method: SobolSpec, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A and B of the design: Xplique's unscrambled sequence, or Owen-scrambled."""
    scramble_seed = seed % 2**32 if method.scrambled else None
    return sobol.design_points(method.nb_design, method.dimension, scramble_seed)


# A factor whose design pairs (A_i, B_i) have a mean squared difference more than this
# factor away from the 1/6 of independent uniforms: its total-order index is scaled by
# the ratio. (A random design's ratios spread by about 1.18 / sqrt(N): 21% at N 32.)
DESIGN_BIAS_FACTOR = 2.0


def design_warning(method: AttributionMethod, seed: int) -> str:
    """Names the grid cells the design itself biases, or "": for an additive model,
    Jansen's numerator for factor i is w_i^2 * sum (a_i - b_i)^2, so the design's own
    mean (a_i - b_i)^2 against 1/6 is the factor's bias, exactly."""
    if not isinstance(method, SobolSpec):
        return ""
    a, b = design_of(method, seed)
    n, d = method.nb_design, method.dimension
    spread = ((a - b) ** 2).mean(axis=0) * 6.0
    biased = np.flatnonzero((spread < 1.0 / DESIGN_BIAS_FACTOR) | (spread > DESIGN_BIAS_FACTOR))
    if not len(biased):
        return ""
    channels = 3 if method.per_channel else 1
    cells = ", ".join(
        f"{k // channels} (row {k // channels // method.grid}, column "
        f"{k // channels % method.grid}) x{spread[k]:.2f}"
        for k in biased[:8]
    )
    more = f" and {len(biased) - 8} more" if len(biased) > 8 else ""
    design = "Owen-scrambled" if method.scrambled else "unscrambled (Xplique's)"
    return (
        f"the {design} Sobol design with N {n} for {d} factors scales the indices of "
        f"{len(biased)} cells by more than {DESIGN_BIAS_FACTOR:g}x (cell, factor): {cells}{more}; "
        "their values are biased. "
        + (
            "Set sobol.scrambled (CLI --scrambled): no cell is singled out by the sequence "
            f"itself, every index instead varies by about {1.18 / np.sqrt(n):.0%} at this N "
            "(and a seed may still hit one cell)"
            if not method.scrambled
            else "Use another seed or a larger nb_design"
        )
    )


def check_grid(grid: int, shape: tuple[int, ...], field: str) -> None:
    """A grid finer than the image or the model's input has cells without pixels."""
    smallest = min(shape[:2])
    if grid > smallest:
        raise InvalidArgument(
            f"{field} {grid} is larger than the image or the model's input (shorter side "
            f"{smallest} px); use at most {smallest}",
            field=field,
        )


def _pack(found: ViewAttribution) -> np.ndarray:
    """One array for the cache: the grid's values, then the view's map (float32), then
    EVA's bounds (the whole array float64 then)."""
    packed = np.concatenate([found.grid.ravel(), found.view_map.ravel()]).astype(np.float32)
    if found.eva is None:
        return packed
    return np.concatenate([packed.astype(np.float64), eva.pack_bounds(found.eva)])


def _unpack(
    packed: np.ndarray, method: AttributionMethod, view_shape: tuple[int, int]
) -> ViewAttribution:
    channels = 3 if isinstance(method, SobolSpec) and method.per_channel else 1
    cells = method.grid * method.grid * channels
    grid = packed[:cells].reshape(method.grid, method.grid, channels).astype(np.float32)
    end = cells + view_shape[0] * view_shape[1]
    view_map = packed[cells:end].reshape(view_shape).astype(np.float32)
    bounds = eva.unpack_bounds(packed[end:]) if isinstance(method, EvaSpec) else None
    return ViewAttribution((grid if channels == 3 else grid[..., 0]), view_map, (), bounds)
