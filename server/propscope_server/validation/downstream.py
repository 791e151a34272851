"""The paper's Table 2: predicting whether an intervention changes the model's
output, from our property score against the change of saliency maps.

Each (image, property) pair gets an intervention of random size (a hue rotation
of 0-180 degrees, a patch of 4-14 px, ...), so that whether the output changes is
not settled by the kind of edit alone. Ground truth: the intervention x_N changes
the output when its predicted class differs from the original's or the target
class's probability moves by at least CHANGE_THRESHOLD. Every predictor gets the
threshold that maximises its accuracy on the data (the paper's protocol), so the
table compares how well each one *ranks* the pairs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from propscope_server.triton_models.classifiers.cnn import normalise_uint8_hwc
from propscope_server.validation import saliency
from propscope_server.validation.runner import PropertyRun

CHANGE_THRESHOLD = 0.1
OURS = "E|∇X| (ours)"


def random_interventions(count: int, seed: int) -> list[dict[str, str]]:
    """Per image, the four properties with sizes drawn at random (procedural editor)."""
    rng = np.random.default_rng([seed, 2])
    return [
        {
            "object_hue": f"procedural:operation=hue,region=object,amount={rng.uniform(0, 180):.1f}",
            "patch": f"procedural:operation=blend,patch_size={rng.integers(4, 15)}",
            "background_brightness": "procedural:operation=brightness,region=background,"
            f"amount={rng.uniform(-0.3, 0.3):.3f}",
            "object_size": f"procedural:operation=scale,amount={rng.uniform(-0.5, 0.5):.3f}",
        }
        for _ in range(count)
    ]


def output_changed(run: PropertyRun, threshold: float = CHANGE_THRESHOLD) -> bool:
    flipped = run.predicted_classes[-1] != run.predicted_classes[0]
    return bool(flipped or abs(run.curve[-1] - run.curve[0]) >= threshold)


def best_threshold_accuracy(values: Sequence[float], labels: Sequence[bool]) -> float:
    """The best accuracy of "changed when value > t" over every threshold t,
    including the constant predictions."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    thresholds = np.concatenate([[-np.inf], np.unique(values)])
    predictions = values[None, :] > thresholds[:, None]
    return float((predictions == labels[None, :]).mean(axis=1).max())


@dataclass(frozen=True)
class Accuracies:
    """One model's pairs: the accuracy of each predictor, the share of pairs whose
    output changed, and the largest gap between the in-process and the served
    model's target probability on the originals (both must be the same model)."""

    by_predictor: dict[str, float]
    positive_rate: float
    max_probability_gap: float
    saliency_seconds: dict[str, float] = field(default_factory=dict)


def predictor_accuracies(
    runs: Sequence[PropertyRun],
    images: np.ndarray,
    model_name: str,
    methods: Iterable[str] = saliency.METHODS,
    seed: int = 0,
) -> Accuracies:
    """`runs` must carry x_N (explained with keep_last_image); `seed` seeds LIME's and
    Kernel SHAP's sampling."""
    runs = [r for r in runs if r.model == model_name]
    labels = [output_changed(r) for r in runs]
    model = saliency.served_classifier(model_name)
    # Every property of an image shares x_0: any of its runs knows x_0's class and p.
    original_runs = {r.image_index: r for r in runs}
    originals = sorted(original_runs)
    row = {index: i for i, index in enumerate(originals)}
    original_targets = np.array([original_runs[i].predicted_classes[0] for i in originals])
    with torch.inference_mode():
        logits = model(normalise_uint8_hwc(images[originals]))
    in_process = torch.softmax(logits, dim=1).numpy()[np.arange(len(originals)), original_targets]
    served = np.array([original_runs[i].curve[0] for i in originals])
    edited = np.stack([r.last_image for r in runs])
    original_of_run = [row[r.image_index] for r in runs]
    edited_targets = original_targets[original_of_run]
    by_predictor = {OURS: best_threshold_accuracy([r.score for r in runs], labels)}
    seconds = {}
    for method in methods:
        torch.manual_seed(seed)
        started = time.perf_counter()
        before = saliency.attribution_maps(method, model, images[originals], original_targets)
        after = saliency.attribution_maps(method, model, edited, edited_targets)
        seconds[method] = time.perf_counter() - started
        change = saliency.map_change(before[original_of_run], after)
        by_predictor[method] = best_threshold_accuracy(change, labels)
    return Accuracies(
        by_predictor=by_predictor,
        positive_rate=float(np.mean(labels)),
        max_probability_gap=float(np.abs(in_process - served).max()),
        saliency_seconds=seconds,
    )
