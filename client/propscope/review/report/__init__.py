"""Report writers of ``propscope review``: Markdown for the merge request, JUnit XML for CI,
JSON with every number, and a self-contained HTML page with plots and path images."""

from __future__ import annotations

import json
from pathlib import Path

from propscope.review.report.common import FILE_NAMES
from propscope.review.report.html import render_html, render_interactions_html
from propscope.review.report.junit import render_junit
from propscope.review.report.markdown import render_markdown
from propscope.review.results import ReviewResult

__all__ = [
    "render_html",
    "render_interactions_html",
    "render_junit",
    "render_markdown",
    "write_reports",
]


def write_reports(result: ReviewResult, out_dir: Path) -> dict[str, Path]:
    """Write every report into ``out_dir`` (created if missing); report kind -> its path."""
    texts = {
        "markdown": render_markdown(result),
        "junit": render_junit(result),
        "json": json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n",
        "html": render_html(result),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {kind: out_dir / FILE_NAMES[kind] for kind in texts}
    for kind, text in texts.items():
        paths[kind].write_text(text, encoding="utf-8")
    return paths
