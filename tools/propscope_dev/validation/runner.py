"""Explains many synthetic images through the service and keeps, per property,
the numbers the tables need."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Literal

import grpc
import numpy as np
from PIL import Image

import propscope
from propscope_server.synthetic.world import BIASED_HUES, make_split, render

logger = logging.getLogger(__name__)

# The interventions of the bias table, one per factor of the synthetic world.
PROPERTIES: dict[str, str] = {
    "object_hue": "procedural:operation=hue,region=object",
    "patch": "procedural:operation=blend",
    "background_brightness": "procedural:operation=brightness,region=background,amount=0.2",
    "object_size": "procedural:operation=scale,amount=0.4",
}
# Each classifier and the property its training split tied to the label (None: none).
SHORTCUTS: dict[str, str | None] = {
    "synth_unbiased": None,
    "synth_hue": "object_hue",
    "synth_patch": "patch",
}
# A property no classifier was trained to use.
UNTOUCHED = "background_brightness"
# The test's settings, passed explicitly so that the tables can state them.
PERMUTATIONS = 10_000
ALPHA = 0.01
# Far from the training (0..2000) and training-report (10_000..12_000) seeds.
TEST_SET_SEED = 50_000


@dataclass(frozen=True)
class PropertyRun:
    """One property of one explained image, as the service returned it."""

    model: str
    image_index: int
    property_name: str
    score: float
    score_per_unit_strength: float
    p_value: float
    significant: bool
    relevant: bool
    flipped: bool
    probability_change: float
    pearson_correlation: float | None
    mutual_information: float | None
    curve: np.ndarray  # target probability x_0..x_N
    predicted_classes: np.ndarray
    last_image: np.ndarray | None  # x_N, when the path images were asked for
    steps: int = 0  # the N decided on (an adaptive path may be longer than asked)
    decision: str = ""  # propscope.Decision's value
    edits: int = 0  # edited images, every path length tried included


def held_out_images(
    per_class: int, seed: int = TEST_SET_SEED, hues: Literal["trained", "uniform"] = "trained"
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out images of the unbiased world without the patch, so that pasting the
    patch always changes the image: (images [2 * per_class, 64, 64, 3], labels).

    With hues="trained" the hue is drawn from the two ranges the hue-biased model
    was trained on, independently of the class: every image lies where all three
    models saw data, and the hue no longer predicts the class. "uniform" draws hues
    the hue-biased model never saw (see docs/results/bias_table.md)."""
    _, labels, scenes = make_split("none", 2 * per_class, seed)
    rng = np.random.default_rng([seed, 1])
    if hues == "trained":
        ranges = [BIASED_HUES[i] for i in rng.integers(0, len(BIASED_HUES), len(scenes))]
        scenes = [
            replace(scene, hue_deg=float(rng.uniform(low, high)) % 360.0)
            for scene, (low, high) in zip(scenes, ranges, strict=True)
        ]
    images = np.stack([render(replace(scene, patch=False)) for scene in scenes])
    return images, labels


def explain_all(
    client: propscope.Client,
    images: np.ndarray,
    models: Iterable[str],
    properties: Mapping[str, str] | Callable[[int], Mapping[str, str]] = PROPERTIES,
    *,
    steps: int = 10,
    seed: int = 0,
    workers: int = 4,
    keep_last_image: bool = False,
    path_mode: Literal["adaptive", "fixed"] = "fixed",
    max_steps: int = 0,
    no_op_unchanged: bool = False,
) -> list[PropertyRun]:
    """Every (model, image) explained for all `properties` (the same for every
    image, or per image index) in one request each, `workers` requests at a time;
    a failed property raises. Paths are fixed at `steps` unless `path_mode` is
    "adaptive" (then up to `max_steps`, 0: the service's default).

    With `no_op_unchanged`, an edit too small to change a pixel (which the service
    refuses to score) counts as a constant path of the original: score 0, p = 1."""
    properties_of = properties if callable(properties) else lambda _: properties
    jobs = [(model, index) for model in models for index in range(len(images))]
    started = time.monotonic()

    def explain(job: tuple[str, int]) -> list[PropertyRun]:
        model, index = job
        specs = [f"{name}={spec}" for name, spec in properties_of(index).items()]
        events = client.explain(
            images[index],
            model,
            specs,
            steps=steps,
            seed=seed,
            permutations=PERMUTATIONS,
            alpha=ALPHA,
            return_path_images=keep_last_image,
            path_mode=path_mode,
            max_steps=max_steps,
        )
        results = [e for e in events if isinstance(e, propscope.PropertyResult)]
        if not no_op_unchanged:
            return [_run(model, index, result) for result in results]
        scored = [_run(model, index, r) for r in results if not _is_no_op(r)]
        if not scored:
            raise RuntimeError(f"{model}, image {index}: every edit left the image unchanged")
        return [
            _no_op_run(r.property_name, scored[0], images[index], steps, keep_last_image)
            if _is_no_op(r)
            else _run(model, index, r)
            for r in results
        ]

    runs: list[PropertyRun] = []
    with ThreadPoolExecutor(workers) as pool:
        for done, found in enumerate(pool.map(explain, jobs), start=1):
            runs.extend(found)
            if done % 50 == 0 or done == len(jobs):
                logger.info(
                    "explained %d/%d in %.0f s", done, len(jobs), time.monotonic() - started
                )
    return runs


def _run(model: str, index: int, result: propscope.PropertyResult) -> PropertyRun:
    if not result.ok:
        raise RuntimeError(f"{model}, image {index}, {result.property_name}: {result.error}")
    (sample,) = result.samples
    last = None
    if sample.path_images:
        last = np.asarray(Image.open(io.BytesIO(sample.path_images[-1])).convert("RGB"))
    return PropertyRun(
        model=model,
        image_index=index,
        property_name=result.property_name,
        score=result.score,
        score_per_unit_strength=result.score_per_unit_strength,
        p_value=result.p_value,
        significant=result.significant,
        relevant=result.relevant,
        flipped=result.prediction_flipped,
        probability_change=result.probability_change,
        pearson_correlation=result.pearson_correlation,
        mutual_information=result.mutual_information,
        curve=np.asarray(sample.prediction_curve),
        predicted_classes=np.asarray(sample.predicted_classes),
        last_image=last,
        steps=result.steps,
        decision=result.decision.value,
        edits=result.edits,
    )


def _is_no_op(result: propscope.PropertyResult) -> bool:
    return result.status_code == grpc.StatusCode.FAILED_PRECONDITION


def _no_op_run(
    name: str, sibling: PropertyRun, original: np.ndarray, steps: int, keep_last_image: bool
) -> PropertyRun:
    """A property whose every path image equals the original (read from a sibling
    property of the same request, which shares x_0)."""
    return replace(
        sibling,
        property_name=name,
        score=0.0,
        score_per_unit_strength=0.0,
        p_value=1.0,
        significant=False,
        relevant=False,
        flipped=False,
        probability_change=0.0,
        pearson_correlation=None,
        mutual_information=None,
        curve=np.full(steps + 1, sibling.curve[0]),
        predicted_classes=np.full(steps + 1, sibling.predicted_classes[0]),
        last_image=original.copy() if keep_last_image else None,
        steps=steps,
        decision="no-op",
        edits=steps,
    )


def select(runs: Sequence[PropertyRun], model: str, property_name: str) -> list[PropertyRun]:
    return [r for r in runs if r.model == model and r.property_name == property_name]
