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
from propscope._preprocessing import Preprocessing

__all__ = [
    "AttributionObservation",
    "CacheStats",
    "InteractionObservation",
    "ModelEntry",
    "Observation",
    "PathStrip",
    "ReviewResult",
    "RuleOutcome",
    "Settings",
    "Verdict",
]

Role = Literal["candidate", "baseline", "model"]
# A rule's verdict: "inconclusive" when the image set cannot decide it either way at the rule's
# confidence (docs/review.md says how each rule decides).
Verdict = Literal["passed", "failed", "inconclusive"]


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
    # The spec's preprocessing override and class labels (None / empty: the model's own).
    preprocessing: Preprocessing | None = None
    class_labels: tuple[str, ...] = ()
    # What the service applied (every field resolved), where each field came from, the class
    # names in use and what it could not be sure of, over every explanation of this model.
    applied_preprocessing: Preprocessing | None = None
    preprocessing_sources: tuple[str, ...] = ()
    served_class_labels: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

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
    # N, the path length the result was decided on (adaptive paths may be longer than the
    # spec's steps), why it is or is not relevant, and what the service was unsure of.
    steps: int = 0
    decision: str = ""
    decision_detail: str = ""
    warnings: tuple[str, ...] = ()
    target_label: str = ""
    edits: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self)


@dataclass(frozen=True)
class AttributionObservation:
    """The share of one image's attribution mass that a ``max_attribution_share`` rule's region
    holds, for the model the rule checks."""

    # The rule's name (its region's name in the reports).
    rule: str
    image: str
    model: str
    # Positive mass inside the region / positive mass of the whole map (0 when the map has
    # none: the model's score moves with no region).
    share: float
    positive_mass: float
    method: str
    forward_passes: int
    cache_hit: bool
    target_class: int
    target_label: str = ""
    # The heat map over the image with the region outlined (a PNG thumbnail), for the HTML.
    overlay: bytes = b""
    # EVA maps: "verified (guaranteed)" or "hybrid from LAYER: NOT guaranteed"; else empty.
    guarantee: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclass_dict(self, skip=("overlay",))


@dataclass(frozen=True)
class InteractionObservation:
    """One image's Sobol indices over a ``max_interaction_share`` rule's properties, for the
    model the rule checks: per property (in composition order) the first- and total-order
    index with their bootstrap interval, and the interaction share (sum of total minus sum
    of first order) with its interval."""

    # The rule's name (where the other rules name their property).
    rule: str
    image: str
    model: str
    properties: tuple[str, ...]
    first: tuple[float, ...]
    first_low: tuple[float, ...]
    first_high: tuple[float, ...]
    total: tuple[float, ...]
    total_low: tuple[float, ...]
    total_high: tuple[float, ...]
    share: float
    share_low: float
    share_high: float
    significant: bool
    # The score's variance over the design: near 0, no property moves the prediction.
    variance: float
    target_class: int
    target_label: str = ""
    confidence: float = 0.95
    design_size: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    forward_passes: int = 0
    warnings: tuple[str, ...] = ()
    # The score's sd over the design is below 0.01: the rule counts the share as 0 [0, 0].
    negligible_variance: bool = False

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
    verdict: Verdict
    # One line a reviewer reads: what was measured against what.
    message: str
    details: dict[str, float | int | str | None] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.rule}[{self.property_name}]"

    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "passed": self.passed, **dataclass_dict(self)}


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
    path_mode: str = "fixed"
    # The longest path an adaptive property could be extended to.
    max_steps: int = 0

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
    attributions: tuple[AttributionObservation, ...] = ()
    interactions: tuple[InteractionObservation, ...] = ()
    # The spec's fail_on_inconclusive: whether an inconclusive rule fails the gate.
    fail_on_inconclusive: bool = False

    @property
    def verdict(self) -> Verdict:
        """Failed when a rule failed, else inconclusive when a rule was, else passed."""
        if self.failures:
            return "failed"
        return "inconclusive" if self.inconclusive else "passed"

    @property
    def passed(self) -> bool:
        """Every rule passed: an inconclusive rule is never counted as passed."""
        return self.verdict == "passed"

    @property
    def gate_passed(self) -> bool:
        """What the gate's exit code says: no rule failed, and none was inconclusive when the
        spec's fail_on_inconclusive is set."""
        return not self.failures and not (self.fail_on_inconclusive and self.inconclusive)

    @property
    def failures(self) -> tuple[RuleOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if outcome.verdict == "failed")

    @property
    def inconclusive(self) -> tuple[RuleOutcome, ...]:
        return tuple(outcome for outcome in self.outcomes if outcome.verdict == "inconclusive")

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

    def shares(self, rule: str) -> list[AttributionObservation]:
        """The attribution observations of one ``max_attribution_share`` rule, in image order."""
        found = {obs.image: obs for obs in self.attributions if obs.rule == rule}
        return [found[image] for image in self.images if image in found]

    def interaction_indices(self, rule: str) -> list[InteractionObservation]:
        """The observations of one ``max_interaction_share`` rule, in image order."""
        found = {obs.image: obs for obs in self.interactions if obs.rule == rule}
        return [found[image] for image in self.images if image in found]

    def values(self, model: str, property_name: str, name: str) -> np.ndarray:
        """One numeric field of ``select(...)`` as an array, in image order. ``score`` is
        stated at the settings' N: E|dp| scales with 1/N, so a result an adaptive path decided
        at a longer N counts as score_per_unit_strength / N (equal to its score at N when the
        path was not extended), and images and models compare at one N."""
        observations = self.select(model, property_name)
        if name == "score":
            return np.array([self.score_at_n(obs) for obs in observations], dtype=np.float64)
        return np.array([float(getattr(obs, name)) for obs in observations], dtype=np.float64)

    def score_at_n(self, obs: Observation) -> float:
        """The observation's score at the settings' N (see ``values``)."""
        if obs.steps and self.settings.steps and obs.steps != self.settings.steps:
            return obs.score_per_unit_strength / self.settings.steps
        return obs.score

    def curves(self, model: str, property_name: str) -> np.ndarray:
        """[images, M + 1] target probabilities along the path at strengths t = k/M, M the
        longest path among them: a shorter path's curve is interpolated linearly in t (adaptive
        paths double N, so a shorter path's strengths are among the longest's)."""
        rows = [obs.curve for obs in self.select(model, property_name) if obs.curve]
        if not rows:
            return np.zeros((0, self.settings.steps + 1), dtype=np.float64)
        points = max(len(row) for row in rows)
        grid = np.linspace(0.0, 1.0, points)
        return np.array(
            [np.interp(grid, np.linspace(0.0, 1.0, len(row)), row) for row in rows],
            dtype=np.float64,
        )

    def decisions(self, model: str, property_name: str) -> dict[str, int]:
        """How many images got each decision (e.g. {"relevant": 3, "change_too_small": 9})."""
        counts: dict[str, int] = {}
        for obs in self.select(model, property_name):
            key = obs.decision or ("relevant" if obs.relevant else "not relevant")
            counts[key] = counts.get(key, 0) + 1
        return counts

    def cache(self, model: str | None = None) -> CacheStats:
        chosen = [obs for obs in self.observations if model is None or obs.model == model]
        return CacheStats(
            hits=sum(obs.cache_hits for obs in chosen),
            misses=sum(obs.cache_misses for obs in chosen),
        )

    def accuracy(self, model: str) -> float | None:
        """Fraction of labelled images whose original the model classifies as labelled."""
        correct = self.correct(model)
        return sum(correct.values()) / len(correct) if correct else None

    def correct(self, model: str) -> dict[str, bool]:
        """Labelled image -> whether the model classifies its original as labelled."""
        first = self.properties[0] if self.properties else ""
        return {
            obs.image: obs.original_class == label
            for obs in self.select(model, first)
            if (label := self.images.get(obs.image)) is not None
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "verdict": self.verdict,
            "passed": self.passed,
            "fail_on_inconclusive": self.fail_on_inconclusive,
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
            "attributions": [obs.to_dict() for obs in self.attributions],
            "interactions": [obs.to_dict() for obs in self.interactions],
        }
