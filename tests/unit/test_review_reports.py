"""The report writers of `propscope review` on hand-built results."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
from PIL import Image

from propscope.review.report import render_html, render_junit, render_markdown, write_reports
from propscope.review.report.plots import (
    BASELINE_COLOR,
    CANDIDATE_COLOR,
    OTHER_COLORS,
    curves_png,
    distributions_png,
    model_colors,
)
from propscope.review.results import ModelEntry
from tests.review_samples import BASELINE, CANDIDATE, color_pixels, sample_review

PLOT_IMG = re.compile(r'<img class="plot" id="([^"]+)" src="data:image/png;base64,([^"]+)"')


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()
    return image


def test_junit_has_one_case_per_rule_and_failures_on_exactly_the_failed_ones():
    result = sample_review()
    text = render_junit(result)

    assert text.startswith("<?xml version='1.0' encoding='utf-8'?>")
    suites = ET.fromstring(text.encode("utf-8"))
    (suite,) = suites.findall("testsuite")
    assert suite.get("name") == "propscope review: classifier v2 vs v1"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "0")
    assert suite.get("time") == "12.500"
    cases = suite.findall("testcase")
    assert [case.get("name") for case in cases] == [o.name for o in result.outcomes]
    assert cases[0].get("classname") == "propscope.review.object_hue"
    failed = {case.get("name") for case in cases if case.find("failure") is not None}
    assert failed == {"no_regression[object_hue]"}
    failure = cases[0].find("failure")
    assert failure.get("type") == "no_regression"
    assert failure.get("message") == result.outcomes[0].message
    assert "tolerance: 0.1" in failure.text


def test_junit_without_rules_is_an_empty_valid_suite():
    suites = ET.fromstring(render_junit(sample_review(with_outcomes=False)).encode())
    assert suites.find("testsuite").get("tests") == "0"
    assert suites.find("testsuite/testcase") is None


def test_write_reports_writes_strict_json_that_keeps_every_number(tmp_path):
    result = sample_review()
    paths = write_reports(result, tmp_path / "out")

    assert {kind: path.name for kind, path in paths.items()} == {
        "markdown": "review.md",
        "junit": "junit.xml",
        "json": "review.json",
        "html": "review.html",
    }
    assert all(path.is_file() for path in paths.values())

    def reject(constant: str) -> None:
        raise AssertionError(f"{constant} in strict JSON")

    data = json.loads(paths["json"].read_text(encoding="utf-8"), parse_constant=reject)
    assert data["passed"] is False
    assert [rule["name"] for rule in data["rules"] if not rule["passed"]] == [
        "no_regression[object_hue]"
    ]
    for written, observation in zip(data["observations"], result.observations, strict=True):
        assert written["score"] == observation.score
        assert tuple(written["curve"]) == observation.curve
    assert data["strips"][0]["curves"][CANDIDATE.label] == list(
        result.strips[0].curves[CANDIDATE.label]
    )


def test_json_writes_non_finite_numbers_as_null(tmp_path):
    result = sample_review()
    original = result.observations[0]
    first = replace(original, p_value=math.inf, curve=(math.nan, *original.curve[1:]))
    outcome = replace(result.outcomes[0], details={"p_value": math.nan})
    broken = replace(
        result,
        seconds=math.nan,
        observations=(first, *result.observations[1:]),
        outcomes=(outcome, *result.outcomes[1:]),
    )
    data = json.loads(write_reports(broken, tmp_path)["json"].read_text())
    assert data["seconds"] is None
    assert data["observations"][0]["p_value"] is None
    assert data["observations"][0]["curve"] == [None, *original.curve[1:]]
    assert data["rules"][0]["details"]["p_value"] is None


def test_junit_stays_valid_xml_with_control_characters_in_text():
    result = sample_review()
    outcome = replace(result.outcomes[0], message="bad \x1b[31mred\x00")
    text = render_junit(replace(result, title="t\x07", outcomes=(outcome, *result.outcomes[1:])))
    failure = ET.fromstring(text.encode()).find("testsuite/testcase/failure")
    assert failure.get("message") == "bad \ufffd[31mred\ufffd"


def test_markdown_leads_with_the_verdict_and_names_the_failed_rule():
    text = render_markdown(sample_review())

    assert "❌ **1 of 3 rule checks failed**" in text
    assert "| no_regression | object_hue | ❌ failed | mean score 0.05 > 1.1 × 0.004 |" in text
    # A '|' inside a cell is escaped, so the table keeps its four columns.
    assert "flip rate 0% ≤ 10% \\| no flips" in text
    assert "| object_hue | classifier:v2 (candidate) | 6 | 0.09094 | 100% | 100% |" in text
    assert "the baseline reused 100% of the candidate's edited paths (12 of 12)" in text
    assert "`review.html`" in text and "`review.json`" in text


def test_markdown_of_a_passing_review():
    result = sample_review(properties=("patch", "object_hue"))
    # The regression is on the first property; drop the failed outcome.
    passing = replace(result, outcomes=result.outcomes[1:])
    assert "✅ **passed**: all 2 rule checks hold." in render_markdown(passing)


def test_html_embeds_every_plot_as_a_decodable_png_and_nothing_external():
    result = sample_review()
    html = render_html(result)

    plots = dict(PLOT_IMG.findall(html))
    assert sorted(plots) == [
        "curves-object_hue",
        "curves-patch",
        "distributions-object_hue",
        "distributions-patch",
    ]
    for data in plots.values():
        assert decode_png(base64.b64decode(data)).width >= 500
    # The strip: one image per step, each a PNG, and each model's p under it.
    strip_images = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="set/img_0.png', html)
    assert len(strip_images) == 11
    assert decode_png(base64.b64decode(strip_images[0])).size == (8, 8)
    assert "image-rendering: pixelated" in html
    assert f"p {result.strips[0].curves[BASELINE.label][10]:.3f}" in html
    assert "Failed: 1 of 3 rule checks failed." in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "<script" not in html and "<link" not in html


def test_html_escapes_property_names_and_keeps_ids_safe():
    name = '<script>alert("x")</script>'
    html = render_html(sample_review(properties=(name, "patch")))

    assert "<script" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    for anchor in re.findall(r'id="([^"]*)"', html):
        assert re.fullmatch(r"[A-Za-z0-9_-]+", anchor), anchor


def test_one_image_html_has_curves_only_and_no_rules_banner():
    result = sample_review(images=1, with_outcomes=False)
    html = render_html(result)

    assert [anchor for anchor, _ in PLOT_IMG.findall(html)] == ["curves-object_hue", "curves-patch"]
    assert 'class="banner' not in html
    assert "percentile" not in html
    assert distributions_png(result, "object_hue") is None


def test_curves_plot_draws_the_role_colors():
    result = sample_review()
    image = decode_png(curves_png(result, "object_hue"))

    assert 900 <= image.width <= 1000 and 300 <= image.height <= 450
    assert color_pixels(image, CANDIDATE_COLOR) > 300
    assert color_pixels(image, BASELINE_COLOR) > 300


def test_distributions_plot_is_a_png_of_sensible_size():
    image = decode_png(distributions_png(sample_review(), "patch"))
    assert 600 <= image.width <= 700 and 300 <= image.height <= 450
    assert color_pixels(image, CANDIDATE_COLOR) > 50


def test_models_without_a_candidate_or_baseline_role_get_other_colors():
    models = (
        CANDIDATE,
        BASELINE,
        ModelEntry("model", "synth_hue"),
        ModelEntry("model", "synth_patch"),
    )
    colors = model_colors(models)
    assert colors[CANDIDATE.label] == CANDIDATE_COLOR
    assert colors[BASELINE.label] == BASELINE_COLOR
    assert [colors["synth_hue"], colors["synth_patch"]] == list(OTHER_COLORS[:2])
    assert not {CANDIDATE_COLOR, BASELINE_COLOR} & set(OTHER_COLORS)


@pytest.mark.parametrize("images", [1, 3])
def test_explain_style_results_render(images):
    """`propscope explain --report`: several models with role "model" and no rules."""
    models = (ModelEntry("model", "synth_hue"), ModelEntry("model", "synth_patch"))
    result = sample_review(images=images, models=models, with_outcomes=False)
    html = render_html(result)
    assert "synth_patch" in html
    assert len(PLOT_IMG.findall(html)) == (2 if images == 1 else 4)
    assert "No rules were checked." in render_markdown(result)


def test_plots_render_the_same_from_several_threads():
    result = sample_review()
    serial = [curves_png(result, name) for name in result.properties]
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(curves_png, result, name) for name in result.properties * 8]
    assert [future.result() for future in futures] == serial * 8


def test_a_model_without_results_on_a_property_is_left_out_of_its_plots_and_tables():
    result = sample_review()
    observations = tuple(
        obs
        for obs in result.observations
        if not (obs.model == BASELINE.label and obs.property_name == "patch")
    )
    partial = replace(result, observations=observations)

    assert decode_png(curves_png(partial, "patch")).width > 500
    assert decode_png(distributions_png(partial, "patch")).width > 500
    assert "| patch | classifier:v1" not in render_markdown(partial)
    assert len(PLOT_IMG.findall(render_html(partial))) == 4


def test_large_path_images_are_embedded_as_thumbnails():
    review = sample_review()
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 30, 30)).save(buffer, format="PNG")
    (strip, *rest) = review.strips
    big = replace(strip, images=(buffer.getvalue(),) * len(strip.images))
    html = render_html(replace(review, strips=(big, *rest)))
    sizes = {
        decode_png(base64.b64decode(data)).size
        for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    }
    assert (160, 120) in sizes
    assert not any(width > 160 for width, _ in sizes)


def inconclusive_review(*, fail_on_inconclusive: bool, with_failure: bool):
    """The sample review with its second rule inconclusive (and its first failed or passed)."""
    result = sample_review()
    first, second, third = result.outcomes
    undecided = replace(second, verdict="inconclusive", message="p = 0.22 above, 0.4 within")
    first = first if with_failure else replace(first, verdict="passed")
    return replace(
        result,
        outcomes=(first, undecided, third),
        fail_on_inconclusive=fail_on_inconclusive,
    )


def test_an_inconclusive_rule_is_skipped_in_junit_and_named_in_every_report():
    result = inconclusive_review(fail_on_inconclusive=False, with_failure=False)
    assert (result.verdict, result.passed, result.gate_passed) == ("inconclusive", False, True)
    suite = ET.fromstring(render_junit(result).encode()).find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "0", "1")
    (skipped,) = suite.iter("skipped")
    assert skipped.get("message") == "inconclusive: p = 0.22 above, 0.4 within"
    markdown = render_markdown(result)
    assert "⚠️ **inconclusive**: 1 of 3 rule checks cannot be decided" in markdown
    assert "do not fail the gate (`fail_on_inconclusive` is off) but did not pass" in markdown
    assert "| no_regression | patch | ⚠️ inconclusive | p = 0.22 above, 0.4 within |" in markdown
    html = render_html(result)
    assert '<p class="banner inconclusive">' in html
    assert '<tr class="inconclusive">' in html and "<td>INCONCLUSIVE</td>" in html
    assert "Passed:" not in html


def test_with_fail_on_inconclusive_an_inconclusive_rule_is_a_junit_failure():
    result = inconclusive_review(fail_on_inconclusive=True, with_failure=False)
    assert not result.gate_passed
    suite = ET.fromstring(render_junit(result).encode()).find("testsuite")
    assert (suite.get("failures"), suite.get("skipped")) == ("1", "0")
    failure = next(suite.iter("failure"))
    assert failure.get("type") == "inconclusive"
    assert "inconclusive rules fail this gate" in render_markdown(result)
    assert "this fails the gate (fail_on_inconclusive)" in render_html(result)


def test_a_failure_leads_the_verdict_and_counts_the_inconclusive_beside_it():
    result = inconclusive_review(fail_on_inconclusive=True, with_failure=True)
    assert result.verdict == "failed"
    assert "❌ **1 of 3 rule checks failed**; 1 inconclusive." in render_markdown(result)
    assert "Failed: 1 of 3 rule checks failed; 1 inconclusive." in render_html(result)
    data = result.to_dict()
    assert (data["verdict"], data["passed"], data["fail_on_inconclusive"]) == (
        "failed",
        False,
        True,
    )
    assert [rule["verdict"] for rule in data["rules"]] == ["failed", "inconclusive", "passed"]
