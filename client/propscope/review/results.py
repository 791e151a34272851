"""What a review (or one ``explain --report``) found: plain data that every report reads.

One ``Observation`` is one model's explanation of one property on one image. Everything a
report shows is computed from these, so the JSON written from ``ReviewResult.to_dict()`` holds
every number the Markdown, JUnit and HTML reports show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from propscope._json import dataclass_dict, plain

__all__ = [
    "CacheStats",
    "ModelEntry",
    "Observation",
    "PathStrip",
    "ReviewResult",
    "RuleOutcome",
    "Settings",
]

Role = Literal["candidate", "baseline", "model"]


@dataclass(frozen=True)
class ModelEntry:
    """A classifier in the review; ``role`` says what the rules compare."""

    role: Role
    name: str
    version: str = ""
    # The output tensor to read; empty means the model's first.
    output: str = ""
    # The version the service resolved and explained (the latest ready one when ``version`` is
    # empty): what the review actually looked at.
    served_version: str = ""

    @property
    def label(self) -> str:
        return f"{self.name}:{self.version}" if self.version else self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class Observation:
    """One model's explanation of one property on one image (means over samples)."""

    image: str
    # The model's ``ModelEntry.label`` (name, or name:version).
    model: str
    property_name: str
    score: float
    score_per_unit_strength: float
    p_value: float
    significant: bool
    relevant: bool
    flip_rate: float
    probability_change: float
    target_class: int
    original_class: int
    # Target probability along the path x_0..x_N, averaged over samples.
    curve: tuple[float, ...]
    cache_hits: int
    cache_misses: int

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class PathStrip:
    """The path images of one image and property, with each model's curve along it."""

    image: str
    property_name: str
    # PNG bytes of x_0..x_N (the first sample's path).
    images: tuple[bytes, ...]
    # Model label -> target probability along this path.
    curves: dict[str, tuple[float, ...]]

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self, skip=("images",))


@dataclass(frozen=True)
class RuleOutcome:
    """One rule checked on one property: one JUnit test case."""

    rule: str
    property_name: str
    passed: bool
    # One line a reviewer reads: what was measured against what.
    message: str
    details: dict[str, float | int | str | None] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.rule}[{self.property_name}]"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclass_dict(self)}


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": plain(self.hit_rate)}


@dataclass(frozen=True)
class Settings:
    """The explanation settings every observation shares."""

    target: str
    steps: int
    samples: int
    seed: int
    permutations: int
    alpha: float
    min_probability_change: float | None
    # Whose probability the curves follow: "label" (each image's labelled class), "predicted"
    # (each model's own prediction on the original) or "class N".
    target_class: str

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class ReviewResult:
    title: str
    settings: Settings
    models: tuple[ModelEntry, ...]
    properties: tuple[str, ...]
    # Image id (its path relative to the image set) -> label, or None when unlabelled.
    images: dict[str, int | None]
    observations: tuple[Observation, ...]
    outcomes: tuple[RuleOutcome, ...] = ()
    strips: tuple[PathStrip, ...] = ()
    seconds: float = math.nan

    @property
    def passed(self) -> bool:
        return all(outcome.passed for outcome in self.outcomes)

    @property
    def failures(self) -> tuple[RuleOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if not outcome.passed)

    def model(self, role: Role) -> ModelEntry | None:
        return next((entry for entry in self.models if entry.role == role), None)

    def select(self, model: str, property_name: str) -> list[Observation]:
        """The observations of one model and property, in image order."""
        found = {
            obs.image: obs
            for obs in self.observations
            if obs.model == model and obs.property_name == property_name
        }
        return [found[image] for image in self.images if image in found]

    def values(self, model: str, property_name: str, name: str) -> np.ndarray:
        """One numeric field of ``select(...)`` as an array, in image order."""
        return np.array(
            [float(getattr(obs, name)) for obs in self.select(model, property_name)],
            dtype=np.float64,
        )

    def curves(self, model: str, property_name: str) -> np.ndarray:
        """[images, N + 1] target probabilities along the path."""
        rows = [obs.curve for obs in self.select(model, property_name)]
        return np.array(rows, dtype=np.float64).reshape(len(rows), self.settings.steps + 1)

    def cache(self, model: str | None = None) -> CacheStats:
        chosen = [obs for obs in self.observations if model is None or obs.model == model]
        return CacheStats(
            hits=sum(obs.cache_hits for obs in chosen),
            misses=sum(obs.cache_misses for obs in chosen),
        )

    def accuracy(self, model: str) -> float | None:
        """Fraction of labelled images whose original the model classifies as labelled."""
        first = self.properties[0] if self.properties else None
        pairs = [
            (obs.original_class, self.images[obs.image])
            for obs in self.select(model, first or "")
            if self.images.get(obs.image) is not None
        ]
        return sum(a == b for a, b in pairs) / len(pairs) if pairs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "passed": self.passed,
            "seconds": plain(self.seconds),
            "settings": self.settings.to_dict(),
            "models": [
                {
                    **entry.to_dict(),
                    "accuracy": plain(self.accuracy(entry.label)),
                    "cache": self.cache(entry.label).to_dict(),
                }
                for entry in self.models
            ],
            "cache": self.cache().to_dict(),
            "properties": list(self.properties),
            "images": [{"image": image, "label": label} for image, label in self.images.items()],
            "rules": [outcome.to_dict() for outcome in self.outcomes],
            "observations": [obs.to_dict() for obs in self.observations],
            "strips": [strip.to_dict() for strip in self.strips],
        }
