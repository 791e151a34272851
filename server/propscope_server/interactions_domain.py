"""Protocol-agnostic request and event types of Sobol indices over composed semantic
edits (Interactions, methods/interactions.py): what the API layer converts protobuf to
and from. Field names are the proto's (interactions.proto)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from propscope_server.domain import DEFAULT_TENANT, ClassifierRef, PropertySpec
from propscope_server.scoring.interactions import IndicesEstimate

# The API's ranges (the defaults are scoring/interactions.py's): a design of 2 rows per
# block gives degenerate bootstrap intervals; fewer resamples unstable interval ends.
MIN_DESIGN_SIZE = 4
MIN_BOOTSTRAP = 100
MAX_BOOTSTRAP = 100_000


@dataclass(frozen=True)
class InteractionsSpec:
    request_id: str
    image: np.ndarray  # uint8 [H, W, 3]
    classifier: ClassifierRef
    # In composition order; editors (with regions), or names only with provided_design.
    properties: tuple[PropertySpec, ...]
    design_size: int
    pair: tuple[int, int] | None  # indices into properties
    bootstrap: int
    confidence: float
    target_score: str  # probability, logit or log_odds
    seed: int
    # One image per design row (InteractionDesign's order), or None: the editors compose.
    provided_design: tuple[np.ndarray, ...] | None = None
    tenant: str = DEFAULT_TENANT

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.properties)


@dataclass(frozen=True)
class DesignSpec:
    """InteractionDesign's request, validated."""

    properties: int
    design_size: int
    pair: tuple[int, int] | None
    seed: int


@dataclass(frozen=True)
class DesignRows:
    rows: np.ndarray  # float32 [R, P], strengths in [0, 1]
    kinds: tuple[str, ...]


@dataclass(frozen=True)
class InteractionsAccepted:
    model_version: str
    composition_order: tuple[str, ...]
    design_size: int
    bootstrap: int
    confidence: float
    target_score: str
    planned_images: int
    planned_edits: int
    planned_forward_passes: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class InteractionsProgress:
    stage: str  # "edit" or "classify"
    completed: int
    total: int


@dataclass(frozen=True)
class InteractionsOutcome:
    estimate: IndicesEstimate
    composition_order: tuple[str, ...]
    pair_names: tuple[str, str] | None
    target_class: int
    target_label: str
    target_score: str
    cache_hits: int
    cache_misses: int
    edits: int
    forward_passes: int
    warnings: tuple[str, ...] = ()
