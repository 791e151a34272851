"""Protocol-agnostic request and event types: what the API layer converts
protobuf to and from, and what the orchestration works with."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from propscope_server.config import PreprocessingConfig
from propscope_server.open_contract import BOUND_ATTACK_PASSES
from propscope_server.scoring.eva import EvaBounds
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
    # Returned path images: the longest side in pixels (0: full size).
    path_image_max_side_px: int = 0
    # What the caller is told in Accepted about the request's own settings.
    warnings: tuple[str, ...] = ()

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


# --- Attribution maps and their fidelity (AttributionService) ---


@dataclass(frozen=True)
class SobolSpec:
    grid: int = 8
    nb_design: int = 32
    estimator: str = "jansen"
    per_channel: bool = False
    scrambled: bool = False  # Owen-scrambled with the request's seed; else Xplique's design

    @property
    def dimension(self) -> int:
        return self.grid * self.grid * (3 if self.per_channel else 1)

    @property
    def forward_passes(self) -> int:
        """N (D + 2): the replicated design's rows."""
        return self.nb_design * (self.dimension + 2)


@dataclass(frozen=True)
class RiseSpec:
    grid: int = 7
    nb_samples: int = 4000
    preservation: float = 0.5

    @property
    def forward_passes(self) -> int:
        return self.nb_samples


@dataclass(frozen=True)
class EvaSpec:
    """EVA (Fel et al., CVPR 2023): per grid cell, how much the verified bound on the
    adversarial overlap drops when the cell is held fixed (docs/eva.md). The defaults
    here are the only definition of the request's defaults (api/convert_attribution.py,
    api/memory.py read them)."""

    grid: int = 8
    epsilon: float = 8 / 255  # fraction of the pixel range [0, 1] (the paper's 8/255)
    bound: str = "crown"  # ibp | crown
    hybrid_layer: str = ""  # empty: verified from the input (guaranteed)
    samples: int = 256  # points sampled in the ball per sampled row

    @property
    def forward_passes(self) -> int:
        """d + 1 bound rows: every cell perturbed, then each cell held fixed."""
        return self.grid * self.grid + 1

    @property
    def sample_passes(self) -> int:
        """Forward passes sampled inside the model, each sampled row's points and its
        attack's iterates: on the first row when verified (the sampled overlap), on
        every row for a hybrid (its empirical box)."""
        per_row = self.samples + BOUND_ATTACK_PASSES
        return per_row * (self.forward_passes if self.hybrid_layer else 1)


AttributionMethod = SobolSpec | RiseSpec | EvaSpec


def method_name(method: AttributionMethod) -> str:
    if isinstance(method, EvaSpec):
        return "eva"
    return "sobol" if isinstance(method, SobolSpec) else "rise"


@dataclass(frozen=True)
class PerturbationSpec:
    kind: str = "inpainting"  # inpainting | blur | amplitude
    baseline: str = "input_zero"  # input_zero | black | mean_colour | blur
    blur_sigma: float = 0.0  # 0: 2% of the model input's longer side


@dataclass(frozen=True)
class AttributeSpec:
    request_id: str
    image: np.ndarray  # uint8 [H, W, 3]
    classifier: ClassifierRef
    method: AttributionMethod
    target_score: str  # auto | probability | logit | log_odds (auto: logit, else log_odds)
    perturbation: PerturbationSpec
    seed: int
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class DeletionSpec:
    steps: int = 10
    max_percentage: float = 1.0
    baseline: str = "input_zero"


@dataclass(frozen=True)
class MuFidelitySpec:
    grid: int = 9
    subset_percent: float = 0.2
    nb_samples: int = 200
    baseline: str = "input_zero"


@dataclass(frozen=True)
class StabilitySpec:
    radius: float = 0.1
    nb_samples: int = 20
    method: AttributionMethod = field(default_factory=SobolSpec)
    perturbation: PerturbationSpec = field(default_factory=PerturbationSpec)


MetricSpec = tuple[str, DeletionSpec | MuFidelitySpec | StabilitySpec]


@dataclass(frozen=True)
class EvaluateSpec:
    request_id: str
    image: np.ndarray  # uint8 [H, W, 3]
    classifier: ClassifierRef
    explanation: np.ndarray | None  # float32 [H, W]
    metrics: tuple[
        MetricSpec, ...
    ]  # ("deletion" | "insertion" | "mu_fidelity" | "stability", options)
    target_score: str
    seed: int
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class ClassifierPlanned:
    """What every attribution and evaluation plan tells the caller first."""

    model_version: str
    target_class: int
    target_label: str
    target_score: str
    preprocessing: PreprocessingConfig
    preprocessing_sources: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class AttributionAccepted:
    method: AttributionMethod
    perturbation: PerturbationSpec | None  # None for EVA, which perturbs nothing
    classifier: ClassifierPlanned
    planned_forward_passes: int
    planned_forward_passes_total: int
    perturbation_description: str


@dataclass(frozen=True)
class PassesProgress:
    done: int
    total: int


@dataclass(frozen=True)
class AttributionOutcome:
    map: np.ndarray  # float32 [H, W] over the image
    grid: np.ndarray  # float32 [g, g]
    channel_grid: np.ndarray | None  # float32 [g, g, 3] for per-channel Sobol
    forward_passes: int
    cache_hit: bool
    original_score: float
    target_class: int
    target_label: str
    target_score: str
    total_s: float
    warnings: tuple[str, ...] = ()
    eva: EvaOutcome | None = None  # EVA only: the bounds the map comes from


@dataclass(frozen=True)
class ViewAttribution:
    """A method's map of one view (the original's, or a noisy one for stability), before
    it is brought back to the image."""

    grid: np.ndarray  # [g, g], or [g, g, 3] for per-channel Sobol
    view_map: np.ndarray  # [h, w] over the view
    warnings: tuple[str, ...]  # what makes the map carry no information (not cached)
    eva: EvaBounds | None = None  # EVA only: the bounds the map comes from


@dataclass(frozen=True)
class EvaOutcome:
    """What an EVA map rests on (AttributionResult.eva)."""

    guaranteed: bool  # verified from the input; false for a hybrid
    bound: str  # ibp | crown
    epsilon: float  # fraction of the pixel range
    epsilon_input: tuple[float, ...]  # per input channel, in the model's input units
    hybrid_layer: str
    overlap_bound: float  # AO_bar(B), every cell perturbed
    adversary_class: int  # the class whose margin bound is highest
    adversary_label: str
    sampled_overlap: float  # a lower bound on the true overlap
    samples: int
    region_bounds: tuple[float, ...]  # AO_bar(B_u) per cell, row-major g x g
    certified: bool  # guaranteed and overlap_bound < 0 (a hybrid proves nothing)
    bound_passes: int  # bound rows
    sample_passes: int  # sampled forward passes inside the model
    decision: str  # certified | not_robust | undecided (scoring/eva.py decide)
    verdict: str  # the decision in words, with why


@dataclass(frozen=True)
class EvaluationAccepted:
    metrics: tuple[str, ...]
    classifier: ClassifierPlanned
    planned_forward_passes: int


@dataclass(frozen=True)
class MetricOutcome:
    metric: str
    value: float
    settings: str
    target_score: str
    forward_passes: int
    fractions: tuple[float, ...] = ()
    scores: tuple[float, ...] = ()
    attribution_sums: tuple[float, ...] = ()
    score_drops: tuple[float, ...] = ()
    distances: tuple[float, ...] = ()
    warnings: tuple[str, ...] = ()
