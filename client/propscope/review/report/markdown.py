"""The review as a merge-request comment (GitHub/GitLab Markdown): the verdict first, then the
numbers a reviewer compares; the HTML and JSON artefacts hold the rest."""

from __future__ import annotations

from collections.abc import Sequence

from propscope.review.report.common import (
    FILE_NAMES,
    decisions_text,
    format_number,
    format_percent,
    summarize,
)
from propscope.review.results import InteractionObservation, Observation, ReviewResult

__all__ = ["render_markdown"]

WARNINGS_SHOWN = 5
VERDICT_WORDS = {"passed": "✅ passed", "failed": "❌ failed", "inconclusive": "⚠️ inconclusive"}


def render_markdown(result: ReviewResult) -> str:
    """Headline, rules, per-property means, cache reuse, settings and where the artefacts are."""
    lines = [f"## propscope review: {_cell(result.title)}", "", _headline(result), ""]
    if result.outcomes:
        lines += _table(
            ["rule", "property", "result", "message"],
            [
                [o.rule, o.property_name, VERDICT_WORDS[o.verdict], o.message]
                for o in result.outcomes
            ],
        )
    lines += _table(
        ["property", "model", "images", "mean score", "significant", "flip rate", "decisions"],
        [
            [
                name,
                f"{summary.model.label} ({summary.model.role})",
                str(summary.images),
                format_number(summary.score),
                format_percent(summary.significant),
                format_percent(summary.flip_rate),
                decisions_text(result.decisions(model.label, name)),
            ]
            for name in result.properties
            for model in result.models
            if (summary := summarize(result, model, name)) is not None
        ],
    )
    lines += _warnings(result)
    lines += [_cache_line(result), "", _settings_line(result), ""]
    lines.append(
        f"Plots and path images: `{FILE_NAMES['html']}`; every number: `{FILE_NAMES['json']}`; "
        f"one test case per rule: `{FILE_NAMES['junit']}` (in this job's artefacts)."
    )
    return "\n".join(lines) + "\n"


def _warnings(result: ReviewResult) -> list[str]:
    """What the service could not be sure of: each model's warnings, then each property's
    (per image, at most ``WARNINGS_SHOWN`` per model and property; the JSON has them all)."""
    lines = [
        f"- **{model.label}** ({model.role}): {_cell(warning)}"
        for model in result.models
        for warning in model.warnings
    ]
    for name in result.properties:
        for model in result.models:
            lines += _capped_warnings(
                f"**{name}**, {model.label}", result.select(model.label, name)
            )
    for rule in dict.fromkeys(obs.rule for obs in result.interactions):
        lines += _capped_warnings(f"**{rule}** (interactions)", result.interaction_indices(rule))
    return ["**Warnings**", "", *lines, ""] if lines else []


def _capped_warnings(
    label: str, observations: Sequence[Observation | InteractionObservation]
) -> list[str]:
    """The observations' warnings, one line per image's warning, at most ``WARNINGS_SHOWN``."""
    found = [(obs.image, warning) for obs in observations for warning in obs.warnings]
    lines = [f"- {label}, `{image}`: {_cell(warning)}" for image, warning in found[:WARNINGS_SHOWN]]
    if len(found) > WARNINGS_SHOWN:
        lines.append(
            f"- {label}: {len(found) - WARNINGS_SHOWN} more warnings in `{FILE_NAMES['json']}`"
        )
    return lines


def _headline(result: ReviewResult) -> str:
    total = len(result.outcomes)
    if not total:
        return "No rules were checked."
    if result.passed:
        return f"✅ **passed**: all {total} rule checks hold."
    undecided = len(result.inconclusive)
    gate = (
        "inconclusive rules fail this gate (`fail_on_inconclusive`)"
        if result.fail_on_inconclusive
        else "they do not fail the gate (`fail_on_inconclusive` is off) but did not pass"
    )
    if result.failures:
        line = f"❌ **{len(result.failures)} of {total} rule checks failed**"
        return line + (f"; {undecided} inconclusive." if undecided else ".")
    return (
        f"⚠️ **inconclusive**: {undecided} of {total} rule checks cannot be decided on this "
        f"image set (too few images for the effect); {gate}."
    )


def _cache_line(result: ReviewResult) -> str:
    overall = result.cache()
    line = (
        f"Path cache: {format_percent(overall.hit_rate)} of all edited paths were reused "
        f"({overall.hits} hits, {overall.misses} misses)"
    )
    candidate, baseline = result.model("candidate"), result.model("baseline")
    if candidate is not None and baseline is not None:
        stats = result.cache(baseline.label)
        line += (
            f"; the baseline reused {format_percent(stats.hit_rate)} of the candidate's "
            f"edited paths ({stats.hits} of {stats.hits + stats.misses})"
        )
    return line + "."


def _settings_line(result: ReviewResult) -> str:
    s = result.settings
    paths = f"steps N = {s.steps}"
    if s.path_mode == "adaptive":
        paths += f" (adaptive paths up to {s.max_steps}; scores stated at N = {s.steps})"
    return (
        f"Settings: target `{s.target}`, {paths}, samples {s.samples}, seed {s.seed}, "
        f"permutations {s.permutations}, alpha {format_number(s.alpha)}, minimum Δp "
        f"{format_number(s.min_probability_change)}, target class: {s.target_class}; "
        f"{len(result.images)} images, {format_number(result.seconds)} s."
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines + [""]


def _cell(text: str) -> str:
    """One line with every '|' escaped, so text cannot break the table."""
    return " ".join(text.split()).replace("|", "\\|")
