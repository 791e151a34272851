"""MeGe and ReCo: the typed result of ``Client.evaluate_consistency`` (EvaluateConsistency),
folded from its stream, and the request its arguments build (docs/consistency.md)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from propscope._errors import PropscopeError
from propscope._images import ImageLike, encode_image
from propscope._json import dataclass_dict
from propscope._requests import Metadata, build_model_ref
from propscope.v1 import attribution_pb2, consistency_pb2, consistency_pb2_grpc, explain_pb2

__all__ = [
    "EXPLAINERS",
    "ConsistencyCalls",
    "ConsistencyModel",
    "ConsistencyProgress",
    "ConsistencyResult",
    "ExplainerConsistency",
    "build_consistency_request",
]

EXPLAINERS: tuple[str, ...] = ("sobol", "rise", "saliency", "gradient_x_input", "random")
_TARGET_SCORES = {
    "": attribution_pb2.TARGET_SCORE_UNSPECIFIED,
    "logit": attribution_pb2.TARGET_SCORE_LOGIT,
    "log_odds": attribution_pb2.TARGET_SCORE_LOG_ODDS,
    "probability": attribution_pb2.TARGET_SCORE_PROBABILITY,
}


def _explainer_value(name: str) -> int:
    if name not in EXPLAINERS:
        raise ValueError(f"explainer {name!r} is not one of {', '.join(EXPLAINERS)}")
    return consistency_pb2.ConsistencyExplainer.Value(f"CONSISTENCY_EXPLAINER_{name.upper()}")


def _explainer_name(value: int) -> str:
    return (
        consistency_pb2.ConsistencyExplainer.Name(value)
        .removeprefix("CONSISTENCY_EXPLAINER_")
        .lower()
    )


def _optional(message: Any, field: str) -> float | None:
    return getattr(message, field) if message.HasField(field) else None


class _Record:
    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class ConsistencyProgress(_Record):
    """Forward and gradient passes done of the planned ones, and the explainer running."""

    request_id: str
    done: int
    planned: int
    explainer: str


@dataclass(frozen=True)
class ConsistencyModel(_Record):
    name: str
    version: str
    predicted_classes: tuple[int, ...]
    accuracy: float | None  # None without labels


@dataclass(frozen=True)
class ExplainerConsistency(_Record):
    """One explainer's scores; ``mege`` and ``reco`` are None where undefined (the
    warnings say why: no agreeing, or no disagreeing, pair)."""

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

    @classmethod
    def from_proto(cls, message: consistency_pb2.ExplainerConsistency) -> ExplainerConsistency:
        return cls(
            explainer=_explainer_name(message.explainer),
            mege=_optional(message, "mege"),
            reco=_optional(message, "reco"),
            mean_distance_agreeing=_optional(message, "mean_distance_agreeing"),
            mean_distance_disagreeing=_optional(message, "mean_distance_disagreeing"),
            agreeing_pairs=message.agreeing_pair_count,
            disagreeing_pairs=message.disagreeing_pair_count,
            both_wrong_pairs=message.both_wrong_pair_count,
            undefined_pairs=message.undefined_pair_count,
            seconds=message.seconds,
            warnings=tuple(message.warnings),
        )


@dataclass(frozen=True)
class ConsistencyResult(_Record):
    request_id: str
    models: tuple[ConsistencyModel, ...]
    explainers: tuple[ExplainerConsistency, ...]
    image_count: int
    labels_given: bool
    planned_passes: int
    passes: int
    total_s: float
    warnings: tuple[str, ...]

    def explainer(self, name: str) -> ExplainerConsistency:
        """The scores of explainer ``name``; KeyError when it was not run."""
        for result in self.explainers:
            if result.explainer == name:
                return result
        raise KeyError(
            f"{name} was not run; run: {', '.join(r.explainer for r in self.explainers)}"
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


class ConsistencyCollector:
    """Folds an EvaluateConsistency stream into one ``ConsistencyResult``."""

    def __init__(
        self, request_id: str, on_progress: Callable[[ConsistencyProgress], None] | None = None
    ) -> None:
        self._request_id = request_id
        self._on_progress = on_progress
        self._accepted: consistency_pb2.ConsistencyAccepted | None = None
        self._done: consistency_pb2.ConsistencyDone | None = None

    def add(self, message: consistency_pb2.EvaluateConsistencyEvent) -> None:
        self._request_id = message.request_id or self._request_id
        kind = message.WhichOneof("event")
        if kind == "accepted":
            self._accepted = message.accepted
        elif kind == "progress" and self._on_progress is not None:
            progress = message.progress
            explainer = _explainer_name(progress.explainer) if progress.explainer else ""
            self._on_progress(
                ConsistencyProgress(
                    self._request_id,
                    progress.done_pass_count,
                    progress.planned_pass_count,
                    explainer,
                )
            )
        elif kind == "done":
            self._done = message.done

    def result(self) -> ConsistencyResult:
        accepted, done = self._accepted, self._done
        if accepted is None or done is None:
            raise PropscopeError(
                grpc.StatusCode.INTERNAL,
                "the EvaluateConsistency stream ended without its plan and its end "
                "(ConsistencyAccepted and ConsistencyDone; a server fault)",
            )
        return ConsistencyResult(
            request_id=self._request_id,
            models=tuple(
                ConsistencyModel(
                    m.name, m.version, tuple(m.predicted_classes), _optional(m, "accuracy")
                )
                for m in done.models
            ),
            explainers=tuple(ExplainerConsistency.from_proto(e) for e in done.explainers),
            image_count=accepted.image_count,
            labels_given=accepted.labels_given,
            planned_passes=accepted.planned_pass_count,
            passes=done.pass_count,
            total_s=done.total_s,
            # The plan's warnings come in both events: each once.
            warnings=tuple(dict.fromkeys((*accepted.warnings, *done.warnings))),
        )


def _model_ref(model: str | tuple[str, str]) -> explain_pb2.ModelRef:
    """``"name"``, ``"name:version"`` or ``(name, version)``."""
    if isinstance(model, tuple):
        name, version = model
    else:
        name, _, version = model.partition(":")
    return build_model_ref(name, model_version=version)


def build_consistency_request(
    images: Sequence[ImageLike],
    models: Sequence[str | tuple[str, str]],
    *,
    explainers: Sequence[str] = (),
    labels: Sequence[int] | None = None,
    sobol_grid: int = 0,
    sobol_nb_design: int = 0,
    rise_grid: int = 0,
    rise_samples: int = 0,
    target_score: str = "",
    seed: int = 0,
    request_id: str = "",
) -> consistency_pb2.EvaluateConsistencyRequest:
    """The request for ``Client.evaluate_consistency``'s arguments (0: the server's default)."""
    if isinstance(models, str):
        raise TypeError("models must be a sequence of model names (name or name:version)")
    if target_score not in _TARGET_SCORES:
        raise ValueError(f"target_score must be one of {', '.join(_TARGET_SCORES)}")
    return consistency_pb2.EvaluateConsistencyRequest(
        request_id=request_id,
        models=[_model_ref(model) for model in models],
        explainers=[_explainer_value(name) for name in explainers],
        images=[encode_image(image) for image in images],
        labels=list(labels or ()),
        sobol=attribution_pb2.SobolOptions(grid_size=sobol_grid, nb_design=sobol_nb_design),
        rise=attribution_pb2.RiseOptions(grid_size=rise_grid, nb_samples=rise_samples),
        target_score=_TARGET_SCORES[target_score],
        seed=seed,
    )


ResultT = TypeVar("ResultT")


class ConsistencyCalls(Generic[ResultT]):
    """The ConsistencyService call of ``Client`` (a value) and ``AsyncClient`` (an
    awaitable); it uses the client's channel, deadlines, metadata and error mapping."""

    _channel: Any

    def evaluate_consistency(
        self,
        images: Sequence[ImageLike],
        models: Sequence[str | tuple[str, str]],
        *,
        explainers: Sequence[str] = (),
        labels: Sequence[int] | None = None,
        sobol_grid: int = 0,
        sobol_nb_design: int = 0,
        rise_grid: int = 0,
        rise_samples: int = 0,
        target_score: str = "",
        seed: int = 0,
        request_id: str = "",
        on_progress: Callable[[ConsistencyProgress], None] | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> ResultT:
        """MeGe and ReCo (Fel et al., WACV 2022) of ``explainers`` (empty: every one all the
        models serve; names in ``EXPLAINERS``) across ``models`` (at least 2, ``"name"`` or
        ``"name:version"``, e.g. the fold versions ``synth_patch_folds:1`` .. ``:4``) on
        ``images`` (at least 2). ``labels`` (one class per image) switch the pairs to
        Xplique's rule (both right: agreeing, one right: disagreeing). 0 and "": the server's
        defaults. Returns one ``ConsistencyResult`` (``AsyncClient``: an awaitable of it); a
        black-box model asked for saliency or gradient_x_input is refused (``PropscopeError``
        FAILED_PRECONDITION naming gradients)."""
        self._check_open()  # type: ignore[attr-defined]
        request = build_consistency_request(
            images,
            models,
            explainers=explainers,
            labels=labels,
            sobol_grid=sobol_grid,
            sobol_nb_design=sobol_nb_design,
            rise_grid=rise_grid,
            rise_samples=rise_samples,
            target_score=target_score,
            seed=seed,
            request_id=request_id,
        )
        call = consistency_pb2_grpc.ConsistencyServiceStub(self._channel).EvaluateConsistency(
            request,
            **self._call_options(timeout, metadata),  # type: ignore[attr-defined]
        )
        return self._collect(call, ConsistencyCollector(request_id, on_progress))  # type: ignore[attr-defined]
