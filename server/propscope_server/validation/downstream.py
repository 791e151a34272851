"""The paper's Table 2: predicting whether an intervention changes the model's
output, from our property score against the change of saliency maps.

Ground truth for one (image, property): the intervention x_N changes the output
when its predicted class differs from the original's or the target class's
probability moves by at least CHANGE_THRESHOLD. Every predictor gets the
threshold that maximises its accuracy on the data (the paper's protocol), so the
table compares how well each one *ranks* the pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
