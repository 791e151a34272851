"""Typed, immutable mirrors of the events Explain streams, and of ListModels' models.

Every ``to_dict()`` returns plain JSON-ready values: numpy arrays become lists, non-finite floats
become ``None`` (strict JSON has no NaN), float32 curve values are written with their shortest
float32 spelling (0.1, not 0.10000000149011612), and ``SampleResult.path_images`` appears as a
list of base64 strings only when the server returned images (``return_path_images``); the key is
left out otherwise.
"""

from __future__ import annotations

import base64
import enum
from dataclasses import dataclass, fields
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from propscope._errors import status_code_from_int
from propscope._graph import GraphLayer
from propscope._json import dataclass_dict, finite_or_none
from propscope._preprocessing import PathMode, Preprocessing, path_mode_from_proto
from propscope.v1 import explain_pb2

__all__ = [
    "Accepted",
    "Decision",
    "Done",
    "EditorParameter",
    "Event",
    "ModelInfo",
    "ModelRole",
    "Progress",
    "PropertyResult",
    "SampleResult",
    "TensorInfo",
    "event_from_proto",
]


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _copy_fields(cls: type, msg: Any, request_id: str) -> Any:
    """An event whose fields mirror the message's scalars (repeated fields become tuples)."""
    values = {f.name: getattr(msg, f.name) for f in fields(cls) if f.name != "request_id"}
    values = {k: tuple(v) if not isinstance(v, str | int | float) else v for k, v in values.items()}
    return cls(request_id=request_id, **values)


@dataclass(frozen=True)
class Accepted:
    """The plan, sent before any work starts."""

    request_id: str
    property_names: tuple[str, ...]
    samples: int
    steps: int
    permutations: int
    alpha: float
    model_version: str
    planned_edits: int
    planned_classifications: int
    min_probability_change: float
    # "adaptive" or "fixed", and the longest path an adaptive property may grow to.
    path_mode: PathMode = "adaptive"
    max_steps: int = 0
    # The preprocessing applied (every field resolved), where each field came from, e.g.
    # "mean: model config", and what the service could not be sure of, in words.
    preprocessing: Preprocessing = Preprocessing()
    preprocessing_sources: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # The class names in use (empty when the model declares none).
    class_labels: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, msg: explain_pb2.Accepted, request_id: str = "") -> Accepted:
        return cls(
            request_id=request_id,
            property_names=tuple(msg.property_names),
            samples=msg.samples,
            steps=msg.steps,
            permutations=msg.permutations,
            alpha=msg.alpha,
            model_version=msg.model_version,
            planned_edits=msg.planned_edits,
            planned_classifications=msg.planned_classifications,
            min_probability_change=msg.min_probability_change,
            path_mode=path_mode_from_proto(msg.path_mode),
            max_steps=msg.max_steps,
            preprocessing=Preprocessing.from_proto(msg.preprocessing),
            preprocessing_sources=tuple(msg.preprocessing_sources),
            warnings=tuple(msg.warnings),
            class_labels=tuple(msg.class_labels),
        )

    def class_name(self, index: int) -> str | None:
        """The name of class ``index``, when labels are known."""
        return self.class_labels[index] if 0 <= index < len(self.class_labels) else None

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class Progress:
    """How far one property has come: ``completed`` of ``total`` images edited (``stage``
    "edit": sent as the editor works; an adaptive property's total grows) or paths
    classified ("classify"). The proto's ``Progress`` comment has the details."""

    request_id: str
    stage: str
    property_name: str
    completed: int
    total: int

    @classmethod
    def from_proto(cls, msg: explain_pb2.Progress, request_id: str = "") -> Progress:
        return _copy_fields(cls, msg, request_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True, eq=False)
class SampleResult:
    """One sample's path: ``prediction_curve`` (float64, read-only, the target class's
    probability x_0..x_N) and ``predicted_classes`` (int64, read-only, the argmax class)."""

    seed: int
    score: float
    p_value: float
    prediction_curve: npt.NDArray[np.float64]
    predicted_classes: npt.NDArray[np.int64]
    cache_hit: bool
    path_images: tuple[bytes, ...] = ()

    @classmethod
    def from_proto(cls, msg: explain_pb2.SampleResult) -> SampleResult:
        return cls(
            seed=msg.seed,
            score=msg.score,
            p_value=msg.p_value,
            prediction_curve=_readonly(np.array(msg.prediction_curve, dtype=np.float64)),
            predicted_classes=_readonly(np.array(msg.predicted_classes, dtype=np.int64)),
            cache_hit=msg.cache_hit,
            path_images=tuple(msg.path_images),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SampleResult):
            return NotImplemented
        return (
            self.seed == other.seed
            and self.score == other.score
            and self.p_value == other.p_value
            and np.array_equal(self.prediction_curve, other.prediction_curve)
            and np.array_equal(self.predicted_classes, other.predicted_classes)
            and self.cache_hit == other.cache_hit
            and self.path_images == other.path_images
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "seed": self.seed,
            "score": finite_or_none(self.score),
            "p_value": finite_or_none(self.p_value),
            # float32 on the wire: spell each value as the float32 it was.
            "prediction_curve": [
                finite_or_none(float(str(value)))
                for value in self.prediction_curve.astype(np.float32)
            ],
            "predicted_classes": self.predicted_classes.tolist(),
            "cache_hit": self.cache_hit,
        }
        if self.path_images:
            result["path_images"] = [
                base64.b64encode(image).decode("ascii") for image in self.path_images
            ]
        return result


class Decision(enum.Enum):
    """Why a property is or is not relevant."""

    UNSPECIFIED = "unspecified"
    # Significant, and p changes by at least min_probability_change.
    RELEVANT = "relevant"
    # p changes enough, but not in an orderly way along the path (p_value >= alpha).
    NOT_SIGNIFICANT = "not_significant"
    # p changes by less than min_probability_change.
    CHANGE_TOO_SMALL = "change_too_small"
    # p changes enough, but no ordering of these values could reach alpha at this N: the test
    # could not decide (a longer path may).
    CANNOT_REACH_ALPHA = "cannot_reach_alpha"

    @classmethod
    def from_proto(cls, value: int) -> Decision:
        names = {
            explain_pb2.DECISION_RELEVANT: cls.RELEVANT,
            explain_pb2.DECISION_NOT_SIGNIFICANT: cls.NOT_SIGNIFICANT,
            explain_pb2.DECISION_CHANGE_TOO_SMALL: cls.CHANGE_TOO_SMALL,
            explain_pb2.DECISION_CANNOT_REACH_ALPHA: cls.CANNOT_REACH_ALPHA,
        }
        return names.get(value, cls.UNSPECIFIED)


@dataclass(frozen=True)
class PropertyResult:
    """One property's result. ``ok`` is False when the property failed (``status_code`` is not
    OK); ``error`` then holds the server's message and the scores are meaningless.
    ``significant`` says p changes in an orderly way along the path, however little;
    ``relevant`` adds that it changes by at least the request's ``min_probability_change``.
    ``pearson_correlation`` and ``mutual_information`` are None where undefined. ``decision``
    says why the property is or is not relevant (``decision_detail`` in words, with numbers);
    ``steps`` is the path length it was decided on (adaptive paths may be longer than the
    request's) and ``edits`` the edited images it cost, every length tried included."""

    request_id: str
    property_name: str
    status_code: grpc.StatusCode
    error: str | None
    score: float
    score_per_unit_strength: float
    score_ci_low: float
    score_ci_high: float
    p_value: float
    significant: bool
    prediction_flipped: bool
    flip_rate: float
    mean_signed_gradient: float
    probability_change: float
    relevant: bool
    pearson_correlation: float | None
    mutual_information: float | None
    target_class: int
    samples: tuple[SampleResult, ...]
    cache_hits: int
    cache_misses: int
    steps: int = 0
    decision: Decision = Decision.UNSPECIFIED
    decision_detail: str = ""
    warnings: tuple[str, ...] = ()
    # The target class's name, when class labels are known.
    target_label: str = ""
    edits: int = 0

    @property
    def ok(self) -> bool:
        return self.status_code == grpc.StatusCode.OK

    @classmethod
    def from_proto(cls, msg: explain_pb2.PropertyResult, request_id: str = "") -> PropertyResult:
        # An unset status reads as code 0: OK.
        code = status_code_from_int(msg.status.code)
        error = None if code == grpc.StatusCode.OK else (msg.status.message or code.name)
        return cls(
            request_id=request_id,
            property_name=msg.property_name,
            status_code=code,
            error=error,
            score=msg.score,
            score_per_unit_strength=msg.score_per_unit_strength,
            score_ci_low=msg.score_ci_low,
            score_ci_high=msg.score_ci_high,
            p_value=msg.p_value,
            significant=msg.significant,
            prediction_flipped=msg.prediction_flipped,
            flip_rate=msg.flip_rate,
            mean_signed_gradient=msg.mean_signed_gradient,
            probability_change=msg.probability_change,
            relevant=msg.relevant,
            pearson_correlation=(
                msg.pearson_correlation if msg.HasField("pearson_correlation") else None
            ),
            mutual_information=(
                msg.mutual_information if msg.HasField("mutual_information") else None
            ),
            target_class=msg.target_class,
            samples=tuple(SampleResult.from_proto(s) for s in msg.samples),
            cache_hits=msg.cache_hits,
            cache_misses=msg.cache_misses,
            steps=msg.steps,
            decision=Decision.from_proto(msg.decision),
            decision_detail=msg.decision_detail,
            warnings=tuple(msg.warnings),
            target_label=msg.target_label,
            edits=msg.edits,
        )

    def to_dict(self) -> dict[str, Any]:
        result = dataclass_dict(self)
        result["status_code"] = self.status_code.name
        result["ok"] = self.ok
        return result


@dataclass(frozen=True)
class Done:
    """The last event: timings in milliseconds and how many properties failed."""

    request_id: str
    total_ms: float
    edit_ms: float
    classify_ms: float
    score_ms: float
    cache_ms: float
    properties_failed: int

    @classmethod
    def from_proto(cls, msg: explain_pb2.Done, request_id: str = "") -> Done:
        return _copy_fields(cls, msg, request_id)

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


Event = Accepted | Progress | PropertyResult | Done
"""Any event of an Explain stream."""


def event_from_proto(msg: explain_pb2.ExplainEvent) -> Event:
    """The typed event of an ``ExplainEvent``; ``ValueError`` when it holds none this SDK knows
    (for instance an event type added to the contract after this SDK was built)."""
    kind = msg.WhichOneof("event")
    if kind == "accepted":
        return Accepted.from_proto(msg.accepted, msg.request_id)
    if kind == "progress":
        return Progress.from_proto(msg.progress, msg.request_id)
    if kind == "property_result":
        return PropertyResult.from_proto(msg.property_result, msg.request_id)
    if kind == "done":
        return Done.from_proto(msg.done, msg.request_id)
    raise ValueError(f"ExplainEvent of request {msg.request_id!r} holds no known event")


class ModelRole(enum.Enum):
    """What a model is for propscope."""

    UNSPECIFIED = "unspecified"
    CLASSIFIER = "classifier"
    EDITOR = "editor"

    @classmethod
    def from_proto(cls, role: int) -> ModelRole:
        if role == explain_pb2.ModelInfo.ROLE_CLASSIFIER:
            return cls.CLASSIFIER
        if role == explain_pb2.ModelInfo.ROLE_EDITOR:
            return cls.EDITOR
        return cls.UNSPECIFIED


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output; ``shape`` excludes the batch dimension, -1 is variable."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_proto(cls, msg: explain_pb2.TensorInfo) -> TensorInfo:
        return cls(name=msg.name, datatype=msg.datatype, shape=tuple(msg.shape))

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class EditorParameter:
    """A parameter an editor accepts; ``choices`` is empty unless it is a choice."""

    name: str
    description: str
    default_value: str
    choices: tuple[str, ...]

    @classmethod
    def from_proto(cls, msg: explain_pb2.EditorParameter) -> EditorParameter:
        return cls(
            name=msg.name,
            description=msg.description,
            default_value=msg.default_value,
            choices=tuple(msg.choices),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class ModelInfo:
    """A classifier or editor served by the connected Triton server."""

    name: str
    versions: tuple[str, ...]
    role: ModelRole
    state: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    max_batch_size: int
    editor_parameters: tuple[EditorParameter, ...]
    description: str
    # Why the model is not READY, in Triton's words; of a READY model, the versions that
    # failed to load beside the one that serves ("version 2: <reason>").
    state_reason: str = ""
    # Classifiers: the preprocessing and class names their config.pbtxt declares.
    preprocessing: Preprocessing = Preprocessing()
    class_labels: tuple[str, ...] = ()
    # Classifiers: the explanation methods the gateway can run on them (e.g. "propgrad",
    # "sobol", "rise"); empty from a gateway older than the attribution methods.
    methods: tuple[str, ...] = ()
    # Open classifiers: their hidden layers in network order (what ``Client.graph``'s
    # ``layers`` names); empty for a black box.
    layers: tuple[GraphLayer, ...] = ()
    # The gateway loads it on its first request (setting load_on_demand): listed unloaded
    # until then, yet a request may name it.
    loads_on_demand: bool = False

    @property
    def is_classifier(self) -> bool:
        """Any model that is not an editor is a classifier (``propscope.role`` is optional)."""
        return self.role != ModelRole.EDITOR

    @classmethod
    def from_proto(cls, msg: explain_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=msg.name,
            versions=tuple(msg.versions),
            role=ModelRole.from_proto(msg.role),
            state=msg.state,
            inputs=tuple(TensorInfo.from_proto(t) for t in msg.inputs),
            outputs=tuple(TensorInfo.from_proto(t) for t in msg.outputs),
            max_batch_size=msg.max_batch_size,
            editor_parameters=tuple(EditorParameter.from_proto(p) for p in msg.editor_parameters),
            description=msg.description,
            state_reason=msg.state_reason,
            preprocessing=Preprocessing.from_proto(msg.preprocessing),
            class_labels=tuple(msg.class_labels),
            methods=tuple(msg.methods),
            layers=tuple(GraphLayer(layer.name, layer.channels) for layer in msg.layers),
            loads_on_demand=msg.loads_on_demand,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)
