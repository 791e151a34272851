"""`propscope review` and `propscope explain --report` against the running service."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from propscope_dev import stack
from tests.integration.conftest import SAMPLE

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "review"
HUE_REVIEW = EXAMPLES / "hue-shortcut.yaml"
HUE = "object_hue=procedural:operation=hue,region=object"
BACKGROUND = "background=procedural:operation=brightness,region=background,amount=0.2"


def propscope_cli(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "propscope", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def example_variant(path: Path, *replacements: tuple[str, str]) -> Path:
    """The example spec with each (old, new) replaced once, written to ``path`` with its
    manifest still the example's."""
    text = HUE_REVIEW.read_text()
    for old, new in replacements:
        text = text.replace(old, new, 1)
    path.write_text(
        text.replace("manifest: manifest.csv", f"manifest: {EXAMPLES / 'manifest.csv'}")
    )
    return path


def review(spec: Path, target: str, out: Path) -> subprocess.CompletedProcess:
    return propscope_cli("review", str(spec), "--target", target, "--out", str(out))


def review_variant(
    live_stack, tmp_path: Path, *replacements: tuple[str, str]
) -> subprocess.CompletedProcess:
    """`propscope review` of the example spec with each (old, new) replaced once, against the
    shared stack, its reports in tmp_path / "out"."""
    spec = example_variant(tmp_path / "variant.yaml", *replacements)
    return review(spec, live_stack.gateway, tmp_path / "out")


@pytest.fixture(scope="module")
def hue_review(live_stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("hue-review")
    return review(HUE_REVIEW, live_stack.gateway, out), out


def test_the_hue_biased_candidate_fails_its_hue_and_accuracy_rules_only(hue_review):
    finished, out = hue_review
    assert finished.returncode == 1, finished.stderr
    suite = ElementTree.parse(out / "junit.xml").getroot().find("testsuite")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    failed = {name for name, case in cases.items() if case.find("failure") is not None}
    assert failed == {
        "min_accuracy[synth_hue]",
        "no_accuracy_regression[synth_hue]",
        "no_regression[object_hue]",
        "max_flip_rate[object_hue]",
    }
    assert "no_regression[background_brightness]" in cases
    assert int(suite.get("tests")) == len(cases) == 8
    assert int(suite.get("failures")) == 4 and int(suite.get("skipped")) == 0
    failure = cases["no_regression[object_hue]"].find("failure")
    assert "Wilcoxon" in failure.get("message")
    # 12 of 24 labelled originals right (the baseline: 24): the 90% exact interval of the
    # candidate's accuracy lies below 80%, and Newcombe's of the difference below -5 points.
    accuracy = cases["min_accuracy[synth_hue]"].find("failure").get("message")
    assert accuracy.startswith("accuracy 50.0% (12 of 24 labelled images), 90% interval 31.9%")
    drop = cases["no_accuracy_regression[synth_hue]"].find("failure").get("message")
    assert "difference -50.0%, 90% interval -65.9% to -31.1%" in drop


def test_the_review_json_holds_every_number_and_the_baseline_reuses_every_path(hue_review):
    _, out = hue_review
    data = json.loads((out / "review.json").read_text())
    assert data["passed"] is False and data["verdict"] == "failed"
    assert len(data["images"]) == 24
    assert len(data["observations"]) == 24 * 3 * 2
    models = {model["role"]: model for model in data["models"]}
    assert models["baseline"]["cache"]["hit_rate"] == 1.0
    assert models["baseline"]["cache"]["misses"] == 0
    # The hue-biased model follows hue, which the test set draws independently of the class.
    assert models["candidate"]["accuracy"] < models["baseline"]["accuracy"]
    rules = {rule["name"]: rule for rule in data["rules"]}
    hue_rule = rules["no_regression[object_hue]"]["details"]
    assert hue_rule["candidate_mean"] > 10 * hue_rule["baseline_mean"]
    assert hue_rule["p_value"] < 0.001
    assert data["settings"]["steps"] == 20 and data["settings"]["target_class"] == "label"
    assert len(data["strips"]) == 3 * 3


def test_the_review_prints_its_markdown_summary_and_writes_the_html(hue_review):
    finished, out = hue_review
    assert finished.stdout == (out / "review.md").read_text()
    assert "no_regression" in finished.stdout and "object_hue" in finished.stdout
    assert "FAILED" in finished.stderr
    html = (out / "review.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    # Two plots per property, and 3 strips of 21 path images per property.
    assert len(embedded) >= 3 * (2 + 3 * 21)
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in embedded)


def test_the_reverse_review_passes_with_exit_code_0(live_stack, tmp_path):
    finished = review_variant(
        live_stack,
        tmp_path,
        ("name: synth_unbiased", "name: synth_hue"),
        ("name: synth_hue", "name: synth_unbiased"),
        ("  - rule: max_flip_rate\n    properties: [object_hue]\n    max: 0.25\n", ""),
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    suite = ElementTree.parse(tmp_path / "out" / "junit.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) == 0 and int(suite.get("tests")) == 7
    assert int(suite.get("skipped")) == 0


def test_six_images_cannot_decide_min_accuracy_and_the_spec_says_whether_that_fails(
    live_stack, tmp_path
):
    """6 of 6 right: the 90% exact interval of the accuracy is [60.7%, 100%], which straddles
    90%. With fail_on_inconclusive the review exits 4 and JUnit fails the case as
    inconclusive; without it the review exits 0 and JUnit skips the case: never passed."""
    rows = (EXAMPLES / "manifest.csv").read_text().splitlines()[:7]
    manifest = "\n".join(rows).replace("images/", f"{EXAMPLES}/images/")
    (tmp_path / "manifest.csv").write_text(manifest)
    spec = tmp_path / "six.yaml"
    # One model and property, the example's settings: its edited paths are in the cache.
    spec.write_text(
        "candidate: {name: synth_unbiased}\n"
        "images: {manifest: manifest.csv}\n"
        "properties: {object_hue: 'procedural:operation=hue,region=object'}\n"
        "explain: {steps: 20}\n"
        "strips: 0\n"
        "fail_on_inconclusive: true\n"
        "rules: [{rule: min_accuracy, min: 0.9}]\n"
    )
    strict = review(spec, live_stack.gateway, tmp_path / "strict")
    assert strict.returncode == 4, strict.stdout + strict.stderr
    assert "INCONCLUSIVE" in strict.stderr
    case = ElementTree.parse(tmp_path / "strict" / "junit.xml").getroot().find(".//testcase")
    failure = case.find("failure")
    assert failure.get("type") == "inconclusive"
    assert failure.get("message") == (
        "inconclusive: accuracy 100.0% (6 of 6 labelled images), 90% interval 60.7%–100.0%; "
        "required at least 90.0% (the interval straddles it: more images needed)"
    )
    spec.write_text(
        spec.read_text().replace("fail_on_inconclusive: true", "fail_on_inconclusive: false")
    )
    lenient = review(spec, live_stack.gateway, tmp_path / "lenient")
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert "⚠️ **inconclusive**: 1 of 1 rule checks cannot be decided" in lenient.stdout
    case = ElementTree.parse(tmp_path / "lenient" / "junit.xml").getroot().find(".//testcase")
    assert case.find("skipped") is not None and case.find("failure") is None


def test_a_spec_error_exits_2_naming_the_key(live_stack, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(HUE_REVIEW.read_text() + "treshold: 3\n")
    finished = review(spec, live_stack.gateway, tmp_path / "out")
    assert finished.returncode == 2
    assert "treshold: unknown key; allowed keys: title, service" in finished.stderr
    assert "Traceback" not in finished.stderr
    assert not (tmp_path / "out").exists()


def test_an_unreachable_service_exits_2(tmp_path):
    finished = review(HUE_REVIEW, f"127.0.0.1:{stack.free_port()}", tmp_path / "out")
    assert finished.returncode == 2
    assert "cannot reach the service" in finished.stderr
    assert "UNAVAILABLE" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_an_unreadable_image_exits_2_naming_it(live_stack, tmp_path):
    (tmp_path / "broken.png").write_text("not a PNG")
    manifest = (EXAMPLES / "manifest.csv").read_text().replace("images/", f"{EXAMPLES}/images/")
    (tmp_path / "manifest.csv").write_text(manifest + "broken.png,0\n")
    spec = tmp_path / "broken.yaml"
    spec.write_text(HUE_REVIEW.read_text())
    finished = review(spec, live_stack.gateway, tmp_path / "out")
    assert finished.returncode == 2
    assert "cannot use image" in finished.stderr and "broken.png" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_a_request_the_service_refuses_exits_2_with_its_status(live_stack, tmp_path):
    # A value's type is the server's to check: ListModels does not describe it.
    finished = review_variant(live_stack, tmp_path, ("amount: 0.2", "amount: lots"))
    assert finished.returncode == 2
    assert "INVALID_ARGUMENT" in finished.stderr and "lots" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_the_pre_flight_names_every_unknown_editor_parameter_and_choice_before_any_work(
    live_stack, tmp_path
):
    finished = review_variant(
        live_stack,
        tmp_path,
        ("operation=blend", "operation=blendd"),
        ("region: background", "regoin: background"),
        ("name: synth_unbiased", "name: synth_unbaised"),
    )
    assert finished.returncode == 2
    assert "3 problems found before any work started:" in finished.stderr
    assert "baseline model 'synth_unbaised' is not served (did you mean 'synth_unbiased'?)" in (
        finished.stderr
    )
    assert (
        "property 'background_brightness': editor 'procedural' has no parameter 'regoin' "
        "(did you mean 'region'?)" in finished.stderr
    )
    assert (
        "property 'patch': parameter 'operation' of 'procedural' is 'blendd' (did you mean "
        "'blend'?)" in finished.stderr
    )
    assert not (tmp_path / "out").exists()


def test_an_unknown_candidate_exits_2_listing_the_served_classifiers(live_stack, tmp_path):
    finished = review_variant(live_stack, tmp_path, ("name: synth_hue", "name: synth_typo"))
    assert finished.returncode == 2
    assert "candidate model 'synth_typo' is not served" in finished.stderr
    assert "synth_hue" in finished.stderr


def test_explain_writes_the_same_html_report_for_one_image(live_stack, tmp_path):
    report = tmp_path / "one.html"
    finished = propscope_cli(
        "explain", str(SAMPLE), "--target", live_stack.gateway,
        "--model", "synth_hue", "--model", "synth_unbiased",
        "--property", HUE, "--property", BACKGROUND, "--steps", "8",
        "--report", str(report),
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    html = report.read_text()
    assert "synth_hue" in html and "synth_unbiased" in html
    assert html.count('id="curves-') == 2
    embedded = re.findall(r'src="data:image/png;base64,', html)
    # One curve plot and one strip of 9 path images per property.
    assert len(embedded) == 2 * (1 + 9)


def test_a_stack_serving_the_callers_model_repository_reviews_their_model(tmp_path):
    """The CI recipe of docs/review.md: `propscope-dev up --model-repository` serves the
    team's own classifier beside propscope's editors, and the review runs against it. The
    team's config declares no `propscope.role`: any model that is not an editor is a
    classifier, for the review as for explain."""
    models = Path(stack.DEFAULT_MODEL_REPOSITORY)
    weights = (models.parent / "weights").resolve()
    candidate = tmp_path / "models" / "team_classifier"
    (candidate / "1").mkdir(parents=True)
    config = (models / "synth_hue" / "config.pbtxt").read_text()
    config = config.replace('name: "synth_hue"', 'name: "team_classifier"')
    config = "".join(
        line for line in config.splitlines(keepends=True) if "propscope.role" not in line
    )
    assert "propscope.role" not in config and "weights" in config
    (candidate / "config.pbtxt").write_text(config.replace("../../weights/", f"{weights}/"))
    shutil.copy(models / "synth_hue" / "1" / "model.py", candidate / "1" / "model.py")
    server = str(Path(sys.executable).parent / "propscope-dev")
    port = stack.free_port()
    run_dir = tmp_path / "stack"
    started = subprocess.run(
        [server, "up", "--port", str(port), "--run-dir", str(run_dir), "--no-redis",
         "--model-repository", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        spec = example_variant(
            tmp_path / "team.yaml",
            ("name: synth_unbiased", "name: synth_hue"),
            ("name: synth_hue", "name: team_classifier"),
        )
        finished = review(spec, f"127.0.0.1:{port}", tmp_path / "out")
    finally:
        subprocess.run([server, "down", "--run-dir", str(run_dir)], timeout=60)
    assert finished.returncode == 1, finished.stderr
    # The same weights as the baseline: no regression, but the hue flips stay.
    data = json.loads((tmp_path / "out" / "review.json").read_text())
    rules = {rule["name"]: rule["passed"] for rule in data["rules"]}
    assert rules["no_regression[object_hue]"] is True
    assert rules["max_flip_rate[object_hue]"] is False
    assert [model["name"] for model in data["models"]] == ["team_classifier", "synth_hue"]


def test_reports_that_cannot_be_written_exit_2(live_stack, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    finished = review(HUE_REVIEW, live_stack.gateway, blocker / "out")
    assert finished.returncode == 2
    assert "cannot write the reports" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_max_attribution_share_fails_a_model_that_looks_at_the_object(live_stack, tmp_path):
    """The hue-biased candidate's Sobol mass sits on the object in the middle of each image:
    a rule that allows at most 5% there fails (exit 1), one that allows 95% passes."""
    rules = (
        "rules:\n"
        "  - rule: max_attribution_share\n"
        "    name: centre\n"
        "    region: {box: [0.25, 0.25, 0.75, 0.75]}\n"
        "    max: 0.05\n"
        "    attribution: {grid_size: 4, nb_design: 8}\n"
        "  - rule: max_attribution_share\n"
        "    name: centre_loose\n"
        "    region: {box: [0.25, 0.25, 0.75, 0.75]}\n"
        "    max: 0.95\n"
        "    attribution: {grid_size: 4, nb_design: 8}\n"
        "  - rule: max_attribution_share\n"
        "    name: centre_eva\n"
        "    region: {box: [0.25, 0.25, 0.75, 0.75]}\n"
        "    max: 1\n"
        "    attribution: {method: eva, grid_size: 4, samples: 8}\n"
    )
    text = HUE_REVIEW.read_text()
    finished = review_variant(
        live_stack, tmp_path, (text[text.index("rules:") :], rules), ("steps: 20", "steps: 8")
    )
    out = tmp_path / "out"
    assert finished.returncode == 1, finished.stdout + finished.stderr
    suite = ElementTree.parse(out / "junit.xml").getroot().find("testsuite")
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["max_attribution_share[centre]"].find("failure") is not None
    assert cases["max_attribution_share[centre_loose]"].find("failure") is None
    shares = json.loads((out / "review.json").read_text())["attributions"]
    assert shares, "review.json keeps every image's share"
    # EVA's maps, on the same open candidate: verified, and said so under each overlay.
    assert cases["max_attribution_share[centre_eva]"].find("failure") is None
    eva = [share for share in shares if share["rule"] == "centre_eva"]
    assert eva and {share["guarantee"] for share in eva} == {"verified (guaranteed)"}
    assert "eva (verified (guaranteed))" in (out / "review.html").read_text()
