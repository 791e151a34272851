"""Protocol-agnostic request and event types: what the API layer converts
protobuf to and from, and what the orchestration works with."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from propscope_server.config import PreprocessingConfig
from propscope_server.scoring.property_gradient import PropertyScore

# The tenant of every caller when the gateway has no tokens configured.
DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class ClassifierRef:
    name: str
    version: str = ""
    output: str = ""
    target_class: int | None = None  # None: the class predicted for the original
    preprocessing: PreprocessingConfig | None = None  # None: the model's or the gateway's
    class_labels: tuple[str, ...] = ()  # empty: the model's own


@dataclass(frozen=True)
class EditorRef:
    model: str
    version: str = ""
    parameters: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PropertySpec:
    name: str
    editor: EditorRef | None = None
    provided_path: tuple[np.ndarray, ...] | None = None  # x_1..x_N, uint8 HWC
    # Editors only: [H, W] float32 weights in [0, 1]; outside (0) the original is kept.
    region: np.ndarray | None = None


@dataclass(frozen=True)
class ExplainSpec:
    request_id: str
    image: np.ndarray  # uint8 [H, W, 3]
    classifier: ClassifierRef
    properties: tuple[PropertySpec, ...]
    steps: int
    samples: int
    seed: int
    permutations: int
    alpha: float
    min_probability_change: float
    return_path_images: bool
    tenant: str = DEFAULT_TENANT  # who asked: the cache namespace and the admission bucket
    # Adaptive: a property whose test cannot reach alpha at N gets a path of 2N, up to
    # max_steps (= steps when fixed, or when 0).
    adaptive: bool = False
    max_steps: int = 0

    def path_shape(self, prop: PropertySpec) -> tuple[int, int]:
        """(paths, images x_1..x_N per path) of one property; a provided path is one
        path of its own length."""
        if prop.provided_path is not None:
            return 1, len(prop.provided_path)
        return self.samples, self.steps


@dataclass(frozen=True)
class Accepted:
    property_names: tuple[str, ...]
    samples: int
    steps: int
    permutations: int
    alpha: float
    model_version: str
    planned_edits: int
    planned_classifications: int
    min_probability_change: float
    adaptive: bool
    max_steps: int
    preprocessing: PreprocessingConfig
    preprocessing_sources: tuple[str, ...]
    warnings: tuple[str, ...]
    class_labels: tuple[str, ...]


@dataclass(frozen=True)
class Progress:
    stage: str
    property_name: str
    completed: int
    total: int


@dataclass(frozen=True)
class SampleOutcome:
    seed: int
    score: float
    p_value: float
    prediction_curve: np.ndarray
    predicted_classes: np.ndarray
    cache_hit: bool
    path: np.ndarray | None  # [N + 1, H, W, 3] when the caller asked for images


@dataclass(frozen=True)
class PropertyOutcome:
    property_name: str
    score: PropertyScore | None = None
    target_class: int = 0
    samples: tuple[SampleOutcome, ...] = ()
    cache_hits: int = 0
    cache_misses: int = 0
    error: Exception | None = None
    steps: int = 0  # N of the path the result was decided on
    edits: int = 0  # edited images over every path length tried, cache hits included
    warnings: tuple[str, ...] = ()
    target_label: str = ""


@dataclass
class StageTimes:
    edit_s: float = 0.0
    classify_s: float = 0.0
    score_s: float = 0.0
    cache_s: float = 0.0


@dataclass(frozen=True)
class Done:
    total_s: float
    stages: StageTimes
    properties_failed: int


Event = Accepted | Progress | PropertyOutcome | Done
