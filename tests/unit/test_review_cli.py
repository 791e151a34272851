"""`propscope review`'s exit codes for failures that need no service (the others are in
tests/integration/test_review.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import propscope.review
from propscope._events import EditorParameter, ModelInfo, ModelRole
from propscope.cli import Connection, app
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


class FakeService:
    """ListModels of a service serving the classifiers new and old and the editor procedural."""

    target = "fake:1"

    def __enter__(self) -> FakeService:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def list_models(self) -> list[ModelInfo]:
        operation = EditorParameter("operation", "", "", ("hue", "blur"))
        region = EditorParameter("region", "", "", ())
        return [
            ModelInfo("new", ("1",), ModelRole.CLASSIFIER, "READY", (), (), 8, (), ""),
            ModelInfo("old", ("1",), ModelRole.CLASSIFIER, "READY", (), (), 8, (), ""),
            ModelInfo(
                "procedural", ("1",), ModelRole.EDITOR, "READY", (), (), 8, (operation, region), ""
            ),
        ]


SPEC = """\
candidate: {name: new}
baseline: {name: old}
images: {folder: images}
properties:
  hue: {editor: procedural, parameters: {operation: hue, region: object}}
rules: [{rule: max_score, max: 1, properties: [hue]}]
"""


def review_spec(folder: Path, text: str, images: int = 3) -> Path:
    (folder / "images").mkdir(exist_ok=True)
    for index in range(images):
        Image.new("RGB", (4, 4), (index, 0, 0)).save(folder / "images" / f"{index}.png")
    path = folder / "review.yaml"
    path.write_text(text)
    return path


def run_with_service(monkeypatch, spec: Path, out: Path):
    monkeypatch.setattr(Connection, "client", lambda _self, _target, _timeout: FakeService())
    return CliRunner().invoke(app, ["review", str(spec), "--out", str(out)])


def test_the_first_line_counts_one_model_and_one_property_in_the_singular(monkeypatch, tmp_path):
    text = SPEC.replace("baseline: {name: old}\n", "")
    monkeypatch.setattr(propscope.review, "run_review", lambda *_args, **_kwargs: sample_review())
    finished = run_with_service(monkeypatch, review_spec(tmp_path, text, images=1), tmp_path / "o")
    assert "propscope review: 1 image, 1 property, 1 model, " in finished.output, finished.output
    finished = run_with_service(monkeypatch, review_spec(tmp_path, SPEC), tmp_path / "p")
    assert "propscope review: 3 images, 1 property, 2 models, " in finished.output


def test_a_spec_with_four_typos_gets_all_four_in_one_run_one_per_line(monkeypatch, tmp_path):
    """A new user needed five runs to clear one file: a typo'd key hid the others, several
    shared a line, and the service's pre-flight came only once the file was right."""
    text = (
        SPEC.replace("baseline:", "baselin:")
        .replace("properties: [hue]", "properties: [hu]")
        .replace("region: object", "regoin: object")
        + "explain: {stpes: 4}\n"
    )
    finished = run_with_service(monkeypatch, review_spec(tmp_path, text), tmp_path / "out")
    assert finished.exit_code == 2
    lines = finished.stderr.splitlines()
    assert lines[0] == (
        f"propscope: error: {tmp_path / 'review.yaml'}: 4 problems found before any work started:"
    )
    assert [line.split(";")[0] for line in lines[1:]] == [
        "  - baselin: unknown key (did you mean 'baseline'?)",
        "  - rules[0].properties: unknown property 'hu' (did you mean 'hue'?)",
        "  - explain.stpes: unknown key (did you mean 'steps'?)",
        "  - property 'hue': editor 'procedural' has no parameter 'regoin' (did you mean "
        "'region'?)",
    ]
    assert not (tmp_path / "out").exists()


def test_the_image_sets_problems_come_with_the_services_in_one_list(monkeypatch, tmp_path):
    text = SPEC.replace("name: new", "name: nwe") + "  - {rule: no_regression, alpha: 0.05}\n"
    text = text.replace("rules: [{rule: max_score, max: 1, properties: [hue]}]\n", "rules:\n")
    finished = run_with_service(monkeypatch, review_spec(tmp_path, text), tmp_path / "out")
    assert finished.exit_code == 2
    assert finished.stderr.splitlines()[1:] == [
        "  - rules[0]: no_regression at alpha 0.05 needs at least 5 images to be able to fail; "
        "the set has 3",
        "  - candidate model 'nwe' is not served (did you mean 'new'?); served classifiers: "
        "new, old",
    ]


def test_the_pre_flight_of_a_valid_spec_prints_one_problem_per_line(monkeypatch, tmp_path):
    text = SPEC.replace("name: old", "name: odl").replace("operation: hue", "operation: hew")
    finished = run_with_service(monkeypatch, review_spec(tmp_path, text), tmp_path / "out")
    assert finished.exit_code == 2
    assert finished.stderr.splitlines()[1:] == [
        "propscope: error: 2 problems found before any work started:",
        "  - baseline model 'odl' is not served (did you mean 'old'?); served classifiers: new, "
        "old",
        "  - property 'hue': parameter 'operation' of 'procedural' is 'hew' (did you mean "
        "'hue'?); one of: hue, blur",
    ]


def test_a_spec_with_problems_and_no_service_names_them_and_says_what_was_not_checked(
    tmp_path,
):
    spec = review_spec(tmp_path, SPEC.replace("baseline:", "baselin:"))
    finished = CliRunner().invoke(
        app, ["review", str(spec), "--target", "127.0.0.1:1", "--out", str(tmp_path / "out")]
    )
    assert finished.exit_code == 2
    lines = finished.stderr.splitlines()
    assert lines[1].startswith("  - baselin: unknown key (did you mean 'baseline'?)")
    assert lines[2].startswith(
        "models, editors and settings not checked: cannot reach the service at 127.0.0.1:1"
    )
    assert "is the gateway running at 127.0.0.1:1?" in lines[2]
