"""The max_attribution_share review rule: its spec, the share of the attribution mass in a box,
the verdicts, and the runner and reports against a fake client (the real service is the
integration tests')."""

from __future__ import annotations

import io
import json
import re
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from propscope._attribution import (
    Attribution,
    EvaOptions,
    EvaResult,
    PerturbationSettings,
    SobolOptions,
)
from propscope._events import ModelRole
from propscope._properties import Box
from propscope.review.report import render_html, render_markdown, write_reports
from propscope.review.results import AttributionObservation, ReviewResult, Settings
from propscope.review.rules import attribution_share, box_pixels, evaluate_rules
from propscope.review.runner import ReviewError, run_review
from propscope.review.spec import MaxAttributionShareRule, load_spec
from tests.unit.test_review_runner import FakeClient, make_images, spec

CORNER = {"box": [0.5, 0.5, 1.0, 1.0]}


def share_rule() -> dict:
    return {"rule": "max_attribution_share", "name": "watermark", "region": CORNER, "max": 0.3}


# --- spec -----------------------------------------------------------------------------------


def test_spec_reads_the_rule_with_sobol_paper_defaults(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "images" / "a.png")
    path = tmp_path / "review.yaml"
    path.write_text(
        "candidate: {name: new}\n"
        "images: {folder: images}\n"
        "properties: {hue: 'procedural:operation=hue'}\n"
        "rules:\n"
        "  - rule: max_attribution_share\n"
        "    name: watermark\n"
        "    region: {box_px: [0, 0, 2, 2]}\n"
        "    max: 0.25\n"
        "    over: every_image\n"
        "    attribution: {estimator: janon, baseline: black, scrambled: true}\n"
    )
    loaded, _ = load_spec(path)
    (rule,) = loaded.attribution_rules()
    assert isinstance(rule, MaxAttributionShareRule)
    assert rule.region.to_box() == Box(0, 0, 2, 2, pixels=True)
    options = rule.attribution.client_options()
    assert (options["grid_size"], options["nb_design"]) == (8, 32)
    assert options["estimator"] == "janon" and options["baseline"] == "black"
    assert options["method"] == "sobol" and options["scrambled"] is True


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"region": {"box": [0, 0, 1, 1], "box_px": [0, 0, 1, 1]}}, "exactly one of box"),
        ({"region": {"box": [0.6, 0, 0.5, 1]}}, "LEFT < RIGHT"),
        ({"max": 1.5}, "less than or equal to 1"),
        ({"attribution": {"nb_design": 24}}, "power of two"),
        ({"attribution": {"method": "rise", "nb_design": 32}}, "are Sobol options"),
        ({"attribution": {"nb_samples": 100}}, "are RISE options"),
        ({"attribution": {"method": "rise", "scrambled": True}}, "are Sobol options"),
        ({"properties": ["hue"]}, r"rules\.0\.max_attribution_share\.properties"),
        ({"over": "median"}, "'mean' or 'every_image'"),
    ],
)
def test_spec_refuses_bad_rules_naming_the_key(rule, message):
    with pytest.raises(ValidationError, match=message):
        spec(rules=[{**share_rule(), **rule}])


def test_spec_refuses_two_rules_of_one_name():
    with pytest.raises(ValidationError, match="distinct names"):
        spec(rules=[share_rule(), share_rule()])


# --- the share ------------------------------------------------------------------------------


def test_share_counts_positive_mass_inside_the_box():
    values = np.zeros((4, 6), dtype=np.float32)
    values[0, 0] = 3.0  # outside the bottom-right quarter
    values[3, 5] = 1.0  # inside
    values[2, 3] = -5.0  # inside, negative: evidence against the class, left out
    share, mass = attribution_share(values, Box(0.5, 0.5, 1.0, 1.0))
    assert share == pytest.approx(0.25) and mass == pytest.approx(4.0)
    # the same box in pixels: columns 3..5, rows 2..3
    assert attribution_share(values, Box(3, 2, 6, 4, pixels=True))[0] == pytest.approx(0.25)
    assert attribution_share(np.full((2, 2), -1.0), Box(0, 0, 1, 1)) == (0.0, 0.0)


def test_box_covers_every_pixel_it_touches_and_at_least_one():
    # 0.1 of 10 columns to 0.25: columns 1 and 2 (2.5 touches column 2).
    assert box_pixels(Box(0.1, 0.0, 0.25, 0.05), 10, 10) == (0, 1, 1, 3)
    assert box_pixels(Box(0.999, 0.999, 1.0, 1.0), 3, 3) == (2, 3, 2, 3)
    assert box_pixels(Box(5, 5, 50, 50, pixels=True), 8, 8) == (5, 8, 5, 8)


def _result(shares: list[float]) -> ReviewResult:
    images = {f"{i}.png": None for i in range(len(shares))}
    return ReviewResult(
        title="t",
        settings=Settings("fake:1", 4, 1, 0, 0, 0.01, None, "predicted"),
        models=(),
        properties=("hue",),
        images=images,
        observations=(),
        attributions=tuple(
            AttributionObservation("watermark", image, "new", share, 1.0, "sobol", 2112, False, 0)
            for image, share in zip(images, shares, strict=True)
        ),
    )


def test_mean_and_every_image_verdicts():
    mean_rule = MaxAttributionShareRule.model_validate(share_rule())
    every_rule = mean_rule.model_copy(update={"over": "every_image"})
    result = _result([0.1, 0.2, 0.45])  # mean 0.25 <= 0.3, one image above it
    (mean,) = evaluate_rules([mean_rule], result)
    (every,) = evaluate_rules([every_rule], result)
    assert mean.passed and mean.property_name == "watermark"
    assert mean.details["mean_share"] == pytest.approx(0.25)
    assert mean.details["worst_image"] == "2.png"
    assert not every.passed and every.details["images_over_max"] == 1
    assert "1 of 3 images put more than 30.0% in watermark" in every.message
    (failed,) = evaluate_rules([mean_rule], _result([0.5, 0.4]))
    assert not failed.passed and "mean share 45.0%" in failed.message


# --- runner and reports ---------------------------------------------------------------------


class AttributingClient(FakeClient):
    """FakeClient that also makes attribution maps: image i's map holds i in its bottom-right
    quarter and 10 - i elsewhere, so its share there is i / (i + 3 (10 - i))."""

    def __init__(self, methods: tuple[str, ...] = ("propgrad", "sobol"), **kwargs) -> None:
        super().__init__(**kwargs)
        self.attribute_calls: list[dict] = []
        self._methods = methods
        self._attribute_lock = threading.Lock()

    def list_models(self):
        models = super().list_models()
        return [
            replace(m, methods=self._methods) if m.role == ModelRole.CLASSIFIER else m
            for m in models
        ]

    def attribute(self, image: bytes, model: str, **options) -> Attribution:
        with Image.open(io.BytesIO(image)) as decoded:
            index = decoded.getpixel((0, 0))[0]
            width, height = decoded.size
        with self._attribute_lock:
            self.attribute_calls.append({"image": f"{index}.png", "model": model, **options})
        values = np.full((height, width), 10.0 - index, dtype=np.float32)
        values[height // 2 :, width // 2 :] = index
        values.flags.writeable = False
        eva = _eva(options) if options["method"] == "eva" else None
        return Attribution(
            request_id="",
            method=options["method"],
            map=values,
            grid=values,
            channel_grid=None,
            options=(
                SobolOptions(options["grid_size"], options["nb_design"], "jansen", False)
                if eva is None
                else EvaOptions(8, 8 / 255, "crown", options["hybrid_layer"], 256)
            ),
            perturbation=PerturbationSettings("inpainting", "input_zero", 0.0),
            perturbation_description="inpainting toward black",
            target_score="probability",
            target_class=options["target_class"] or 0,
            target_label="circle",
            original_score=0.9,
            forward_passes=2112,
            planned_forward_passes=2112,
            planned_forward_passes_total=2113,
            cache_hit=False,
            total_ms=1.0,
            model_version="7",
            eva=eva,
        )


def _eva(options: dict) -> EvaResult:
    return EvaResult(
        guaranteed=not options["hybrid_layer"],
        bound="crown",
        epsilon=8 / 255,
        epsilon_input=(8.0, 8.0, 8.0),
        hybrid_layer=options["hybrid_layer"],
        overlap_bound=-1.0,
        adversary_class=1,
        adversary_label="square",
        sampled_overlap=-2.0,
        samples=256,
        region_bounds=np.full((8, 8), -1.5),
        certified=True,
        bound_passes=65,
        sample_passes=256,
        decision="certified",
        verdict="certified: no input of the ball makes another class reach the target",
    )


def _expected_share(index: int) -> float:
    return index / (index + 3 * (10 - index))


def test_runner_attributes_every_image_with_the_candidate_once_per_setting(tmp_path):
    client = AttributingClient()
    rules = [
        share_rule(),
        {**share_rule(), "name": "top_left", "region": {"box": [0, 0, 0.5, 0.5]}, "max": 0.9},
    ]
    updates = []
    result = run_review(
        spec(rules=rules), make_images(tmp_path, 4), client, on_progress=updates.append
    )
    # one map per image serves both rules (same attribution settings), from the candidate
    assert sorted(call["image"] for call in client.attribute_calls) == [
        f"{i}.png" for i in range(4)
    ]
    assert {call["model"] for call in client.attribute_calls} == {"new"}
    call = client.attribute_calls[0]
    assert (call["grid_size"], call["nb_design"], call["method"]) == (8, 32, "sobol")
    assert call["target_class"] is None  # unlabelled images: the predicted class
    shares = [obs.share for obs in result.shares("watermark")]
    assert shares == pytest.approx([_expected_share(i) for i in range(4)])
    mean = float(np.mean(shares))
    watermark, top_left = result.outcomes
    assert (watermark.passed, watermark.details["mean_share"]) == (mean <= 0.3, mean)
    assert top_left.property_name == "top_left" and top_left.passed
    assert [u.stage for u in updates].count("attribute") == 4
    assert {u.total for u in updates if u.stage == "attribute"} == {4}


def test_reports_show_the_overlays_and_json_keeps_the_shares(tmp_path):
    client = AttributingClient()
    images = make_images(tmp_path, 3)
    rule = {**share_rule(), "max": 0.05, "over": "every_image"}
    result = run_review(spec(rules=[rule]), images, client)
    assert not result.passed  # 2.png puts 2/26 = 7.7% in the corner
    html = render_html(result)
    assert 'id="attribution-watermark"' in html
    overlays = re.findall(r'<img src="(data:image/png;base64,[^"]+)" alt="watermark: ', html)
    assert len(overlays) == 3
    # highest share first
    assert html.index("<code>2.png</code><br>share") < html.index("<code>0.png</code><br>share")
    with Image.open(io.BytesIO(result.shares("watermark")[0].overlay)) as overlay:
        assert overlay.size == (4, 4)
    assert "max_attribution_share" in render_markdown(result)
    paths = write_reports(result, tmp_path / "out")
    document = json.loads(Path(paths["json"]).read_text())
    assert [a["share"] for a in document["attributions"]] == pytest.approx(
        [_expected_share(i) for i in range(3)]
    )
    assert "overlay" not in document["attributions"][0]


@pytest.mark.parametrize(
    ("hybrid_layer", "guarantee"),
    [("", "verified (guaranteed)"), ("features.3", "hybrid from features.3: NOT guaranteed")],
)
def test_eva_maps_are_checked_and_shown_with_their_guarantee(tmp_path, hybrid_layer, guarantee):
    client = AttributingClient(methods=("propgrad", "eva"))
    attribution = {"method": "eva", "epsilon": 0.02, "hybrid_layer": hybrid_layer}
    rule = {**share_rule(), "attribution": attribution}
    result = run_review(spec(rules=[rule]), make_images(tmp_path, 2), client)
    call = client.attribute_calls[0]
    assert (call["method"], call["epsilon"], call["hybrid_layer"]) == ("eva", 0.02, hybrid_layer)
    assert "nb_design" not in call and call["target_score"] == "auto"
    assert [obs.guarantee for obs in result.shares("watermark")] == [guarantee] * 2
    assert result.shares("watermark")[0].to_dict()["guarantee"] == guarantee
    html = render_html(result)
    assert html.count(f"eva ({guarantee}), class circle") == 2
    (outcome,) = evaluate_rules([MaxAttributionShareRule.model_validate(rule)], result)
    assert f"eva ({guarantee}) maps of 2 images" in outcome.message
    assert outcome.details["guarantee"] == guarantee
    overlays = re.findall(r'<img src="(data:image/png;base64,[^"]+)" alt="watermark: ', html)
    assert len(overlays) == 2


def test_eva_on_a_candidate_without_bounds_stops_the_review_before_any_work(tmp_path):
    client = AttributingClient(methods=("propgrad", "sobol", "rise"))
    rule = {**share_rule(), "attribution": {"method": "eva"}}
    with pytest.raises(ReviewError, match="cannot run eva; .* declares the bounds capability"):
        run_review(spec(rules=[rule]), make_images(tmp_path, 2), client)
    assert client.attribute_calls == []


def test_a_method_the_candidate_cannot_run_stops_the_review_before_any_work(tmp_path):
    client = AttributingClient(methods=("propgrad",))
    with pytest.raises(
        ReviewError, match="candidate model 'new' cannot run sobol; its methods: propgrad"
    ):
        run_review(spec(rules=[share_rule()]), make_images(tmp_path, 2), client)
    assert client.calls == [] and client.attribute_calls == []


def test_labelled_images_attribute_their_label(tmp_path):
    client = AttributingClient()
    images = [image.__class__(image.id, image.path, 1) for image in make_images(tmp_path, 2)]
    run_review(spec(rules=[share_rule()]), images, client)
    assert {call["target_class"] for call in client.attribute_calls} == {1}


def test_spec_without_attribution_rules_makes_no_maps(tmp_path):
    client = AttributingClient()
    result = run_review(spec(), make_images(tmp_path, 2), client)
    assert client.attribute_calls == [] and result.attributions == ()
    assert "attribution-" not in render_html(result)
