"""`propscope review`'s exit codes for failures that need no service (the others are in
tests/integration/test_review.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import propscope.review
from propscope.cli import app
from tests.review_samples import sample_review

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "review" / "hue-shortcut.yaml"


def test_an_unexpected_error_exits_2_not_1(monkeypatch, tmp_path):
    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(propscope.review, "run_review", broken)
    finished = CliRunner().invoke(app, ["review", str(EXAMPLE), "--out", str(tmp_path)])
    assert finished.exit_code == 2
    assert "the review failed unexpectedly: ZeroDivisionError: division by zero" in finished.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("fail_on_inconclusive", "exit_code"),
    [(False, 0), (True, 4)],
)
def test_an_inconclusive_review_exits_4_only_when_the_spec_says_so(
    monkeypatch, tmp_path, fail_on_inconclusive, exit_code
):
    result = sample_review()
    first, second, third = result.outcomes
    undecided = replace(
        result,
        outcomes=(replace(first, verdict="passed"), replace(second, verdict="inconclusive"), third),
        fail_on_inconclusive=fail_on_inconclusive,
    )
    monkeypatch.setattr(propscope.review, "run_review", lambda *_args, **_kwargs: undecided)
    finished = CliRunner().invoke(app, ["review", str(EXAMPLE), "--out", str(tmp_path)])
    assert finished.exit_code == exit_code, finished.output
    assert "propscope review: INCONCLUSIVE in" in finished.output
    assert "⚠️ **inconclusive**" in finished.output
