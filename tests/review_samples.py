"""Hand-built review results for the report tests (no service, numbers of a known shape), and\na pixel counter to find the plots in what was drawn."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageColor

from propscope.review.results import (
    ModelEntry,
    Observation,
    PathStrip,
    ReviewResult,
    RuleOutcome,
    Settings,
)

STEPS = 10
CANDIDATE = ModelEntry("candidate", "classifier", "v2")
BASELINE = ModelEntry("baseline", "classifier", "v1")
SETTINGS = Settings(
    target="localhost:50051",
    steps=STEPS,
    samples=1,
    seed=0,
    permutations=999,
    alpha=0.01,
    min_probability_change=0.05,
    target_class="label",
)


def sample_review(
    images: int = 6,
    properties: tuple[str, ...] = ("object_hue", "patch"),
    models: tuple[ModelEntry, ...] = (CANDIDATE, BASELINE),
    with_outcomes: bool = True,
) -> ReviewResult:
    """The candidate flips on the first property (the baseline barely moves); on the others
    both drift a little. The candidate's score regresses on the first property only."""
    rng = np.random.default_rng(0)
    strength = np.linspace(0.0, 1.0, STEPS + 1)
    image_ids = {f"set/img_{index}.png": index % 2 for index in range(images)}
    observations = []
    for property_index, name in enumerate(properties):
        for model in models:
            for image in image_ids:
                if model.role != "baseline" and property_index == 0:
                    curve = 1 / (1 + np.exp(30 * (strength - rng.uniform(0.3, 0.7))))
                else:
                    curve = 0.9 - rng.uniform(0.01, 0.1) * strength
                observations.append(_observation(image, image_ids[image], model, name, curve))
    outcomes = ()
    if with_outcomes:
        outcomes = tuple(
            RuleOutcome(
                rule="no_regression",
                property_name=name,
                verdict="passed" if index else "failed",
                message=f"mean score {'0.05 > 1.1 × 0.004' if index == 0 else '0.003 ≤ 1.1 × 0.004'}",
                details={"tolerance": 0.1, "candidate": 0.05, "baseline": 0.004},
            )
            for index, name in enumerate(properties)
        ) + (
            RuleOutcome(
                rule="max_flip_rate",
                property_name=properties[-1],
                verdict="passed",
                message="flip rate 0% ≤ 10% | no flips",
                details={"max": 0.1, "candidate": 0.0},
            ),
        )
    first_image = next(iter(image_ids))
    strip = PathStrip(
        image=first_image,
        property_name=properties[0],
        images=tuple(_gray_png(int(200 - 15 * step)) for step in range(STEPS + 1)),
        curves={
            obs.model: obs.curve
            for obs in observations
            if obs.image == first_image and obs.property_name == properties[0]
        },
    )
    return ReviewResult(
        title="classifier v2 vs v1",
        settings=SETTINGS,
        models=models,
        properties=properties,
        images=image_ids,
        observations=tuple(observations),
        outcomes=outcomes,
        strips=(strip,),
        seconds=12.5,
    )


def _observation(
    image: str, label: int, model: ModelEntry, property_name: str, curve: np.ndarray
) -> Observation:
    score = float(np.mean(np.abs(np.gradient(curve))))
    change = float(curve.max() - curve.min())
    return Observation(
        image=image,
        model=model.label,
        property_name=property_name,
        score=score,
        score_per_unit_strength=score * STEPS,
        p_value=0.001 if change > 0.5 else 0.4,
        significant=change > 0.5,
        relevant=change >= 0.05,
        flip_rate=1.0 if curve.min() < 0.5 else 0.0,
        probability_change=change,
        target_class=label,
        original_class=label if model.role == "candidate" else 0,
        curve=tuple(float(p) for p in curve),
        cache_hits=0 if model.role == "candidate" else 1,
        cache_misses=1 if model.role == "candidate" else 0,
    )


def _gray_png(level: int) -> bytes:
    """An 8x8 gray tile with a darker square: no color the screenshot test looks for."""
    pixels = np.full((8, 8, 3), level, dtype=np.uint8)
    pixels[2:6, 2:6] = level // 2
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def color_pixels(image: Image.Image, color: str, tolerance: int = 8) -> int:
    """How many pixels of ``image`` are within ``tolerance`` of ``color`` in every channel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    target = np.array(ImageColor.getrgb(color), dtype=np.int16)
    return int(np.all(np.abs(pixels - target) <= tolerance, axis=-1).sum())
