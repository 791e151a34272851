"""Protocol-agnostic request and event types of EvaluateConsistency (MeGe and ReCo,
methods/consistency.py): what the API layer converts protobuf to and from. Field
names are the proto's."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propscope_server.domain import DEFAULT_TENANT, ClassifierRef, RiseSpec, SobolSpec

# Every explainer, in the order results list them.
EXPLAINERS = ("sobol", "rise", "saliency", "gradient_x_input", "random")
# Those that read the open model's INPUT_GRADIENT (capability gradients).
GRADIENT_EXPLAINERS = ("saliency", "gradient_x_input")
MIN_MODELS = 2
MIN_IMAGES = 2


@dataclass(frozen=True)
class ConsistencySpec:
    request_id: str
    models: tuple[ClassifierRef, ...]
    explainers: tuple[str, ...]  # empty: every explainer all the models serve
    images: tuple[np.ndarray, ...]
    labels: tuple[int, ...] | None
    sobol: SobolSpec
    rise: RiseSpec
    target_score: str  # "auto", "logit", "log_odds", "probability"
    seed: int
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class ModelOutcome:
    name: str
    version: str
    predicted_classes: tuple[int, ...] = ()
    accuracy: float | None = None


@dataclass(frozen=True)
class ConsistencyAccepted:
    models: tuple[ModelOutcome, ...]
    explainers: tuple[str, ...]
    image_count: int
    labels_given: bool
    planned_passes: int
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class ConsistencyProgress:
    done: int
    planned: int
    explainer: str


@dataclass(frozen=True)
class ExplainerConsistency:
    explainer: str
    mege: float | None
    reco: float | None
    mean_distance_agreeing: float | None
    mean_distance_disagreeing: float | None
    agreeing_pairs: int
    disagreeing_pairs: int
    both_wrong_pairs: int
    undefined_pairs: int
    seconds: float
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class ConsistencyDone:
    explainers: tuple[ExplainerConsistency, ...]
    models: tuple[ModelOutcome, ...]
    passes: int
    total_s: float
    warnings: tuple[str, ...]


ConsistencyEvent = ConsistencyAccepted | ConsistencyProgress | ConsistencyDone
