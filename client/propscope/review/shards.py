"""Sharded reviews: ``run_shard`` explains one share of the image set (position % n == i, as a
Kubernetes Indexed Job's completion index picks it) and returns a ``ReviewPartial``, written as
``review-partial.json``; ``merge_partials`` checks that the partials of all n shards belong to
one review and computes the rules on their merged observations, giving the ``ReviewResult`` one
unsharded run gives.

A partial holds observations, never verdicts: a rule's statistics over the whole set are not a
combination of per-shard ones (a Wilcoxon p-value or an accuracy interval cannot be averaged).
It also holds each of its images' path strips and attribution overlays that could be among the
whole set's highest, so that the merge needs no service.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from propscope._client import Client
from propscope._preprocessing import Preprocessing
from propscope.review.report.html import ATTRIBUTION_OVERLAYS
from propscope.review.results import (
    AttributionObservation,
    InteractionObservation,
    ModelEntry,
    Observation,
    PathStrip,
    ReviewResult,
    Settings,
)
from propscope.review.rules import evaluate_rules
from propscope.review.runner import (
    ProgressCallback,
    ReviewError,
    interaction_calls,
    observe,
    strips_of,
)
from propscope.review.spec import ImageEntry, ReviewSpec

__all__ = [
    "PARTIAL_FILE",
    "MergeError",
    "ReviewPartial",
    "Shard",
    "merge_partials",
    "read_partial",
    "run_shard",
    "spec_digest",
]

# The partial's file name in a shard's --out folder.
PARTIAL_FILE = "review-partial.json"
# What the first keys of a partial say; a merge refuses any other kind or version.
FORMAT = "propscope-review-partial"
FORMAT_VERSION = 1
# The spec's keys that change how a review runs but not what it finds: shards may differ there
# (the service a shard reached is compared through the settings it resolved).
_RUN_ONLY_KEYS = ("service", "concurrency")


class MergeError(ValueError):
    """The partials cannot be merged into one review (exit code 2): the message names why."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the images whose position in the set is index mod count."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(
                f"shard {self.index}/{self.count}: expected I/N with 0 <= I < N "
                "(I 0-based, as a Kubernetes Indexed Job's JOB_COMPLETION_INDEX)"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N``, e.g. ``0/3``."""
        found = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if found is None:
            raise ValueError(
                f"shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/3 "
                "(I 0-based, as a Kubernetes Indexed Job's JOB_COMPLETION_INDEX)"
            )
        return cls(int(found[1]), int(found[2]))

    def select(self, images: Sequence[ImageEntry]) -> list[ImageEntry]:
        return [
            image for position, image in enumerate(images) if position % self.count == self.index
        ]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class ReviewPartial:
    """What one shard found: its observations and what the merge checks them against."""

    spec_digest: str
    # The spec as validated (ReviewSpec.model_dump), from which the merge takes the rules.
    spec: dict[str, Any]
    shard: Shard
    # The whole image set, in order: (id, label).
    image_set: tuple[tuple[str, int | None], ...]
    # The images this shard explained (in set order).
    covered: tuple[str, ...]
    settings: Settings
    models: tuple[ModelEntry, ...]
    observations: tuple[Observation, ...]
    attributions: tuple[AttributionObservation, ...]
    # The path strips of the shard's highest-scoring images, per property.
    strips: tuple[PathStrip, ...]
    seconds: float
    interactions: tuple[InteractionObservation, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        covered = ReviewResult(
            title="",
            settings=self.settings,
            models=self.models,
            properties=(),
            images={},
            observations=self.observations,
        )
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "spec_digest": self.spec_digest,
            "shard": {"index": self.shard.index, "count": self.shard.count},
            "images": len(self.image_set),
            "covered": list(self.covered),
            "seconds": self.seconds,
            "settings": self.settings.to_dict(),
            "models": [
                {**entry.to_dict(), "cache": covered.cache(entry.label).to_dict()}
                for entry in self.models
            ],
            "cache": covered.cache().to_dict(),
            "spec": self.spec,
            "image_set": [[image, label] for image, label in self.image_set],
            "observations": [obs.to_dict() for obs in self.observations],
            "attributions": [
                {**obs.to_dict(), "overlay": _b64(obs.overlay)} for obs in self.attributions
            ],
            "strips": [
                {**strip.to_dict(), "images": [_b64(png) for png in strip.images]}
                for strip in self.strips
            ],
            "interactions": [obs.to_dict() for obs in self.interactions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReviewPartial:
        """The partial ``to_dict`` wrote; ``KeyError``, ``TypeError`` or ``ValueError`` when
        ``data`` is not one."""
        return cls(
            spec_digest=str(data["spec_digest"]),
            spec=dict(data["spec"]),
            shard=Shard(int(data["shard"]["index"]), int(data["shard"]["count"])),
            image_set=tuple((str(image), label) for image, label in data["image_set"]),
            covered=tuple(str(image) for image in data["covered"]),
            settings=_dataclass(Settings, data["settings"]),
            models=tuple(_model_entry(entry) for entry in data["models"]),
            observations=tuple(_dataclass(Observation, obs) for obs in data["observations"]),
            attributions=tuple(
                _dataclass(AttributionObservation, {**obs, "overlay": _unb64(obs["overlay"])})
                for obs in data["attributions"]
            ),
            strips=tuple(
                PathStrip(
                    image=strip["image"],
                    property_name=strip["property_name"],
                    images=tuple(_unb64(png) for png in strip["images"]),
                    curves={model: tuple(curve) for model, curve in strip["curves"].items()},
                )
                for strip in data["strips"]
            ),
            seconds=float(data["seconds"]),
            interactions=tuple(
                _dataclass(InteractionObservation, obs) for obs in data.get("interactions", ())
            ),
        )

    def write(self, out_dir: Path) -> Path:
        """Writes ``out_dir``/review-partial.json (the folder created if missing); ``OSError``
        when it cannot."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / PARTIAL_FILE
        # Written beside and then renamed: a pod killed while writing leaves no half a partial
        # for the merge to find.
        part = path.with_name(f".{PARTIAL_FILE}.{os.getpid()}")
        part.write_text(json.dumps(self.to_dict(), allow_nan=False) + "\n", encoding="utf-8")
        os.replace(part, path)
        return path


def spec_digest(spec: ReviewSpec, images: Sequence[ImageEntry]) -> str:
    """A SHA-256 over what decides a review's findings: the spec (but for its service and
    concurrency), the image set's ids and labels in order, the masks of its regions and its
    models' class labels. The images' pixels are not read: a shard reads only its own."""
    content = spec.model_dump(mode="json", exclude=set(_RUN_ONLY_KEYS))
    editors = spec.editor_properties()
    models = [model for model in (spec.candidate, spec.baseline) if model is not None]
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {
                "spec": content,
                "images": [[image.id, image.label] for image in images],
                "class_labels": [list(spec.class_labels_of(model)) for model in models],
            },
            sort_keys=True,
        ).encode()
    )
    for name in sorted(editors):
        digest.update(name.encode() + b"\0")
        digest.update(editors[name].to_proto().SerializeToString(deterministic=True))
    return digest.hexdigest()


def run_shard(
    spec: ReviewSpec,
    images: Sequence[ImageEntry],
    client: Client,
    shard: Shard,
    *,
    on_progress: ProgressCallback | None = None,
) -> ReviewPartial:
    """Explains the images of ``shard`` (of the whole set ``images``) as ``run_review`` would,
    without checking a rule; ``ReviewError`` when a call fails or the shard has no image."""
    started = time.monotonic()
    mine = shard.select(images)
    if not mine:
        raise ReviewError(
            f"shard {shard} has no image: the set has {len(images)}; "
            f"use at most {len(images)} shards"
        )
    found, run, models = observe(spec, images, mine, client, on_progress=on_progress)
    # Each shard's highest are a superset of the set's highest that lie in it, so the merge
    # finds every strip and overlay the unsharded report shows.
    strips = strips_of(spec, mine, found, run, models)
    shown = {
        (obs.rule, obs.image)
        for rule in dict.fromkeys(obs.rule for obs in found.attributions)
        for obs in _highest_shares(found, rule)
    }
    attributions = tuple(
        obs if (obs.rule, obs.image) in shown else replace(obs, overlay=b"")
        for obs in found.attributions
    )
    return ReviewPartial(
        spec_digest=spec_digest(spec, images),
        spec=spec.model_dump(mode="json"),
        shard=shard,
        image_set=tuple((image.id, image.label) for image in images),
        covered=tuple(image.id for image in mine),
        settings=found.settings,
        models=found.models,
        observations=found.observations,
        attributions=attributions,
        strips=tuple(strips),
        seconds=time.monotonic() - started,
        interactions=found.interactions,
    )


def read_partial(path: Path) -> ReviewPartial:
    """The partial at ``path``; ``MergeError`` when it cannot be read or is not a partial."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise MergeError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeError(f"{path}: not a review partial (not JSON: {error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MergeError(
            f'{path}: not a review partial (no "format": "{FORMAT}"; '
            f"`propscope review SPEC --shard I/N` writes {PARTIAL_FILE})"
        )
    if data.get("version") != FORMAT_VERSION:
        raise MergeError(
            f"{path}: partial format version {data.get('version')!r}, this propscope reads "
            f"version {FORMAT_VERSION}: run the shards and the merge with one propscope version"
        )
    try:
        return ReviewPartial.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise MergeError(
            f"{path}: not a complete review partial ({type(error).__name__}: {error})"
        ) from None


def merge_partials(
    partials: Sequence[ReviewPartial], names: Sequence[str] | None = None
) -> ReviewResult:
    """The review of every shard's partial together: the rules checked on the merged
    observations, as one unsharded run would; ``MergeError`` names what makes the partials
    inconsistent. ``names`` (their files, by default "shard I/N") name them in the errors."""
    if not partials:
        raise MergeError("no partial to merge")
    labels = list(names) if names is not None else [f"shard {p.shard}" for p in partials]
    _check_same_review(partials, labels)
    _check_complete(partials, labels)
    first = partials[0]
    spec = _spec_of(first, labels[0])
    images = dict(first.image_set)
    position = {image: index for index, image in enumerate(images)}
    ordered = sorted(partials, key=lambda partial: partial.shard.index)
    by_image: dict[str, list[Observation]] = {}
    for partial in ordered:
        for obs in partial.observations:
            by_image.setdefault(obs.image, []).append(obs)
    result = ReviewResult(
        title=spec.title,
        settings=first.settings,
        models=_merged_models(partials),
        properties=tuple(spec.property_names),
        images=images,
        observations=tuple(obs for image in images for obs in by_image.get(image, ())),
        attributions=_merged_attributions(spec, ordered, position),
        interactions=_merged_interactions(spec, ordered, position),
        seconds=max(partial.seconds for partial in partials),
        fail_on_inconclusive=spec.fail_on_inconclusive,
    )
    outcomes = evaluate_rules(spec.rules, result)
    return replace(result, outcomes=tuple(outcomes), strips=_merged_strips(spec, result, ordered))


def _check_same_review(partials: Sequence[ReviewPartial], labels: Sequence[str]) -> None:
    """The partials' shard counts, specs, shards, images, settings and models agree."""
    first, first_label = partials[0], labels[0]
    for partial, label in zip(partials, labels, strict=True):
        if partial.shard.count != first.shard.count:
            raise MergeError(
                f"different shard counts: {first_label} is shard {first.shard}, "
                f"{label} is shard {partial.shard}; give every shard of one review the same N "
                "(a partial of an earlier run? delete it)"
            )
        if partial.spec_digest != first.spec_digest:
            raise MergeError(
                f"different specs or image sets: {first_label} (spec digest "
                f"{first.spec_digest[:12]}) and {label} ({partial.spec_digest[:12]}); run every "
                "shard from one spec and image set (a partial of an earlier run? delete it)"
            )
    seen: dict[int, str] = {}
    for partial, label in zip(partials, labels, strict=True):
        if partial.shard.index in seen:
            raise MergeError(
                f"shard {partial.shard} given twice: {seen[partial.shard.index]} and {label}"
            )
        seen[partial.shard.index] = label
    count = first.shard.count
    missing = [f"{index}/{count}" for index in range(count) if index not in seen]
    if missing:
        raise MergeError(
            f"missing shard{'s' if len(missing) > 1 else ''} {', '.join(missing)} of {count} "
            f"(given: {', '.join(f'{index}/{count}' for index in sorted(seen))}); run "
            f"`propscope review SPEC --shard {missing[0]} --out DIR`"
            f"{' (each missing one)' if len(missing) > 1 else ''} and merge its partial too"
        )
    _check_images(partials, labels)
    for partial, label in zip(partials, labels, strict=True):
        _check_settings(first.settings, first_label, partial.settings, label)
        _check_models(first.models, first_label, partial.models, label)


def _check_images(partials: Sequence[ReviewPartial], labels: Sequence[str]) -> None:
    """Every image of the set in exactly one partial, each in the shard its position says."""
    image_set = [image for image, _ in partials[0].image_set]
    owner: dict[str, str] = {}
    for partial, label in zip(partials, labels, strict=True):
        for image in partial.covered:
            if image in owner:
                raise MergeError(
                    f"overlapping shards: image {image!r} is in {owner[image]} and {label}"
                )
            owner[image] = label
    missing = [image for image in image_set if image not in owner]
    if missing:
        raise MergeError(
            f"missing images: {len(missing)} of {len(image_set)} in no partial "
            f"(first: {missing[0]!r})"
        )
    entries = [ImageEntry(image, Path(image), None) for image in image_set]
    for partial, label in zip(partials, labels, strict=True):
        expected = [image.id for image in partial.shard.select(entries)]
        if list(partial.covered) != expected:
            stray = next(image for image in partial.covered if image not in expected)
            raise MergeError(
                f"{label}: its images are not those of shard {partial.shard} (e.g. {stray!r})"
            )


def _check_settings(first: Settings, first_label: str, other: Settings, label: str) -> None:
    for field in fields(Settings):
        a, b = getattr(first, field.name), getattr(other, field.name)
        if a != b:
            raise MergeError(
                f"different service settings: {field.name} {a!r} in {first_label}, {b!r} in "
                f"{label}; run every shard through one --target whose gateways share their "
                "settings"
            )


# What the service resolved for a model: partials that disagree explained different things.
_SERVED_FIELDS = {
    "served_version": "model versions",
    "applied_preprocessing": "preprocessing",
    "preprocessing_sources": "preprocessing sources",
    "served_class_labels": "class labels",
}


def _check_models(
    first: Sequence[ModelEntry], first_label: str, other: Sequence[ModelEntry], label: str
) -> None:
    if [m.label for m in first] != [m.label for m in other]:
        raise MergeError(f"different models: {first_label} and {label}")
    for a, b in zip(first, other, strict=True):
        for name, what in _SERVED_FIELDS.items():
            if getattr(a, name) != getattr(b, name):
                raise MergeError(
                    f"different {what} of {a.role} {a.label!r}: {getattr(a, name)!r} in "
                    f"{first_label}, {getattr(b, name)!r} in {label}"
                )


def _check_complete(partials: Sequence[ReviewPartial], labels: Sequence[str]) -> None:
    """Each partial has one observation per image it covers, model and property, one share per
    image and ``max_attribution_share`` rule, and nothing of images it does not cover."""
    first = partials[0]
    spec = _spec_of(first, labels[0])
    rules = [rule.name for rule in spec.attribution_rules()]
    interaction_rules = [rule.name for rule in spec.interaction_rules()]
    for partial, label in zip(partials, labels, strict=True):
        covered = set(partial.covered)
        expected = {
            (image, model.label, name)
            for image in partial.covered
            for model in first.models
            for name in spec.property_names
        }
        found = [(obs.image, obs.model, obs.property_name) for obs in partial.observations]
        shares = [(obs.rule, obs.image) for obs in partial.attributions]
        indices = [(obs.rule, obs.image) for obs in partial.interactions]
        for what, got, wanted in (
            ("observation of (image, model, property)", found, expected),
            (
                "attribution share of (rule, image)",
                shares,
                {(r, i) for r in rules for i in covered},
            ),
            (
                "interaction indices of (rule, image)",
                indices,
                {(r, i) for r in interaction_rules for i in covered},
            ),
        ):
            extra = [key for key in got if key not in wanted]
            if extra or len(set(got)) != len(got) or set(got) != wanted:
                problem = (
                    f"an unexpected {what} {extra[0]}"
                    if extra
                    else f"a duplicate {what}"
                    if len(set(got)) != len(got)
                    else f"no {what} {min(wanted - set(got))}"
                )
                raise MergeError(f"{label}: {problem}")


def _spec_of(partial: ReviewPartial, label: str) -> ReviewSpec:
    try:
        return ReviewSpec.model_validate(partial.spec)
    except ValueError as error:
        raise MergeError(f"{label}: not a complete review partial (its spec: {error})") from None


def _merged_models(partials: Sequence[ReviewPartial]) -> tuple[ModelEntry, ...]:
    """The first partial's models, with every partial's warnings (once each, in order)."""
    merged = []
    for index, entry in enumerate(partials[0].models):
        warnings = dict.fromkeys(w for p in partials for w in p.models[index].warnings)
        merged.append(replace(entry, warnings=tuple(warnings)))
    return tuple(merged)


def _merged_attributions(
    spec: ReviewSpec, partials: Sequence[ReviewPartial], position: Mapping[str, int]
) -> tuple[AttributionObservation, ...]:
    """In the order one run makes them: by attribution setting, then image, then rule."""
    rules = spec.attribution_rules()
    settings = []
    for rule in rules:
        if rule.attribution not in settings:
            settings.append(rule.attribution)
    order = {
        rule.name: (settings.index(rule.attribution), index) for index, rule in enumerate(rules)
    }
    found = [obs for partial in partials for obs in partial.attributions]
    return tuple(
        sorted(
            found,
            key=lambda obs: (order[obs.rule][0], position[obs.image], order[obs.rule][1]),
        )
    )


def _merged_interactions(
    spec: ReviewSpec, partials: Sequence[ReviewPartial], position: Mapping[str, int]
) -> tuple[InteractionObservation, ...]:
    """In the order one run makes them: by (properties, settings), then image, then rule."""
    order = {
        rule: (call, index)
        for call, rules in enumerate(interaction_calls(spec).values())
        for index, rule in enumerate(rules)
    }
    found = [obs for partial in partials for obs in partial.interactions]
    return tuple(
        sorted(
            found,
            key=lambda obs: (order[obs.rule][0], position[obs.image], order[obs.rule][1]),
        )
    )


def _merged_strips(
    spec: ReviewSpec, result: ReviewResult, partials: Sequence[ReviewPartial]
) -> tuple[PathStrip, ...]:
    """The strips of the merged set's highest-scoring images, from the shards that hold them."""
    held = {(strip.image, strip.property_name): strip for p in partials for strip in p.strips}
    candidate = result.model("candidate")
    assert candidate is not None, "a review always has a candidate"
    strips = []
    for name in spec.property_names:
        ranked = sorted(
            result.select(candidate.label, name), key=lambda obs: -result.score_at_n(obs)
        )
        for obs in ranked[: spec.strips]:
            if (obs.image, name) not in held:
                raise MergeError(f"no partial holds the path strip of {obs.image!r}, {name!r}")
            strips.append(held[(obs.image, name)])
    return tuple(strips)


def _highest_shares(result: ReviewResult, rule: str) -> list[AttributionObservation]:
    """The images whose overlays the HTML report shows for ``rule``."""
    return sorted(result.shares(rule), key=lambda obs: -obs.share)[:ATTRIBUTION_OVERLAYS]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _dataclass(kind: type, data: Mapping[str, Any]) -> Any:
    """``kind`` from its ``to_dict()``: lists back to tuples, None back to NaN for floats."""
    values = {}
    for field in fields(kind):
        if field.name not in data:
            continue
        value = data[field.name]
        if isinstance(value, list):
            value = tuple(value)
        elif value is None and field.type in ("float", float):
            value = float("nan")
        values[field.name] = value
    return kind(**values)


def _preprocessing(data: Mapping[str, Any] | None) -> Preprocessing | None:
    if data is None:
        return None
    return Preprocessing(
        mean=tuple(data["mean"]) if data.get("mean") is not None else None,
        std=tuple(data["std"]) if data.get("std") is not None else None,
        output_kind=data.get("output_kind"),
        resize=data.get("resize"),
    )


def _model_entry(data: Mapping[str, Any]) -> ModelEntry:
    return ModelEntry(
        role=data["role"],
        name=data["name"],
        version=data["version"],
        output=data["output"],
        served_version=data["served_version"],
        preprocessing=_preprocessing(data["preprocessing"]),
        class_labels=tuple(data["class_labels"]),
        applied_preprocessing=_preprocessing(data["applied_preprocessing"]),
        preprocessing_sources=tuple(data["preprocessing_sources"]),
        served_class_labels=tuple(data["served_class_labels"]),
        warnings=tuple(data["warnings"]),
    )
