"""Runs a review through the service: every image explained by the candidate and then the
baseline, a bounded number of images at a time, then the rules and the path strips.

Each image's baseline call starts after its candidate call has finished, so the baseline finds
every edited path in the gateway's cache and costs only classifier calls; the result's cache
statistics show whether it did.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from propscope._attribution import Attribution
from propscope._client import Client
from propscope._errors import PropscopeError
from propscope._events import Accepted, Decision, PropertyResult
from propscope._images import encode_image
from propscope._interactions import InteractionsResult
from propscope._maps import overlay_png
from propscope._preflight import PreflightError, preflight, problems_message
from propscope._properties import Property
from propscope.review.results import (
    AttributionObservation,
    InteractionObservation,
    ModelEntry,
    Observation,
    PathStrip,
    ReviewResult,
    Role,
    Settings,
)
from propscope.review.rules import attribution_share, box_pixels, evaluate_rules
from propscope.review.spec import (
    AttributionSpec,
    ImageEntry,
    InteractionSettingsSpec,
    MaxAttributionShareRule,
    ModelSpec,
    ReviewSpec,
    ServiceChecks,
    SpecError,
)

__all__ = [
    "ReviewError",
    "ReviewProgress",
    "interaction_calls",
    "interaction_observation",
    "observation_from_result",
    "run_review",
    "service_problems",
    "settings_from_accepted",
]

Item = TypeVar("Item")
Output = TypeVar("Output")


class ReviewError(Exception):
    """The review could not run (exit code 2): the message says where and why; ``problems``
    holds the pre-flight's problems, one line each, when it found some."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


@dataclass(frozen=True)
class ReviewProgress:
    """One call finished: an explanation (``stage`` "explain"), an attribution map
    ("attribute", for ``max_attribution_share``) or Sobol indices over properties
    ("interactions", for ``max_interaction_share``)."""

    completed: int
    total: int
    image: str
    model: str
    stage: str = "explain"


ProgressCallback = Callable[[ReviewProgress], None]


def run_review(
    spec: ReviewSpec,
    images: Sequence[ImageEntry],
    client: Client,
    *,
    on_progress: ProgressCallback | None = None,
) -> ReviewResult:
    """Explains every image with every model of ``spec``, checks the rules and fetches the path
    strips; raises ``ReviewError`` when any call or property fails."""
    started = time.monotonic()
    result, run, models = observe(spec, images, images, client, on_progress=on_progress)
    outcomes = evaluate_rules(spec.rules, result)
    strips = strips_of(spec, images, result, run, models)
    return replace(
        result,
        outcomes=tuple(outcomes),
        strips=tuple(strips),
        seconds=time.monotonic() - started,
        fail_on_inconclusive=spec.fail_on_inconclusive,
    )


def observe(
    spec: ReviewSpec,
    image_set: Sequence[ImageEntry],
    images: Sequence[ImageEntry],
    client: Client,
    *,
    on_progress: ProgressCallback | None = None,
) -> tuple[ReviewResult, _Run, list[ModelEntry]]:
    """The observations (and attribution shares) of ``images``, a part of ``image_set`` or all
    of it, with no rule checked yet; whose class the curves follow is decided on the whole set,
    so that a shard follows the class the unsharded review would."""
    models = _model_entries(spec)
    _preflight(client, spec)
    follow_label = (spec.target_class or _default_target(image_set)) == "label"
    run = _Run(spec, client, follow_label)
    total = len(images) * len(models)
    completed = 0
    counting = threading.Lock()
    # The service streams results as they finish; the review keeps the spec's order, so that
    # two runs (or a sharded run's merge) write the same review.json.
    order = {name: index for index, name in enumerate(spec.property_names)}

    def explain_image(image: ImageEntry) -> list[Observation]:
        nonlocal completed
        encoded = _read_image(image)
        properties = _properties_for(spec, image)
        observations = []
        for model in models:
            results = run.explain(image, encoded, model, properties, with_paths=False)
            results.sort(key=lambda found: order.get(found.property_name, len(order)))
            observations += [observation_from_result(image.id, model.label, r) for r in results]
            with counting:
                completed += 1
                if on_progress is not None:
                    on_progress(ReviewProgress(completed, total, image.id, model.label))
        return observations

    found = _map_or_raise(explain_image, images, spec.concurrency)
    if run.settings is None:
        raise ReviewError("the service accepted no explanation")
    result = ReviewResult(
        title=spec.title,
        settings=run.settings,
        models=tuple(run.served(model) for model in models),
        properties=tuple(spec.property_names),
        images={image.id: image.label for image in images},
        observations=tuple(obs for observations in found for obs in observations),
        fail_on_inconclusive=spec.fail_on_inconclusive,
    )
    attributions = _attributions(
        spec, images, client, models[0], follow_label, on_progress=on_progress
    )
    interactions = _interactions(
        spec, images, client, models[0], follow_label, on_progress=on_progress
    )
    result = replace(result, attributions=tuple(attributions), interactions=tuple(interactions))
    return result, run, models


def observation_from_result(image: str, model: str, result: PropertyResult) -> Observation:
    """One property's result as the review keeps it (curves averaged over samples)."""
    curves = np.array([sample.prediction_curve for sample in result.samples], dtype=np.float64)
    first_classes = result.samples[0].predicted_classes if result.samples else ()
    return Observation(
        image=image,
        model=model,
        property_name=result.property_name,
        score=result.score,
        score_per_unit_strength=result.score_per_unit_strength,
        p_value=result.p_value,
        significant=result.significant,
        relevant=result.relevant,
        flip_rate=result.flip_rate,
        probability_change=result.probability_change,
        target_class=result.target_class,
        original_class=int(first_classes[0]) if len(first_classes) else -1,
        curve=tuple(float(value) for value in curves.mean(axis=0)) if curves.size else (),
        cache_hits=result.cache_hits,
        cache_misses=result.cache_misses,
        # An older server sends no steps: the curve's length says it.
        steps=result.steps or (curves.shape[1] - 1 if curves.size else 0),
        decision=result.decision.value if result.decision != Decision.UNSPECIFIED else "",
        decision_detail=result.decision_detail,
        warnings=result.warnings,
        target_label=result.target_label,
        edits=result.edits,
    )


def settings_from_accepted(
    target: str, accepted: Accepted, *, seed: int, target_class: str
) -> Settings:
    """The settings the server resolved (its defaults filled in), as the reports state them."""
    return Settings(
        target=target,
        steps=accepted.steps,
        samples=accepted.samples,
        seed=seed,
        permutations=accepted.permutations,
        alpha=accepted.alpha,
        min_probability_change=accepted.min_probability_change,
        target_class=target_class,
        path_mode=accepted.path_mode,
        max_steps=accepted.max_steps,
    )


class _Run:
    """The explanation calls of one review, and the settings the first one resolved."""

    def __init__(self, spec: ReviewSpec, client: Client, follow_label: bool) -> None:
        self._spec = spec
        self._client = client
        self._follow_label = follow_label
        self.settings: Settings | None = None
        # Model label -> the first Accepted event of its explanations, and the warnings of all
        # of them (in order, once each).
        self._accepted: dict[str, Accepted] = {}
        self._warnings: dict[str, dict[str, None]] = {}
        self._lock = threading.Lock()

    def served(self, model: ModelEntry) -> ModelEntry:
        """``model`` with what the service said it applied to it."""
        accepted = self._accepted.get(model.label)
        if accepted is None:
            return model
        return replace(
            model,
            served_version=accepted.model_version,
            applied_preprocessing=accepted.preprocessing,
            preprocessing_sources=accepted.preprocessing_sources,
            served_class_labels=accepted.class_labels,
            warnings=tuple(self._warnings.get(model.label, {})),
        )

    def explain(
        self,
        image: ImageEntry,
        encoded: bytes,
        model: ModelEntry,
        properties: Sequence[Property],
        *,
        with_paths: bool,
    ) -> list[PropertyResult]:
        options = self._spec.explain
        where = f"{image.id}, {model.label}"
        results = []
        try:
            for event in self._client.explain(
                encoded,
                model.name,
                properties,
                model_version=model.version,
                model_output=model.output,
                preprocessing=model.preprocessing,
                class_labels=model.class_labels,
                path_mode=options.path_mode,
                max_steps=options.max_steps,
                target_class=image.label if self._follow_label else None,
                steps=options.steps,
                samples=options.samples,
                seed=options.seed,
                permutations=options.permutations,
                alpha=options.alpha,
                min_probability_change=options.min_probability_change,
                return_path_images=with_paths,
                timeout=self._spec.service.timeout_s,
            ):
                if isinstance(event, Accepted):
                    with self._lock:
                        self._accepted.setdefault(model.label, event)
                        seen = self._warnings.setdefault(model.label, {})
                        seen.update(dict.fromkeys(event.warnings))
                    self.settings = self.settings or settings_from_accepted(
                        self._client.target,
                        event,
                        seed=options.seed,
                        target_class="label" if self._follow_label else "predicted",
                    )
                elif isinstance(event, PropertyResult):
                    if not event.ok:
                        raise ReviewError(
                            f"{where}: property {event.property_name!r} failed: "
                            f"{event.status_code.name}: {event.error}"
                        )
                    results.append(event)
        except PropscopeError as error:
            raise ReviewError(f"{where}: {error}") from None
        return results


def _model_entries(spec: ReviewSpec) -> list[ModelEntry]:
    roles: list[tuple[Role, ModelSpec | None]] = [
        ("candidate", spec.candidate),
        ("baseline", spec.baseline),
    ]
    return [
        ModelEntry(
            role,
            model.name,
            model.version,
            model.output,
            preprocessing=model.preprocessing_override(),
            class_labels=spec.class_labels_of(model),
        )
        for role, model in roles
        if model is not None
    ]


def _properties_for(spec: ReviewSpec, image: ImageEntry) -> list[Property]:
    try:
        return spec.properties_for(image)
    except SpecError as error:
        raise ReviewError(str(error)) from None


def _default_target(images: Sequence[ImageEntry]) -> str:
    return "label" if all(image.label is not None for image in images) else "predicted"


def service_problems(client: Client, checks: ServiceChecks) -> list[str]:
    """What the service would refuse of ``checks``: every model, editor, editor parameter and
    setting checked against one ``ListModels``; ``ReviewError`` when it cannot be asked."""
    try:
        served = client.list_models()
    except PropscopeError as error:
        raise ReviewError(f"cannot reach the service at {client.target}: {error}") from None
    options = checks.explain
    try:
        preflight(
            served,
            classifiers=checks.classifiers,
            properties=checks.properties,
            steps=options.steps,
            samples=options.samples,
            permutations=options.permutations,
            alpha=options.alpha,
            max_steps=options.max_steps,
            path_mode=options.path_mode,
        )
    except PreflightError as error:
        return list(error.problems)
    return []


def _preflight(client: Client, spec: ReviewSpec) -> None:
    """The pre-flight before the first image: one error lists every problem."""
    problems = service_problems(client, spec.service_checks())
    if problems:
        raise ReviewError(problems_message(problems), problems)


def _read_image(image: ImageEntry) -> bytes:
    try:
        return encode_image(image.path)
    except OSError as error:
        raise ReviewError(
            f"cannot read image {str(image.path)!r}: {error.strerror or error}"
        ) from None
    except ValueError as error:
        raise ReviewError(f"cannot use image {str(image.path)!r}: {error}") from None


def _map_or_raise(
    work: Callable[[Item], Output], items: Sequence[Item], workers: int
) -> list[Output]:
    """``work`` over ``items`` on ``workers`` threads, results in item order; the first error
    cancels what has not started and is raised."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="propscope-review")
    futures: dict[Future[Output], int] = {
        pool.submit(work, item): i for i, item in enumerate(items)
    }
    results: list[Output | None] = [None] * len(items)
    try:
        for future in as_completed(futures):
            results[futures[future]] = future.result()
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return [result for result in results if result is not None]


# The longest side of the overlay thumbnails the HTML report shows.
OVERLAY_PX = 160


def _attributions(
    spec: ReviewSpec,
    images: Sequence[ImageEntry],
    client: Client,
    candidate: ModelEntry,
    follow_label: bool,
    *,
    on_progress: ProgressCallback | None = None,
) -> list[AttributionObservation]:
    """The candidate's attribution map of every image, once per distinct ``attribution``
    setting of the ``max_attribution_share`` rules, and each rule's share of it."""
    rules = spec.attribution_rules()
    settings: list[AttributionSpec] = []
    for rule in rules:
        if rule.attribution not in settings:
            settings.append(rule.attribution)
    jobs = [(image, setting) for setting in settings for image in images]
    completed = 0
    counting = threading.Lock()

    def attribute(job: tuple[ImageEntry, AttributionSpec]) -> list[AttributionObservation]:
        nonlocal completed
        image, setting = job
        encoded = _read_image(image)
        try:
            found = client.attribute(
                encoded,
                candidate.name,
                model_version=candidate.version,
                model_output=candidate.output,
                preprocessing=candidate.preprocessing,
                class_labels=candidate.class_labels,
                target_class=image.label if follow_label else None,
                timeout=spec.service.timeout_s,
                **setting.client_options(),
            )
        except PropscopeError as error:
            raise ReviewError(f"{image.id}, {candidate.label}, attribution map: {error}") from None
        with counting:
            completed += 1
            if on_progress is not None:
                on_progress(
                    ReviewProgress(completed, len(jobs), image.id, candidate.label, "attribute")
                )
        return [
            _share_observation(rule, image, candidate, encoded, found)
            for rule in rules
            if rule.attribution == setting
        ]

    found = _map_or_raise(attribute, jobs, spec.concurrency)
    return [obs for observations in found for obs in observations]


def _share_observation(
    rule: MaxAttributionShareRule,
    image: ImageEntry,
    model: ModelEntry,
    encoded: bytes,
    found: Attribution,
) -> AttributionObservation:
    box = rule.region.to_box()
    share, mass = attribution_share(found.map, box)
    height, width = found.map.shape
    row0, row1, col0, col1 = box_pixels(box, height, width)
    return AttributionObservation(
        rule=rule.name,
        image=image.id,
        model=model.label,
        share=share,
        positive_mass=mass,
        method=found.method,
        forward_passes=found.forward_passes,
        cache_hit=found.cache_hit,
        target_class=found.target_class,
        target_label=found.target_label,
        overlay=_overlay_thumbnail(
            encoded, found, (col0 / width, row0 / height, col1 / width, row1 / height)
        ),
        guarantee=found.eva.guarantee if found.eva is not None else "",
    )


def _overlay_thumbnail(encoded: bytes, found: Attribution, box: tuple[float, ...]) -> bytes:
    """The heat map over the image, the region outlined, at most ``OVERLAY_PX`` a side."""
    return overlay_png(encoded, found.map, box=box, max_side=OVERLAY_PX)


def _interactions(
    spec: ReviewSpec,
    images: Sequence[ImageEntry],
    client: Client,
    candidate: ModelEntry,
    follow_label: bool,
    *,
    on_progress: ProgressCallback | None = None,
) -> list[InteractionObservation]:
    """The candidate's Sobol indices on every image, once per distinct (properties, settings)
    of the ``max_interaction_share`` rules; the composed images are cached by the gateway, so
    two rules over the same properties and design cost classifications only."""
    rules_of = interaction_calls(spec)
    jobs = [(image, call) for call in rules_of for image in images]
    completed = 0
    counting = threading.Lock()
    editors = spec.editor_properties()

    def estimate(
        job: tuple[ImageEntry, InteractionCall],
    ) -> list[InteractionObservation]:
        nonlocal completed
        image, call = job
        names, setting = call
        try:
            found = client.interactions(
                _read_image(image),
                candidate.name,
                [editors[name] for name in names],
                model_version=candidate.version,
                model_output=candidate.output,
                preprocessing=candidate.preprocessing,
                class_labels=candidate.class_labels,
                target_class=image.label if follow_label else None,
                timeout=spec.service.timeout_s,
                **setting.client_options(),
            )
        except PropscopeError as error:
            raise ReviewError(f"{image.id}, {candidate.label}, interactions: {error}") from None
        with counting:
            completed += 1
            if on_progress is not None:
                on_progress(
                    ReviewProgress(completed, len(jobs), image.id, candidate.label, "interactions")
                )
        return [
            interaction_observation(rule, image.id, candidate.label, found)
            for rule in rules_of[call]
        ]

    found = _map_or_raise(estimate, jobs, spec.concurrency)
    return [obs for observations in found for obs in observations]


InteractionCall = tuple[tuple[str, ...], InteractionSettingsSpec]


def interaction_calls(spec: ReviewSpec) -> dict[InteractionCall, list[str]]:
    """The distinct Interactions calls of the ``max_interaction_share`` rules (their
    properties, in the rule's order (unset: the spec's) each once, and their settings), in
    the rules' order, each with the names of the rules that read it: what a run calls and the
    order a merge restores."""
    rules_of: dict[InteractionCall, list[str]] = {}
    for rule in spec.interaction_rules():
        names = tuple(dict.fromkeys(rule.properties or spec.property_names))
        rules_of.setdefault((names, rule.interactions), []).append(rule.name)
    return rules_of


def interaction_observation(
    rule: str, image: str, model: str, found: InteractionsResult
) -> InteractionObservation:
    """One image's indices as the review keeps them."""
    indices = found.indices
    return InteractionObservation(
        rule=rule,
        image=image,
        model=model,
        properties=tuple(item.name for item in indices),
        first=tuple(item.first_order.value for item in indices),
        first_low=tuple(item.first_order.low for item in indices),
        first_high=tuple(item.first_order.high for item in indices),
        total=tuple(item.total_order.value for item in indices),
        total_low=tuple(item.total_order.low for item in indices),
        total_high=tuple(item.total_order.high for item in indices),
        share=found.interaction_share.value,
        share_low=found.interaction_share.low,
        share_high=found.interaction_share.high,
        significant=found.interaction_significant,
        variance=found.variance,
        target_class=found.target_class,
        target_label=found.target_label,
        confidence=found.confidence,
        design_size=found.design_size,
        cache_hits=found.cache_hits,
        cache_misses=found.cache_misses,
        forward_passes=found.forward_passes,
        warnings=found.warnings,
        negligible_variance=found.negligible_variance,
    )


def strips_of(
    spec: ReviewSpec,
    images: Sequence[ImageEntry],
    result: ReviewResult,
    run: _Run,
    models: Sequence[ModelEntry],
) -> list[PathStrip]:
    """The path images of the images of ``result`` the candidate's score ranks highest, per
    property; their paths come from the cache, so this costs classifier calls only."""
    by_id = {image.id: image for image in images}
    candidate = models[0]
    jobs = []
    for name in spec.property_names:
        ranked = sorted(
            result.select(candidate.label, name), key=lambda obs: -result.score_at_n(obs)
        )
        jobs += [(by_id[obs.image], name) for obs in ranked[: spec.strips]]

    def fetch(job: tuple[ImageEntry, str]) -> PathStrip:
        image, name = job
        (prop,) = [p for p in _properties_for(spec, image) if p.name == name]
        encoded = _read_image(image)
        curves: dict[str, tuple[float, ...]] = {}
        path_images: tuple[bytes, ...] = ()
        for model in models:
            (found,) = run.explain(image, encoded, model, [prop], with_paths=True)
            first = found.samples[0]
            curves[model.label] = tuple(float(p) for p in first.prediction_curve)
            path_images = path_images or first.path_images
        return PathStrip(image.id, prop.name, path_images, curves)

    return _map_or_raise(fetch, jobs, spec.concurrency)
