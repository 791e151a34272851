"""The report of one ``propscope explain --report``: one image, every model asked for, no rules."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from propscope._events import Accepted, PropertyResult
from propscope.review.results import ModelEntry, PathStrip, ReviewResult
from propscope.review.runner import observation_from_result, settings_from_accepted

__all__ = ["explanation_result"]


def explanation_result(
    image: str,
    target: str,
    *,
    seed: int,
    target_class: int | None,
    accepted: Mapping[str, Accepted],
    results: Mapping[str, Sequence[PropertyResult]],
    seconds: float = math.nan,
) -> ReviewResult:
    """A one-image ``ReviewResult`` from each model's Accepted event (its served version) and
    property results (asked for with ``return_path_images``), the calls having taken
    ``seconds``; failed properties are left out."""
    models = tuple(
        ModelEntry(
            "model",
            name,
            served_version=accepted[name].model_version if name in accepted else "",
        )
        for name in results
    )
    first_accepted = next(iter(accepted.values()))
    observations = []
    strips: dict[str, PathStrip] = {}
    for model, model_results in results.items():
        for result in model_results:
            if not result.ok:
                continue
            observations.append(observation_from_result(image, model, result))
            sample = result.samples[0]
            strip = strips.setdefault(
                result.property_name,
                PathStrip(image, result.property_name, sample.path_images, {}),
            )
            strip.curves[model] = tuple(float(p) for p in sample.prediction_curve)
    return ReviewResult(
        title=f"propscope explain: {image}",
        settings=settings_from_accepted(
            target,
            first_accepted,
            seed=seed,
            target_class="predicted" if target_class is None else f"class {target_class}",
        ),
        models=models,
        properties=tuple(first_accepted.property_names),
        images={image: None},
        observations=tuple(observations),
        strips=tuple(strips.values()),
        seconds=seconds,
    )
