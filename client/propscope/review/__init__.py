"""``propscope review``: a yes/no gate for a candidate classifier, with reports people read.

A YAML spec names the candidate (and a baseline), an image set, the properties to intervene on
and the rules; ``run_review`` explains every image through the service, checks the rules and
returns a ``ReviewResult``; ``write_reports`` writes it as Markdown, JUnit XML, JSON and HTML.
``run_shard`` explains one shard's images into a ``ReviewPartial`` and ``merge_partials`` turns
every shard's partial into the ``ReviewResult`` one run gives.
Needs the ``review`` extra (PyYAML, pydantic, SciPy, matplotlib, Jinja2).
"""

from propscope.review.explanation import explanation_result
from propscope.review.report import render_html, render_interactions_html, write_reports
from propscope.review.results import (
    CacheStats,
    ModelEntry,
    Observation,
    PathStrip,
    ReviewResult,
    RuleOutcome,
    Settings,
)
from propscope.review.rules import evaluate_rules
from propscope.review.runner import ReviewError, ReviewProgress, run_review, service_problems
from propscope.review.shards import (
    PARTIAL_FILE,
    MergeError,
    ReviewPartial,
    Shard,
    merge_partials,
    read_partial,
    run_shard,
    spec_digest,
)
from propscope.review.spec import ImageEntry, ReviewSpec, ServiceChecks, SpecError, load_spec

__all__ = [
    "PARTIAL_FILE",
    "CacheStats",
    "ImageEntry",
    "MergeError",
    "ModelEntry",
    "Observation",
    "PathStrip",
    "ReviewError",
    "ReviewPartial",
    "ReviewProgress",
    "ReviewResult",
    "ReviewSpec",
    "RuleOutcome",
    "ServiceChecks",
    "Shard",
    "Settings",
    "SpecError",
    "evaluate_rules",
    "explanation_result",
    "load_spec",
    "merge_partials",
    "read_partial",
    "render_html",
    "render_interactions_html",
    "run_review",
    "run_shard",
    "service_problems",
    "spec_digest",
    "write_reports",
]
