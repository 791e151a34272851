"""Attribution maps and their fidelity: the typed results of ``Client.attribute`` and
``Client.evaluate_attribution``, the option words they take, and maps to and from the wire.

Option words are the contract's enum names in lower case without their prefix ("jansen",
"inpainting", "mean_colour", "logit"), so that a result read back into a request means the
same thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from propscope._json import dataclass_dict, finite_or_none
from propscope._preprocessing import Preprocessing
from propscope.v1 import attribution_pb2

__all__ = [
    "BASELINES",
    "BOUNDS",
    "ESTIMATORS",
    "METHODS",
    "METRICS",
    "PERTURBATIONS",
    "TARGET_SCORES",
    "Attribution",
    "AttributionProgress",
    "EvaOptions",
    "EvaResult",
    "Evaluation",
    "MetricResult",
    "PerturbationSettings",
    "RiseOptions",
    "SobolOptions",
    "map_from_proto",
    "map_to_proto",
]

Method = Literal["sobol", "rise", "eva"]
Estimator = Literal["jansen", "homma", "janon", "glen_isaacs", "saltelli"]
TargetScore = Literal["probability", "logit"]
PerturbationKind = Literal["inpainting", "blur", "amplitude"]
Baseline = Literal["input_zero", "black", "mean_colour", "blur"]
Metric = Literal["deletion", "insertion", "mu_fidelity", "stability"]

METHODS: tuple[str, ...] = ("sobol", "rise", "eva")
METRICS: tuple[str, ...] = ("deletion", "insertion", "mu_fidelity", "stability")
ESTIMATORS: tuple[str, ...] = ("jansen", "homma", "janon", "glen_isaacs", "saltelli")
TARGET_SCORES: tuple[str, ...] = ("auto", "probability", "logit", "log_odds")
PERTURBATIONS: tuple[str, ...] = ("inpainting", "blur", "amplitude")
BASELINES: tuple[str, ...] = ("input_zero", "black", "mean_colour", "blur")
# EVA's bound propagation: CROWN-IBP (the default, never looser) or interval bounds.
BOUNDS: tuple[str, ...] = ("crown", "ibp")
# EVA's defaults (attribution.proto), for the words of a resolved EvaOptions a server left 0.
DEFAULT_EVA_EPSILON = 8 / 255


def _enum_words(enum: Any, prefix: str) -> dict[str, int]:
    """Word -> number for a proto enum's values but its UNSPECIFIED one."""
    return {
        name[len(prefix) :].lower(): number
        for name, number in enum.items()
        if not name.endswith("_UNSPECIFIED")
    }


_ESTIMATOR = _enum_words(attribution_pb2.SobolEstimator, "SOBOL_ESTIMATOR_")
_TARGET_SCORE = _enum_words(attribution_pb2.TargetScore, "TARGET_SCORE_")
_KIND = _enum_words(attribution_pb2.Perturbation.Kind, "KIND_")
_BASELINE = _enum_words(attribution_pb2.Perturbation.Baseline, "BASELINE_")
_BOUND = _enum_words(attribution_pb2.BoundMethod, "BOUND_METHOD_")
_EVA_DECISION = _enum_words(attribution_pb2.EvaDecision, "EVA_DECISION_")


def _to_proto(words: Mapping[str, int], value: str, what: str) -> int:
    if value not in words:
        raise ValueError(f"{what} must be one of {', '.join(words)}, got {value!r}")
    return words[value]


def _from_proto(words: Mapping[str, int], number: int, default: str) -> str:
    """The word of an enum number; the contract's default for UNSPECIFIED (or an unknown one)."""
    return next((word for word, value in words.items() if value == number), default)


def estimator_to_proto(value: str) -> int:
    return _to_proto(_ESTIMATOR, value, "estimator")


def target_score_to_proto(value: str) -> int:
    """ "auto" (UNSPECIFIED): the server explains the logit of a logits model, else the
    probability, and says which it chose."""
    if value == "auto":
        return attribution_pb2.TARGET_SCORE_UNSPECIFIED
    return _to_proto(_TARGET_SCORE, value, "target_score")


def target_score_from_proto(number: int) -> TargetScore:
    return _from_proto(_TARGET_SCORE, number, "probability")  # type: ignore[return-value]


def perturbation_to_proto(kind: str, baseline: str, blur_sigma: float) -> Any:
    if not blur_sigma >= 0:
        raise ValueError(f"blur_sigma must be >= 0 (0: the default), got {blur_sigma}")
    return attribution_pb2.Perturbation(
        kind=_to_proto(_KIND, kind, "perturbation"),
        baseline=baseline_to_proto(baseline),
        blur_sigma=blur_sigma,
    )


def baseline_to_proto(value: str) -> int:
    return _to_proto(_BASELINE, value, "baseline")


def bound_to_proto(value: str | None) -> int:
    """None (UNSPECIFIED): the server's default, crown."""
    if value is None:
        return attribution_pb2.BOUND_METHOD_UNSPECIFIED
    return _to_proto(_BOUND, value, "bound")


def _float32_word(value: float) -> float:
    """A float32 from the wire spelled as the float32 it was (0.3, not 0.30000001192092896)."""
    return float(str(np.float32(value)))


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def map_to_proto(values: npt.ArrayLike, what: str = "explanation") -> Any:
    """An ``AttributionMap`` from a finite 2-D array (row-major, float32 on the wire)."""
    array = np.asarray(values)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{what} must be a non-empty HxW array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"{what} must hold real numbers, got {array.dtype}")
    array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} holds NaN or infinite values (or values beyond float32)")
    height, width = array.shape
    return attribution_pb2.AttributionMap(height=height, width=width, values=array.ravel().tolist())


def map_from_proto(msg: Any, what: str = "map") -> npt.NDArray[np.float32]:
    """The [height, width] float32 array (read-only) of an ``AttributionMap``; ``ValueError``
    when its values do not fill it."""
    values = np.array(msg.values, dtype=np.float32)
    if values.size != msg.height * msg.width:
        raise ValueError(
            f"{what}: {values.size} values for {msg.height} x {msg.width}; the server sent a "
            "malformed map"
        )
    return _readonly(values.reshape(msg.height, msg.width))


@dataclass(frozen=True)
class SobolOptions:
    """Sobol attribution's options as the server resolved them (defaults filled in)."""

    grid_size: int
    nb_design: int
    estimator: str
    per_channel: bool
    # An Owen-scrambled design seeded by the request's seed (default: Xplique's unscrambled one).
    scrambled: bool = False

    @classmethod
    def from_proto(cls, msg: Any) -> SobolOptions:
        return cls(
            grid_size=msg.grid_size,
            nb_design=msg.nb_design,
            estimator=_from_proto(_ESTIMATOR, msg.estimator, "jansen"),
            per_channel=msg.per_channel,
            scrambled=msg.scrambled,
        )

    def describe(self) -> str:
        """E.g. "grid 8, N 32, jansen": how the CLI and reports state the options."""
        text = f"grid {self.grid_size}, N {self.nb_design}, {self.estimator}"
        text += ", per channel" if self.per_channel else ""
        return text + (", scrambled" if self.scrambled else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class RiseOptions:
    """RISE's options as the server resolved them."""

    grid_size: int
    nb_samples: int
    preservation_probability: float

    @classmethod
    def from_proto(cls, msg: Any) -> RiseOptions:
        probability = (
            msg.preservation_probability if msg.HasField("preservation_probability") else 0.5
        )
        return cls(
            grid_size=msg.grid_size,
            nb_samples=msg.nb_samples,
            # float32 on the wire: spelled as the float32 it was (0.3, not 0.30000001192092896).
            preservation_probability=float(str(np.float32(probability))),
        )

    def describe(self) -> str:
        return (
            f"grid {self.grid_size}, {self.nb_samples} masks, "
            f"kept with p {self.preservation_probability:g}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class EvaOptions:
    """EVA's options as the server resolved them: ``epsilon`` a fraction of the pixel range,
    ``hybrid_layer`` empty when verified from the input (guaranteed)."""

    grid_size: int
    epsilon: float
    bound: str
    hybrid_layer: str
    samples: int

    @classmethod
    def from_proto(cls, msg: Any) -> EvaOptions:
        epsilon = msg.epsilon if msg.HasField("epsilon") else DEFAULT_EVA_EPSILON
        return cls(
            grid_size=msg.grid_size,
            epsilon=_float32_word(epsilon),
            bound=_from_proto(_BOUND, msg.bound, "crown"),
            hybrid_layer=msg.hybrid_layer,
            samples=msg.samples,
        )

    def describe(self) -> str:
        """E.g. "grid 8, eps 0.03137, crown, verified" or "..., hybrid from features.3"."""
        mode = f"hybrid from {self.hybrid_layer}" if self.hybrid_layer else "verified"
        return (
            f"grid {self.grid_size}, eps {self.epsilon:.4g}, {self.bound}, {mode}, "
            f"{self.samples} samples"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True, eq=False)
class EvaResult:
    """What an EVA map rests on (docs/eva.md).

    ``guaranteed``: verified from the input; False for a hybrid from ``hybrid_layer``, whose
    sampled layer box may miss the true range. ``overlap_bound`` bounds the adversarial overlap
    (max over the ball of another class's logit minus the target's) from above,
    ``sampled_overlap`` from below (the sampled points and an attack's iterates): when
    ``guaranteed``, the true overlap lies between.
    ``region_bounds`` float64 [g, g] (read-only): the bound with each cell held fixed; the map is
    ``overlap_bound - region_bounds``. ``certified``: ``guaranteed`` and ``overlap_bound < 0``, no
    input of the ball makes another class reach the target. ``epsilon`` is a fraction of the pixel range,
    ``epsilon_input`` the radius per input channel in the model's input units.
    """

    guaranteed: bool
    bound: str
    epsilon: float
    epsilon_input: tuple[float, ...]
    hybrid_layer: str
    overlap_bound: float
    adversary_class: int
    adversary_label: str
    sampled_overlap: float
    samples: int
    region_bounds: npt.NDArray[np.float64]
    certified: bool
    bound_passes: int
    sample_passes: int
    # What the two overlaps decide (the server decides, once for every client):
    # certified, not_robust or undecided; ``verdict`` says it in words, with why.
    decision: Literal["certified", "not_robust", "undecided"]
    verdict: str

    @classmethod
    def from_proto(cls, msg: Any, grid_shape: tuple[int, ...]) -> EvaResult:
        """``ValueError`` when ``region_bounds`` does not fill the grid."""
        values = np.array(msg.region_bounds, dtype=np.float64)
        if values.size != int(np.prod(grid_shape)):
            raise ValueError(
                f"eva.region_bounds: {values.size} values for a {' x '.join(map(str, grid_shape))}"
                " grid; the server sent a malformed result"
            )
        return cls(
            guaranteed=msg.guaranteed,
            bound=_from_proto(_BOUND, msg.bound, "crown"),
            epsilon=msg.epsilon,
            epsilon_input=tuple(msg.epsilon_input),
            hybrid_layer=msg.hybrid_layer,
            overlap_bound=msg.overlap_bound,
            adversary_class=msg.adversary_class,
            adversary_label=msg.adversary_label,
            sampled_overlap=msg.sampled_overlap,
            samples=msg.samples,
            region_bounds=_readonly(values.reshape(grid_shape)),
            certified=msg.certified,
            bound_passes=msg.bound_passes,
            sample_passes=msg.sample_passes,
            decision=_from_proto(_EVA_DECISION, msg.decision, "undecided"),  # type: ignore[arg-type]
            verdict=msg.verdict,
        )

    @property
    def guarantee(self) -> str:
        """The guarantee in words, as the CLI and the reports state it."""
        if self.guaranteed:
            return "verified (guaranteed)"
        return f"hybrid from {self.hybrid_layer}: NOT guaranteed"

    def to_dict(self) -> dict[str, Any]:
        result = dataclass_dict(self, skip=("region_bounds",))
        result["region_bounds"] = [
            [finite_or_none(float(value)) for value in row] for row in self.region_bounds
        ]
        return result

    __hash__ = None  # type: ignore[assignment]  # holds an array

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EvaResult):
            return NotImplemented
        return self.to_dict() == other.to_dict()


@dataclass(frozen=True)
class PerturbationSettings:
    """How masked-out pixels were replaced."""

    kind: str
    baseline: str
    blur_sigma: float

    @classmethod
    def from_proto(cls, msg: Any) -> PerturbationSettings:
        return cls(
            kind=_from_proto(_KIND, msg.kind, "inpainting"),
            baseline=_from_proto(_BASELINE, msg.baseline, "input_zero"),
            blur_sigma=float(str(np.float32(msg.blur_sigma))),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class AttributionProgress:
    """``done`` of ``total`` forward passes of an Attribute or EvaluateAttribution call."""

    request_id: str
    done: int
    total: int

    @classmethod
    def from_proto(cls, msg: Any, request_id: str = "") -> AttributionProgress:
        return cls(request_id, msg.forward_passes_done, msg.forward_passes_total)


@dataclass(frozen=True, eq=False)
class Attribution:
    """One attribution map and the plan that produced it.

    ``map`` is float32 [H, W] at the image's size; ``grid`` float32 [g, g] over the model's
    input (Sobol: total-order indices, summed over channels when per-channel); ``channel_grid``
    float32 [g, g, 3] for per-channel Sobol, else None. Arrays are read-only. ``options`` are the
    method's resolved options; ``forward_passes`` is 0 when the map came from the cache.
    ``eva`` is what an EVA map rests on (its bounds and whether they are guaranteed), None for
    the other methods.
    """

    request_id: str
    method: str
    map: npt.NDArray[np.float32]
    grid: npt.NDArray[np.float32]
    channel_grid: npt.NDArray[np.float32] | None
    options: SobolOptions | RiseOptions | EvaOptions
    perturbation: PerturbationSettings | None  # None for EVA, which perturbs nothing
    perturbation_description: str
    target_score: str
    target_class: int
    target_label: str
    original_score: float
    forward_passes: int
    planned_forward_passes: int
    planned_forward_passes_total: int
    cache_hit: bool
    total_ms: float
    model_version: str
    preprocessing: Preprocessing = Preprocessing()
    preprocessing_sources: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    eva: EvaResult | None = None

    @classmethod
    def from_events(
        cls, request_id: str, accepted: Any, result: Any
    ) -> Attribution:  # AttributeAccepted, AttributionResult
        """The attribution of a finished stream; ``ValueError`` when its maps are malformed."""
        method = accepted.method or "sobol"
        options: SobolOptions | RiseOptions | EvaOptions
        if method == "rise":
            options = RiseOptions.from_proto(accepted.rise)
        elif method == "eva":
            options = EvaOptions.from_proto(accepted.eva)
        else:
            options = SobolOptions.from_proto(accepted.sobol)
        grid = map_from_proto(result.grid, "grid")
        if method == "eva" and not result.HasField("eva"):
            raise ValueError(
                "an EVA map without its bounds (eva); the server sent a malformed result"
            )
        eva = EvaResult.from_proto(result.eva, grid.shape) if method == "eva" else None
        channel_grid = None
        if len(result.channel_grid):
            values = np.array(result.channel_grid, dtype=np.float32)
            if values.size != grid.size * 3:
                raise ValueError(
                    f"channel_grid: {values.size} values for a {grid.shape[0]} x "
                    f"{grid.shape[1]} x 3 grid; the server sent a malformed map"
                )
            channel_grid = _readonly(values.reshape(*grid.shape, 3))
        return cls(
            request_id=request_id,
            method=method,
            map=map_from_proto(result.map),
            grid=grid,
            channel_grid=channel_grid,
            options=options,
            perturbation=None
            if method == "eva"
            else PerturbationSettings.from_proto(accepted.perturbation),
            perturbation_description=accepted.perturbation_description,
            target_score=target_score_from_proto(result.target_score or accepted.target_score),
            target_class=result.target_class,
            target_label=result.target_label or accepted.target_label,
            original_score=result.original_score,
            forward_passes=result.forward_passes,
            planned_forward_passes=accepted.planned_forward_passes,
            planned_forward_passes_total=accepted.planned_forward_passes_total,
            cache_hit=result.cache_hit,
            total_ms=result.total_ms,
            model_version=accepted.model_version,
            preprocessing=Preprocessing.from_proto(accepted.preprocessing),
            preprocessing_sources=tuple(accepted.preprocessing_sources),
            # once each: the result repeats some of the plan's (EVA's hybrid caveat)
            warnings=tuple(dict.fromkeys((*accepted.warnings, *result.warnings))),
            eva=eva,
        )

    def plan_dict(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-ready: what the CLI writes next to the map (no
        perturbation for EVA, which has none)."""
        unset = ("perturbation",) if self.perturbation is None else ()
        return dataclass_dict(self, skip=("map", "grid", "channel_grid", *unset))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, the arrays as nested lists (float32 values spelled as such)."""
        result = self.plan_dict()
        result["map"] = float32_lists(self.map)
        result["grid"] = float32_lists(self.grid)
        if self.channel_grid is not None:
            result["channel_grid"] = float32_lists(self.channel_grid)
        return result

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Attribution):
            return NotImplemented
        arrays = ("map", "grid", "channel_grid")
        return self.plan_dict() == other.plan_dict() and all(
            _same_array(getattr(self, name), getattr(other, name)) for name in arrays
        )


def _same_array(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(a, b))


def float32_lists(array: np.ndarray) -> Any:
    """Nested lists of the shortest spellings of float32 values (0.1, not 0.10000000149)."""
    if array.ndim == 0:
        return finite_or_none(float(str(np.float32(array))))
    return [float32_lists(item) for item in array]


def _doubles(values: Any) -> npt.NDArray[np.float64]:
    return _readonly(np.array(values, dtype=np.float64))


@dataclass(frozen=True, eq=False)
class MetricResult:
    """One fidelity metric's number and the samples behind it (float64, read-only arrays).

    ``value``: area under the curve (deletion, insertion), Spearman correlation (mu_fidelity),
    mean distance (stability). ``fractions`` / ``scores`` are the deletion or insertion curve,
    ``attribution_sums`` / ``score_drops`` MuFidelity's subsets, ``distances`` stability's
    noisy maps; the arrays a metric does not have are empty. ``settings`` says, in words, what
    the value depends on: a number without its settings cannot be compared.
    """

    metric: str
    value: float
    settings: str
    target_score: str
    forward_passes: int
    fractions: npt.NDArray[np.float64] = field(default_factory=lambda: _doubles(()))
    scores: npt.NDArray[np.float64] = field(default_factory=lambda: _doubles(()))
    attribution_sums: npt.NDArray[np.float64] = field(default_factory=lambda: _doubles(()))
    score_drops: npt.NDArray[np.float64] = field(default_factory=lambda: _doubles(()))
    distances: npt.NDArray[np.float64] = field(default_factory=lambda: _doubles(()))
    # What makes the value hard to read (a constant map, an undefined correlation).
    warnings: tuple[str, ...] = ()

    _ARRAYS = ("fractions", "scores", "attribution_sums", "score_drops", "distances")

    @classmethod
    def from_proto(cls, msg: Any) -> MetricResult:
        return cls(
            metric=msg.metric,
            value=msg.value,
            settings=msg.settings,
            target_score=target_score_from_proto(msg.target_score),
            forward_passes=msg.forward_passes,
            warnings=tuple(msg.warnings),
            **{name: _doubles(getattr(msg, name)) for name in cls._ARRAYS},
        )

    def to_dict(self) -> dict[str, Any]:
        result = dataclass_dict(self, skip=self._ARRAYS)
        for name in self._ARRAYS:
            result[name] = [finite_or_none(float(v)) for v in getattr(self, name)]
        return result

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MetricResult):
            return NotImplemented
        return self.to_dict() == other.to_dict()


@dataclass(frozen=True)
class Evaluation:
    """The fidelity of one attribution map: the plan the server accepted and one
    ``MetricResult`` per metric, in the order the server computed them."""

    request_id: str
    metrics: tuple[str, ...]
    results: tuple[MetricResult, ...]
    model_version: str
    planned_forward_passes: int
    target_class: int
    target_label: str
    target_score: str
    preprocessing: Preprocessing = Preprocessing()
    preprocessing_sources: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    eva: EvaResult | None = None

    @classmethod
    def from_events(
        cls, request_id: str, accepted: Any, results: list[MetricResult]
    ) -> Evaluation:  # EvaluationAccepted
        return cls(
            request_id=request_id,
            metrics=tuple(accepted.metrics),
            results=tuple(results),
            model_version=accepted.model_version,
            planned_forward_passes=accepted.planned_forward_passes,
            target_class=accepted.target_class,
            target_label=accepted.target_label,
            target_score=target_score_from_proto(accepted.target_score),
            preprocessing=Preprocessing.from_proto(accepted.preprocessing),
            preprocessing_sources=tuple(accepted.preprocessing_sources),
            warnings=tuple(accepted.warnings),
        )

    def __getitem__(self, metric: str) -> MetricResult:
        """The result of ``metric`` ("deletion", ...); ``KeyError`` when it was not computed."""
        for result in self.results:
            if result.metric == metric:
                return result
        raise KeyError(f"no {metric!r} result; computed: {', '.join(self.metrics)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)
