"""Protocol-agnostic request, event and resource types of CRAFT concepts
(ConceptService, methods/craft.py): what the API layer converts protobuf to and from.
Field names are the proto's (concepts.proto)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from propscope_server.domain import DEFAULT_TENANT, ClassifierRef

# The ranges of the request's fields, one definition for the API's refusals
# (api/convert_concepts.py) and the method's (methods/craft.py), as concepts.proto says.
DEFAULT_RANK = 10
MAX_RANK = 64
DEFAULT_DECOMPOSE_RANK = 4
DEFAULT_NB_DESIGN = 32
MAX_NB_DESIGN = 1024
DEFAULT_TOP_CROPS = 6
MAX_TOP_CROPS = 32


@dataclass(frozen=True)
class ConceptsSpec:
    """One FitConcepts request (or DecomposeConcept's, resolved against its parent:
    `parent` then names the bank and concept, and `images` are the parent's crops)."""

    request_id: str
    images: tuple[np.ndarray, ...]  # uint8 [H, W, 3] each
    classifier: ClassifierRef  # target_class: the class (None: the majority prediction)
    layer: str = ""  # empty: the last declared layer
    rank: int = DEFAULT_RANK
    patch_size: int = 0  # 0: 0.3 of each image's shorter side
    nb_design: int = DEFAULT_NB_DESIGN
    seed: int = 0
    top_crops: int = DEFAULT_TOP_CROPS
    tenant: str = DEFAULT_TENANT
    parent: tuple[str, int] | None = None  # (bank_id, concept) of a decomposition
    # A decomposition's: (image, left, top, width, height) of each image (a parent's
    # crop) in the parent's images, and the parent's images digest.
    origins: tuple[tuple[int, int, int, int, int], ...] = ()
    digest: str = ""


@dataclass(frozen=True)
class DecomposeSpec:
    request_id: str
    bank_id: str
    concept: int
    images: tuple[np.ndarray, ...]
    classifier: ClassifierRef | None  # None: the bank's model
    layer: str = ""  # empty: the layer before the bank's
    rank: int = DEFAULT_DECOMPOSE_RANK
    nb_design: int = DEFAULT_NB_DESIGN
    seed: int = 0
    top_crops: int = DEFAULT_TOP_CROPS
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class BankRef:
    """GetConceptBank: a bank id, and optionally the model it must still match."""

    bank_id: str
    classifier: ClassifierRef | None
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class MapsSpec:
    bank_id: str
    image: np.ndarray
    classifier: ClassifierRef | None
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class ConceptsAccepted:
    model: str
    model_version: str
    layer: str
    channels: int
    target_class: int
    target_label: str
    rank: int
    images: int
    crops: int
    patch_size: int
    nb_design: int
    planned_passes: int
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class ConceptsProgress:
    done: int
    total: int


@dataclass(frozen=True)
class ConceptCrop:
    image: int
    left: int
    top: int
    width: int
    height: int
    coefficient: float
    png: bytes


@dataclass(frozen=True)
class Concept:
    index: int
    sobol_total_importance: float
    logit_contribution: float
    logit_share: float
    mean_coefficient: float
    top_crops: tuple[ConceptCrop, ...]


@dataclass(frozen=True)
class ConceptBank:
    """A fitted bank: the resource FitConcepts stores and every other RPC reads."""

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
    concepts: tuple[Concept, ...]  # most important first
    logit_share_exact: bool
    g_passes: int
    h_passes: int
    total_ms: float
    basis: np.ndarray = field(repr=False)  # W [rank, channels], row c = concept c
    parent_bank_id: str = ""
    parent_concept: int = 0
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConceptMap:
    concept: int
    values: np.ndarray  # [height, width] float32
    grid: np.ndarray  # [grid_height, grid_width] float32


@dataclass(frozen=True)
class ConceptMaps:
    bank_id: str
    height: int
    width: int
    grid_height: int
    grid_width: int
    maps: tuple[ConceptMap, ...]  # in the bank's ranked order


ConceptsEvent = ConceptsAccepted | ConceptsProgress | ConceptBank
