"""The paper's Table 2: predicting whether an intervention changes the model's
output, from our property score against the change of saliency maps.

Ground truth for one (image, property): the intervention x_N changes the output
when its predicted class differs from the original's or the target class's
probability moves by at least CHANGE_THRESHOLD. Every predictor gets the
threshold that maximises its accuracy on the data (the paper's protocol), so the
table compares how well each one *ranks* the pairs.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from propscope_server.triton_models.classifiers.cnn import normalise_uint8_hwc
from propscope_server.validation import saliency
from propscope_server.validation.runner import PropertyRun

CHANGE_THRESHOLD = 0.1
OURS = "E|∇X| (ours)"


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


def predictor_accuracies(
    runs: Sequence[PropertyRun],
    images: np.ndarray,
    model_name: str,
    methods: Iterable[str] = saliency.METHODS,
    seconds: dict[str, float] | None = None,
) -> dict[str, float]:
    """Best-threshold accuracy of ours and of each saliency method on one model's
    (image, property) pairs; also the positive rate, and the largest gap between
    the in-process model and the service (a check that both are the same model).
    `runs` must carry x_N (explained with keep_last_image)."""
    runs = [r for r in runs if r.model == model_name]
    labels = [output_changed(r) for r in runs]
    result = {
        OURS: best_threshold_accuracy([r.score for r in runs], labels),
        "positive rate": float(np.mean(labels)),
    }
    model = saliency.served_classifier(model_name)
    originals = sorted({r.image_index for r in runs})
    row = {index: i for i, index in enumerate(originals)}
    targets = {r.image_index: int(r.predicted_classes[0]) for r in runs}
    original_targets = np.array([targets[index] for index in originals])
    with torch.inference_mode():
        logits = model(normalise_uint8_hwc(images[originals]))
    in_process = torch.softmax(logits, dim=1).numpy()[np.arange(len(originals)), original_targets]
    served = np.array([next(r.curve[0] for r in runs if r.image_index == i) for i in originals])
    result["max |p_torch - p_service|"] = float(np.abs(in_process - served).max())
    edited = np.stack([r.last_image for r in runs])
    edited_targets = np.array([targets[r.image_index] for r in runs])
    for method in methods:
        started = time.perf_counter()
        before = saliency.attribution_maps(method, model, images[originals], original_targets)
        after = saliency.attribution_maps(method, model, edited, edited_targets)
        if seconds is not None:
            seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - started
        change = saliency.map_change(before[[row[r.image_index] for r in runs]], after)
        result[method] = best_threshold_accuracy(change, labels)
    return result
