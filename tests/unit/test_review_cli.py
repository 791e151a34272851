"""`propscope review`'s exit codes for failures that need no service (the others are in
tests/integration/test_review.py)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import propscope.review
from propscope.cli import app

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "review" / "hue-shortcut.yaml"


def test_an_unexpected_error_exits_2_not_1(monkeypatch, tmp_path):
    def broken(*_args, **_kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(propscope.review, "run_review", broken)
    finished = CliRunner().invoke(app, ["review", str(EXAMPLE), "--out", str(tmp_path)])
    assert finished.exit_code == 2
    assert "the review failed unexpectedly: ZeroDivisionError: division by zero" in finished.output
    assert not list(tmp_path.iterdir())
