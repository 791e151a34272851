"""Protocol-agnostic request and event types of MACO feature visualisation (Visualize,
methods/maco.py): what the API layer converts protobuf to and from. Field names are
the proto's (visualization.proto)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propscope_server.domain import DEFAULT_TENANT, ClassifierRef
from propscope_server.scoring import maco

# Where the fixed magnitude comes from (VisualizeAccepted.spectrum_source).
SPECTRUM_IMAGES = "images"
SPECTRUM_NATURAL = "natural_1_over_f"
# The ranges visualization.proto states, one definition for the API and the method.
MIN_SIDE_PX = 16
MAX_LEARNING_RATE = 100.0


@dataclass(frozen=True)
class ClassObjective:
    """A class's logit."""

    class_index: int


@dataclass(frozen=True)
class ChannelObjective:
    """The spatial mean of one hidden channel's activation."""

    layer: str
    channel: int


@dataclass(frozen=True)
class ConceptObjective:
    """The spatial mean of a CRAFT concept's direction W[concept] at its bank's layer."""

    bank_id: str
    concept: int


Objective = ClassObjective | ChannelObjective | ConceptObjective


@dataclass(frozen=True)
class VisualizeSpec:
    request_id: str
    classifier: ClassifierRef
    objective: Objective
    settings: maco.Settings = maco.Settings()
    seed: int = 0
    spectrum_images: tuple[np.ndarray, ...] = ()  # uint8 [H, W, 3]
    size_px: int = 0  # 0: the model input's height
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class VisualizeAccepted:
    model: str
    model_version: str
    objective: str  # in words
    settings: maco.Settings
    size_px: int
    spectrum_source: str
    planned_passes: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class VisualizeProgress:
    steps_done: int
    steps_total: int
    objective: float  # mean over the last step's crops


@dataclass(frozen=True)
class VisualizeDone:
    picture: np.ndarray  # uint8 [H, W, 3]
    alpha: np.ndarray  # float [H, W] in [0, 1]
    objective: float  # on the whole final picture
    start_objective: float  # on the whole starting picture
    class_probabilities: tuple[float, ...]
    predicted_class: int
    passes: int
    total_s: float
    warnings: tuple[str, ...] = ()


VisualizeEvent = VisualizeAccepted | VisualizeProgress | VisualizeDone
