"""The review as a merge-request comment (GitHub/GitLab Markdown): the verdict first, then the
numbers a reviewer compares; the HTML and JSON artefacts hold the rest."""

from __future__ import annotations

from propscope.review.report.common import (
    FILE_NAMES,
    format_number,
    format_percent,
    summarize,
)
from propscope.review.results import ReviewResult

__all__ = ["render_markdown"]


def render_markdown(result: ReviewResult) -> str:
    """Headline, rules, per-property means, cache reuse, settings and where the artefacts are."""
    lines = [f"## propscope review: {_cell(result.title)}", "", _headline(result), ""]
    if result.outcomes:
        lines += _table(
            ["rule", "property", "result", "message"],
            [
                [o.rule, o.property_name, "✅ passed" if o.passed else "❌ failed", o.message]
                for o in result.outcomes
            ],
        )
    lines += _table(
        ["property", "model", "images", "mean score", "significant", "flip rate"],
        [
            [
                name,
                f"{summary.model.label} ({summary.model.role})",
                str(summary.images),
                format_number(summary.score),
                format_percent(summary.significant),
                format_percent(summary.flip_rate),
            ]
            for name in result.properties
            for model in result.models
            if (summary := summarize(result, model, name)) is not None
        ],
    )
    lines += [_cache_line(result), "", _settings_line(result), ""]
    lines.append(
        f"Plots and path images: `{FILE_NAMES['html']}`; every number: `{FILE_NAMES['json']}`; "
        f"one test case per rule: `{FILE_NAMES['junit']}` (in this job's artefacts)."
    )
    return "\n".join(lines) + "\n"


def _headline(result: ReviewResult) -> str:
    total = len(result.outcomes)
    if not total:
        return "No rules were checked."
    if result.passed:
        return f"✅ **passed**: all {total} rule checks hold."
    return f"❌ **{len(result.failures)} of {total} rule checks failed**."


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
    return (
        f"Settings: target `{s.target}`, steps N = {s.steps}, samples {s.samples}, seed {s.seed}, "
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
