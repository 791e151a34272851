"""The review as one self-contained HTML page: CI keeps it as an artefact that opens offline,
so every plot and path image is inlined as a data URI and the page needs no script."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2
from PIL import Image

from propscope._interactions import InteractionsResult, Interval
from propscope.review.report.common import (
    ModelSummary,
    decisions_text,
    format_number,
    format_percent,
    strip_probability,
    strip_steps,
    summarize,
)
from propscope.review.report.plots import (
    curves_png,
    distributions_png,
    interaction_bars_png,
    model_colors,
)
from propscope.review.results import (
    AttributionObservation,
    InteractionObservation,
    PathStrip,
    ReviewResult,
)

__all__ = ["render_html", "render_interactions_html"]


# Per max_attribution_share rule, the overlays of the images with the highest shares.
ATTRIBUTION_OVERLAYS = 8

# Per max_interaction_share rule, the images with the highest shares listed.
INTERACTION_ROWS = 20

# Path images wider than this are shrunk: a strip of 50 full-size photos would make the page
# tens of megabytes, and the page shows them 80 px wide.
THUMBNAIL_PX = 160


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail_uri(png: bytes) -> str:
    with Image.open(io.BytesIO(png)) as image:
        if image.width <= THUMBNAIL_PX:
            return _png_uri(png)
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return _png_uri(buffer.getvalue())


_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("propscope.review.report"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENVIRONMENT.filters.update(
    number=format_number,
    percent=format_percent,
    png_uri=_png_uri,
    thumbnail_uri=_thumbnail_uri,
)
_ENVIRONMENT.globals.update(
    decisions_text=decisions_text, strip_probability=strip_probability, strip_steps=strip_steps
)


@dataclass(frozen=True)
class _PropertySection:
    name: str
    # Safe for an HTML id whatever the property is called.
    anchor: str
    summaries: list[ModelSummary]
    curves_png: bytes
    distributions_png: bytes | None
    strips: list[PathStrip]


@dataclass(frozen=True)
class _AttributionSection:
    """A ``max_attribution_share`` rule: its images with the highest shares, overlays shown."""

    name: str
    anchor: str
    images: int
    mean_share: float
    shown: list[AttributionObservation]


def _attribution_sections(result: ReviewResult) -> list[_AttributionSection]:
    names = list(dict.fromkeys(obs.rule for obs in result.attributions))
    anchors = _anchors(tuple(names))
    sections = []
    for name in names:
        observations = result.shares(name)
        ranked = sorted(observations, key=lambda obs: -obs.share)
        sections.append(
            _AttributionSection(
                name=name,
                anchor=anchors[name],
                images=len(observations),
                mean_share=sum(obs.share for obs in observations) / len(observations),
                shown=ranked[:ATTRIBUTION_OVERLAYS],
            )
        )
    return sections


@dataclass(frozen=True)
class _InteractionSection:
    """A ``max_interaction_share`` rule: first vs total order per property (means over the
    images), and its images with the highest interaction shares."""

    name: str
    anchor: str
    properties: tuple[str, ...]
    images: int
    confidence: float
    bars_png: bytes
    shown: list[InteractionObservation]
    # Images whose score barely moves, images with warnings, and their warnings.
    flat: int
    warned: int
    warnings: int


def _mean_estimates(
    observations: list[InteractionObservation], kind: str
) -> list[tuple[float, float, float]]:
    """Per property, the mean over images of the ``kind`` ("first"/"total") index and of its
    bounds."""
    columns = [
        [getattr(obs, f"{kind}{part}") for obs in observations] for part in ("", "_low", "_high")
    ]
    return [
        tuple(sum(row[p] for row in rows) / len(rows) for rows in columns)  # type: ignore[misc]
        for p in range(len(observations[0].properties))
    ]


def _interaction_sections(result: ReviewResult) -> list[_InteractionSection]:
    names = list(dict.fromkeys(obs.rule for obs in result.interactions))
    anchors = _anchors(tuple(names))
    sections = []
    for name in names:
        observations = result.interaction_indices(name)
        properties = observations[0].properties
        plural = "s" if len(observations) != 1 else ""
        sections.append(
            _InteractionSection(
                name=name,
                anchor=anchors[name],
                properties=properties,
                images=len(observations),
                confidence=observations[0].confidence,
                bars_png=interaction_bars_png(
                    f"{name}: mean over {len(observations)} image{plural}",
                    properties,
                    _mean_estimates(observations, "first"),
                    _mean_estimates(observations, "total"),
                ),
                shown=sorted(
                    observations, key=lambda obs: 0.0 if obs.negligible_variance else -obs.share
                )[:INTERACTION_ROWS],
                flat=sum(obs.negligible_variance for obs in observations),
                warned=sum(bool(obs.warnings) for obs in observations),
                warnings=sum(len(obs.warnings) for obs in observations),
            )
        )
    return sections


def render_interactions_html(image: str, target: str, results: Sequence[InteractionsResult]) -> str:
    """One image's interactions (``propscope interactions --report``): per model, first vs
    total order per property with their intervals, the interaction share and the cost."""
    models = [
        (
            found,
            interaction_bars_png(
                f"{found.model}: {image}",
                [item.name for item in found.indices],
                [_triple(item.first_order) for item in found.indices],
                [_triple(item.total_order) for item in found.indices],
            ),
        )
        for found in results
    ]
    return _ENVIRONMENT.get_template("interactions.html.j2").render(
        image=image, target=target, models=models
    )


def _triple(interval: Interval) -> tuple[float, float, float]:
    return interval.value, interval.low, interval.high


def render_html(result: ReviewResult) -> str:
    """The full report: settings, models, rules, then per property the means, plots and paths."""
    anchors = _anchors(result.properties)
    sections = [
        _PropertySection(
            name=name,
            anchor=anchors[name],
            summaries=[
                summary
                for model in result.models
                if (summary := summarize(result, model, name)) is not None
            ],
            curves_png=curves_png(result, name),
            distributions_png=distributions_png(result, name),
            strips=[strip for strip in result.strips if strip.property_name == name],
        )
        for name in result.properties
    ]
    return _ENVIRONMENT.get_template("report.html.j2").render(
        result=result,
        sections=sections,
        attribution_sections=_attribution_sections(result),
        interaction_sections=_interaction_sections(result),
        colors=model_colors(result.models),
        has_labels=any(label is not None for label in result.images.values()),
    )


def _anchors(names: tuple[str, ...]) -> dict[str, str]:
    """Property name -> a distinct id made of letters, digits, '-' and '_'."""
    anchors: dict[str, str] = {}
    for name in names:
        base = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "property"
        anchor, suffix = base, 2
        while anchor in anchors.values():
            anchor, suffix = f"{base}-{suffix}", suffix + 1
        anchors[name] = anchor
    return anchors
