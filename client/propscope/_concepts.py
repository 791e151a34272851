"""CRAFT concepts (ConceptService): the typed results of ``Client.fit_concepts``,
``concept_bank``, ``concept_maps`` and ``decompose_concept``, their requests, and the calls
themselves (``ConceptCalls``, which ``Client`` and ``AsyncClient`` inherit). docs/concepts.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from propscope._errors import PropscopeError
from propscope._images import ImageLike, encode_image
from propscope._json import JsonRecord, dataclass_dict
from propscope._preprocessing import Preprocessing
from propscope._requests import Metadata, build_model_ref
from propscope.v1 import concepts_pb2, concepts_pb2_grpc, explain_pb2

__all__ = [
    "Concept",
    "ConceptBank",
    "ConceptCalls",
    "ConceptCrop",
    "ConceptMap",
    "ConceptMaps",
    "ConceptsProgress",
]

BankT = TypeVar("BankT")
MapsT = TypeVar("MapsT")


@dataclass(frozen=True)
class ConceptsProgress:
    request_id: str
    passes_done: int
    passes_total: int


@dataclass(frozen=True)
class ConceptCrop(JsonRecord):
    """One of a concept's top crops: the image's index, its box, its coefficient, its PNG."""

    image: int
    left: int
    top: int
    width: int
    height: int
    coefficient: float
    png: bytes

    def to_dict(self) -> dict[str, Any]:
        found = dataclass_dict(self, skip=("png",))
        found["png_bytes"] = len(self.png)
        return found


@dataclass(frozen=True)
class Concept(JsonRecord):
    index: int  # its row of the bank's basis W
    sobol_total_importance: float
    logit_contribution: float
    logit_share: float
    mean_coefficient: float
    top_crops: tuple[ConceptCrop, ...]


@dataclass(frozen=True)
class ConceptBank(JsonRecord):
    """A fitted bank: its concepts ranked by Sobol importance, most important first."""

    bank_id: str
    model: str
    model_version: str
    layer: str
    channels: int
    target_class: int
    target_label: str
    rank: int
    patch_size: int
    nb_design: int
    seed: int
    images: int
    crops: int
    images_digest: str
    reconstruction_error: float
    concepts: tuple[Concept, ...]
    logit_share_exact: bool
    g_passes: int
    h_passes: int
    total_ms: float
    parent_bank_id: str
    parent_concept: int
    warnings: tuple[str, ...]
    basis: np.ndarray  # W [rank, channels]

    @classmethod
    def from_proto(cls, message: concepts_pb2.ConceptBank) -> ConceptBank:
        concepts = tuple(
            Concept(
                index=c.index,
                sobol_total_importance=c.sobol_total_importance,
                logit_contribution=c.logit_contribution,
                logit_share=c.logit_share,
                mean_coefficient=c.mean_coefficient,
                top_crops=tuple(
                    ConceptCrop(k.image, k.left, k.top, k.width, k.height, k.coefficient, k.png)
                    for k in c.top_crops
                ),
            )
            for c in message.concepts
        )
        basis = np.asarray(message.basis, dtype=np.float32)
        return cls(
            bank_id=message.bank_id,
            model=message.model,
            model_version=message.model_version,
            layer=message.layer,
            channels=message.channels,
            target_class=message.target_class,
            target_label=message.target_label,
            rank=message.rank,
            patch_size=message.patch_size,
            nb_design=message.nb_design,
            seed=message.seed,
            images=message.images,
            crops=message.crops,
            images_digest=message.images_digest,
            reconstruction_error=message.reconstruction_error,
            concepts=concepts,
            logit_share_exact=message.logit_share_exact,
            g_passes=message.g_passes,
            h_passes=message.h_passes,
            total_ms=message.total_ms,
            parent_bank_id=message.parent_bank_id,
            parent_concept=message.parent_concept,
            warnings=tuple(message.warnings),
            basis=basis.reshape(message.rank, -1) if basis.size else basis.reshape(0, 0),
        )

    def concept(self, index: int) -> Concept:
        """The concept whose row of W is ``index``."""
        for found in self.concepts:
            if found.index == index:
                return found
        raise KeyError(f"bank {self.bank_id} has no concept {index} (0..{self.rank - 1})")

    def to_dict(self) -> dict[str, Any]:
        found = dataclass_dict(self, skip=("basis",))
        found["basis"] = np.asarray(self.basis, dtype=np.float64).tolist()
        return found

    def write_crops(self, directory: str) -> list[str]:
        """Writes each concept's top crops as ``concept<index>_<rank>.png``; their paths."""
        from pathlib import Path

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for concept in self.concepts:
            for rank, crop in enumerate(concept.top_crops):
                path = folder / f"concept{concept.index}_{rank}.png"
                path.write_bytes(crop.png)
                written.append(str(path))
        return written


@dataclass(frozen=True)
class ConceptMap(JsonRecord):
    concept: int
    values: np.ndarray  # [height, width]: the concept's coefficient, resized to the image
    grid: np.ndarray  # [grid_height, grid_width]: at the layer's positions

    def to_dict(self) -> dict[str, Any]:
        return {
            "concept": self.concept,
            "values": np.asarray(self.values, dtype=np.float64).tolist(),
            "grid": np.asarray(self.grid, dtype=np.float64).tolist(),
        }


@dataclass(frozen=True)
class ConceptMaps(JsonRecord):
    bank_id: str
    height: int
    width: int
    maps: tuple[ConceptMap, ...]  # in the bank's ranked order

    @classmethod
    def from_proto(cls, message: concepts_pb2.ConceptMapsResponse) -> ConceptMaps:
        shape = (message.height, message.width)
        grid = (message.grid_height, message.grid_width)
        return cls(
            bank_id=message.bank_id,
            height=message.height,
            width=message.width,
            maps=tuple(
                ConceptMap(
                    m.concept,
                    np.asarray(m.values, dtype=np.float32).reshape(shape),
                    np.asarray(m.grid, dtype=np.float32).reshape(grid),
                )
                for m in message.maps
            ),
        )


class ConceptsCollector:
    """Folds a FitConcepts or DecomposeConcept stream into its ``ConceptBank``."""

    def __init__(
        self, request_id: str, on_progress: Callable[[ConceptsProgress], None] | None = None
    ) -> None:
        self._request_id = request_id
        self._on_progress = on_progress
        self._bank: ConceptBank | None = None

    def add(
        self, message: concepts_pb2.FitConceptsEvent | concepts_pb2.DecomposeConceptEvent
    ) -> None:
        self._request_id = message.request_id or self._request_id
        kind = message.WhichOneof("event")
        if kind == "progress" and self._on_progress is not None:
            progress = message.progress
            self._on_progress(
                ConceptsProgress(self._request_id, progress.passes_done, progress.passes_total)
            )
        elif kind == "done":
            self._bank = ConceptBank.from_proto(message.done)

    def result(self) -> ConceptBank:
        if self._bank is None:
            raise PropscopeError(
                grpc.StatusCode.INTERNAL,
                "the concepts stream ended without its ConceptBank (a server fault)",
            )
        return self._bank


def _non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0 (0: the server's default), got {value}")


def _optional_model(model: str, model_version: str) -> explain_pb2.ModelRef | None:
    if not model:
        if model_version:
            raise ValueError("model_version needs model (the bank's model name)")
        return None
    return explain_pb2.ModelRef(name=model, version=model_version)


def build_fit_concepts_request(
    images: Sequence[ImageLike],
    model: str,
    *,
    target_class: int | None = None,
    layer: str = "",
    rank: int = 0,
    patch_size: int = 0,
    nb_design: int = 0,
    seed: int = 0,
    top_crops: int = 0,
    model_version: str = "",
    model_output: str = "",
    request_id: str = "",
    preprocessing: Preprocessing | None = None,
    class_labels: Sequence[str] = (),
) -> concepts_pb2.FitConceptsRequest:
    if isinstance(images, str | bytes) or not images:
        raise ValueError("images must be a non-empty sequence of the class's images")
    _non_negative(
        rank=rank, patch_size=patch_size, nb_design=nb_design, seed=seed, top_crops=top_crops
    )
    return concepts_pb2.FitConceptsRequest(
        request_id=request_id,
        model=build_model_ref(
            model,
            target_class=target_class,
            model_version=model_version,
            model_output=model_output,
            preprocessing=preprocessing,
            class_labels=class_labels,
        ),
        images=[encode_image(image) for image in images],
        layer=layer,
        rank=rank,
        patch_size=patch_size,
        nb_design=nb_design,
        seed=seed,
        top_crops=top_crops,
    )


def build_decompose_request(
    bank_id: str,
    concept: int,
    images: Sequence[ImageLike],
    *,
    layer: str = "",
    rank: int = 0,
    nb_design: int = 0,
    seed: int = 0,
    top_crops: int = 0,
    model: str = "",
    model_version: str = "",
    request_id: str = "",
) -> concepts_pb2.DecomposeConceptRequest:
    if isinstance(images, str | bytes) or not images:
        raise ValueError("images must be the bank's images, in the order they were fitted")
    _non_negative(concept=concept, rank=rank, nb_design=nb_design, seed=seed, top_crops=top_crops)
    return concepts_pb2.DecomposeConceptRequest(
        request_id=request_id,
        bank_id=bank_id,
        concept=concept,
        layer=layer,
        images=[encode_image(image) for image in images],
        rank=rank,
        nb_design=nb_design,
        seed=seed,
        top_crops=top_crops,
        model=_optional_model(model, model_version),
    )


class ConceptCalls(Generic[BankT, MapsT]):
    """The ConceptService calls of ``Client`` (values) and ``AsyncClient`` (awaitables); they
    use the client's channel, deadlines, metadata and error mapping."""

    _channel: Any

    def _concepts_stub(self) -> concepts_pb2_grpc.ConceptServiceStub:
        return concepts_pb2_grpc.ConceptServiceStub(self._channel)

    def fit_concepts(
        self,
        images: Sequence[ImageLike],
        model: str,
        *,
        target_class: int | None = None,
        layer: str = "",
        rank: int = 0,
        patch_size: int = 0,
        nb_design: int = 0,
        seed: int = 0,
        top_crops: int = 0,
        model_version: str = "",
        model_output: str = "",
        request_id: str = "",
        preprocessing: Preprocessing | None = None,
        class_labels: Sequence[str] = (),
        on_progress: Callable[[ConceptsProgress], None] | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> BankT:
        """CRAFT concepts (CVPR 2023) of ``model``'s class ``target_class`` (None: the class most
        ``images`` are predicted as) from the class's ``images``: crops of side ``patch_size``
        (0: 0.3 of the shorter side) through the model up to ``layer`` (empty: the last
        declared layer), NMF with ``rank`` concepts (0: 10), ranked by Sobol total-order
        importance (design size ``nb_design``, 0: 32). Returns the stored ``ConceptBank``
        (``AsyncClient``: an awaitable of it); its ``bank_id`` is what the other calls take."""
        self._check_open()  # type: ignore[attr-defined]
        request = build_fit_concepts_request(
            images,
            model,
            target_class=target_class,
            layer=layer,
            rank=rank,
            patch_size=patch_size,
            nb_design=nb_design,
            seed=seed,
            top_crops=top_crops,
            model_version=model_version,
            model_output=model_output,
            request_id=request_id,
            preprocessing=preprocessing,
            class_labels=class_labels,
        )
        call = self._concepts_stub().FitConcepts(
            request,
            **self._call_options(timeout, metadata),  # type: ignore[attr-defined]
        )
        return self._collect(call, ConceptsCollector(request_id, on_progress))  # type: ignore[attr-defined]

    def concept_bank(
        self,
        bank_id: str,
        *,
        model: str = "",
        model_version: str = "",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> BankT:
        """A stored bank by id. With ``model``, refused (FAILED_PRECONDITION, "stale bank")
        when that model's version (``model_version``, empty: the latest) is not the bank's."""
        self._check_open()  # type: ignore[attr-defined]
        request = concepts_pb2.GetConceptBankRequest(
            bank_id=bank_id, model=_optional_model(model, model_version)
        )
        return self._unary(  # type: ignore[attr-defined]
            self._concepts_stub().GetConceptBank,
            request,
            self._call_options(timeout, metadata),  # type: ignore[attr-defined]
            ConceptBank.from_proto,
        )

    def concept_maps(
        self,
        image: ImageLike,
        bank_id: str,
        *,
        model: str = "",
        model_version: str = "",
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> MapsT:
        """``image``'s concept maps: each concept's coefficient per position of the bank's
        layer, resized to the image (``ConceptMaps``, in the bank's ranked order)."""
        self._check_open()  # type: ignore[attr-defined]
        request = concepts_pb2.ConceptMapsRequest(
            bank_id=bank_id,
            image=encode_image(image),
            model=_optional_model(model, model_version),
        )
        return self._unary(  # type: ignore[attr-defined]
            self._concepts_stub().ConceptMaps,
            request,
            self._call_options(timeout, metadata),  # type: ignore[attr-defined]
            ConceptMaps.from_proto,
        )

    def decompose_concept(
        self,
        bank_id: str,
        concept: int,
        images: Sequence[ImageLike],
        *,
        layer: str = "",
        rank: int = 0,
        nb_design: int = 0,
        seed: int = 0,
        top_crops: int = 0,
        model: str = "",
        model_version: str = "",
        request_id: str = "",
        on_progress: Callable[[ConceptsProgress], None] | None = None,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> BankT:
        """CRAFT's recursive decomposition: concept ``concept`` of bank ``bank_id`` split into
        ``rank`` (0: 4) sub-concepts at an earlier ``layer`` (empty: the one before the bank's),
        fitted on the bank's crops the concept marks most. ``images``: the bank's images again,
        in order (checked against its digest). Returns the child ``ConceptBank``."""
        self._check_open()  # type: ignore[attr-defined]
        request = build_decompose_request(
            bank_id,
            concept,
            images,
            layer=layer,
            rank=rank,
            nb_design=nb_design,
            seed=seed,
            top_crops=top_crops,
            model=model,
            model_version=model_version,
            request_id=request_id,
        )
        call = self._concepts_stub().DecomposeConcept(
            request,
            **self._call_options(timeout, metadata),  # type: ignore[attr-defined]
        )
        return self._collect(call, ConceptsCollector(request_id, on_progress))  # type: ignore[attr-defined]
