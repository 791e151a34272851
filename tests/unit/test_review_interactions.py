"""The max_interaction_share review rule: its spec, its verdicts from the images' intervals,
the runner, the sharded partial and the reports against a fake client (the real service is
tests/integration/test_interactions_clients.py's)."""

from __future__ import annotations

import io
import json
import re
import threading
from dataclasses import replace

import pytest
from PIL import Image
from pydantic import ValidationError

from propscope._interactions import InteractionsResult, Interval, PropertyIndices
from propscope.review.report import write_reports
from propscope.review.results import InteractionObservation, ReviewResult, Settings
from propscope.review.rules import evaluate_rules
from propscope.review.runner import run_review
from propscope.review.shards import ReviewPartial, Shard, merge_partials, run_shard
from propscope.review.spec import MaxInteractionShareRule
from tests.unit.test_review_runner import FakeClient, make_images, spec

PROPERTIES = {"hue": "procedural:operation=hue", "blur": "procedural:operation=blur"}


def share_rule(**changes: object) -> dict:
    return {"rule": "max_interaction_share", "max": 0.2, **changes}


def interactions_spec(*rules: dict, **changes: object):
    return spec(properties=PROPERTIES, rules=list(rules) or [share_rule()], **changes)


# --- spec -----------------------------------------------------------------------------------


def test_spec_reads_the_rule_and_its_settings():
    loaded = interactions_spec(
        share_rule(properties=["blur", "hue"], interactions={"design_size": 8, "seed": 3})
    )
    (rule,) = loaded.interaction_rules()
    assert isinstance(rule, MaxInteractionShareRule) and rule.name == "interactions"
    assert rule.interactions.client_options() == {
        "design_size": 8,
        "bootstrap": 0,
        "confidence": 0.95,
        "target_score": "auto",
        "seed": 3,
    }
    candidate = loaded.service_checks().classifiers[0]
    assert "interactions" in candidate.methods


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"properties": ["hue"]}, "needs at least two properties, got 1"),
        ({"properties": ["hue", "colour"]}, "unknown property 'colour'"),
        ({"interactions": {"design_size": 24}}, "power of two, got 24; the nearest: 16 or 32"),
        ({"interactions": {"confidence": 1.0}}, "less than 1"),
        ({"max": -0.1}, "greater than or equal to 0"),
        ({"over": "median"}, "'mean' or 'every_image'"),
    ],
)
def test_spec_refuses_bad_rules_naming_the_key(changes, message):
    with pytest.raises(ValidationError, match=message):
        interactions_spec(share_rule(**changes))


def test_spec_refuses_a_provided_path_and_two_rules_of_one_name():
    with pytest.raises(ValidationError, match="'rain' is a provided path"):
        spec(properties={**PROPERTIES, "rain": "@paths/{stem}"}, rules=[share_rule()])
    with pytest.raises(ValidationError, match="distinct names"):
        interactions_spec(share_rule(), share_rule())


# --- verdicts -------------------------------------------------------------------------------


def observation(image: str, share: float, low: float, high: float) -> InteractionObservation:
    return InteractionObservation(
        rule="interactions",
        image=image,
        model="new",
        properties=("hue", "blur"),
        first=(0.4, 0.2),
        first_low=(0.3, 0.1),
        first_high=(0.5, 0.3),
        total=(0.5, 0.3),
        total_low=(0.4, 0.2),
        total_high=(0.6, 0.4),
        share=share,
        share_low=low,
        share_high=high,
        significant=low > 0,
        variance=0.05,
        target_class=1,
        design_size=16,
    )


def result_of(*observations: InteractionObservation) -> ReviewResult:
    return ReviewResult(
        title="t",
        settings=Settings("fake:1", 4, 1, 0, 0, 0.01, None, "predicted"),
        models=(),
        properties=("hue", "blur"),
        images={obs.image: None for obs in observations},
        observations=(),
        interactions=observations,
    )


@pytest.mark.parametrize(
    ("over", "intervals", "verdict"),
    [
        # mean: the images' bounds averaged against max 0.2
        ("mean", [(0.1, 0.05, 0.15), (0.2, 0.1, 0.2)], "passed"),
        ("mean", [(0.3, 0.25, 0.4), (0.3, 0.22, 0.35)], "failed"),
        ("mean", [(0.1, 0.0, 0.3), (0.3, 0.25, 0.4)], "inconclusive"),
        # every image: one interval above max fails, one straddling leaves it open
        ("every_image", [(0.1, 0.05, 0.15), (0.3, 0.21, 0.4)], "failed"),
        ("every_image", [(0.1, 0.05, 0.15), (0.2, 0.1, 0.3)], "inconclusive"),
        ("every_image", [(0.1, 0.05, 0.15), (0.15, 0.1, 0.2)], "passed"),
    ],
)
def test_the_verdict_reads_the_lower_bound_to_fail_and_the_upper_to_pass(over, intervals, verdict):
    rule = MaxInteractionShareRule.model_validate(share_rule(over=over))
    result = result_of(*(observation(f"{i}.png", *t) for i, t in enumerate(intervals)))
    (outcome,) = evaluate_rules([rule], result)
    assert outcome.verdict == verdict and outcome.name == "max_interaction_share[interactions]"
    assert outcome.details["images"] == 2 and outcome.details["properties"] == "hue, blur"
    if verdict == "inconclusive":
        assert "straddle" in outcome.message


@pytest.mark.parametrize("over", ["mean", "every_image"])
def test_an_image_whose_score_barely_moves_counts_as_share_0(over):
    rule = MaxInteractionShareRule.model_validate(share_rule(over=over))
    # The user trial's flat score: a noisy share whose interval lies above max (failed
    # before), and one that straddles it (inconclusive before: "a larger design_size").
    flat = [
        replace(observation("0.png", 2.92, 0.48, 45.5), negligible_variance=True,
                significant=False, variance=7e-11, warnings=("barely moves", "other")),
        replace(observation("1.png", 1.0, -3.0, 40.0), negligible_variance=True,
                variance=2e-9, warnings=("barely moves",)),
    ]  # fmt: skip
    (outcome,) = evaluate_rules([rule], result_of(*flat))
    assert outcome.verdict == "passed"
    assert "2 of 2 images flat (the score barely moves: counted as share 0)" in outcome.message
    assert "2 images with warnings (3 in all)" in outcome.message
    assert "larger design_size" not in outcome.message
    assert outcome.details["images_flat"] == 2 and outcome.details["max_share"] == 0.0
    assert (outcome.details["images_with_warnings"], outcome.details["warnings"]) == (2, 3)
    # Beside an image that moves, the flat one weighs 0 in the mean and never fails.
    moving = observation("2.png", 0.3, 0.25, 0.4)
    (mixed,) = evaluate_rules([rule], result_of(flat[0], moving))
    # mean: bounds (0 + 0.25) / 2 .. (0 + 0.4) / 2 = 0.2 <= max; every image: 2.png fails.
    assert mixed.verdict == ("passed" if over == "mean" else "failed")
    assert mixed.details["mean_share_low"] == pytest.approx(0.125)
    assert mixed.details["mean_share_high"] == pytest.approx(0.2)
    assert mixed.details["worst_image"] == "2.png"


def test_the_reports_show_each_rules_flat_images_and_warning_counts(tmp_path):
    rule = MaxInteractionShareRule.model_validate(share_rule())
    flat = replace(observation("0.png", 2.92, 0.48, 45.5), negligible_variance=True,
                   significant=False, warnings=("the score barely moves", "another"))  # fmt: skip
    result = result_of(flat, observation("1.png", 0.1, 0.05, 0.15))
    result = replace(result, outcomes=tuple(evaluate_rules([rule], result)))
    paths = write_reports(result, tmp_path / "out")
    markdown = paths["markdown"].read_text()
    assert "1 of 2 images flat (the score barely moves: counted as share 0)" in markdown
    assert "1 image with warnings (2 in all)" in markdown
    assert "- **interactions** (interactions), `0.png`: the score barely moves" in markdown
    html = paths["html"].read_text()
    section = re.search(r'<section id="interactions-interactions">(.*?)</section>', html, re.DOTALL)
    assert section is not None
    rows = re.findall(r"<tr>\s*<td><code>(.*?)</code></td>(.*?)</tr>", section.group(1), re.DOTALL)
    assert [image for image, _ in rows] == ["1.png", "0.png"]  # the flat one counts as 0
    assert "flat (counted as 0)" in rows[1][1] and re.search(r">2</td>\s*$", rows[1][1])
    assert "1 of 2 images flat" in section.group(1)
    assert "1 image with warnings (2 in all" in section.group(1)


# --- the runner, shards and reports ----------------------------------------------------------


def _found(index: int, names: list[str]) -> InteractionsResult:
    share = index / 10
    estimate = Interval(share, share - 0.05, share + 0.05)
    indices = tuple(
        PropertyIndices(name, Interval(0.3, 0.2, 0.4), Interval(0.5, 0.4, 0.6), estimate)
        for name in names
    )
    return InteractionsResult(
        "rid", "new", "1", tuple(names), 16, 1000, 0.95, "probability", 0, "zero", indices, None,
        estimate, share > 0.05, 0.04, 0.5, 64, 100, 64, 10, 54, 100, 64, False, (),
    )  # fmt: skip


class InteractionsClient(FakeClient):
    def __init__(self) -> None:
        super().__init__()
        self.interaction_calls: list[tuple[str, list[str], dict]] = []
        self._interaction_lock = threading.Lock()

    def interactions(self, image: bytes, model: str, properties: list, **options):
        index = Image.open(io.BytesIO(image)).getpixel((0, 0))[0]
        names = [p.name for p in properties]
        with self._interaction_lock:
            self.interaction_calls.append((f"{index}.png", names, {"model": model, **options}))
        return _found(index, names)


def test_the_runner_estimates_once_per_image_and_setting_and_the_reports_show_it(tmp_path):
    client = InteractionsClient()
    rules = (
        share_rule(properties=["blur", "hue"], interactions={"design_size": 16}),
        share_rule(name="strict", over="every_image", properties=["blur", "hue"],
                   interactions={"design_size": 16}),
    )  # fmt: skip
    result = run_review(interactions_spec(*rules), make_images(tmp_path, 3), client)
    # Both rules share properties and settings: one call per image.
    assert sorted(image for image, _, _ in client.interaction_calls) == ["0.png", "1.png", "2.png"]
    assert {tuple(names) for _, names, _ in client.interaction_calls} == {("blur", "hue")}
    assert {options["design_size"] for _, _, options in client.interaction_calls} == {16}
    assert [obs.share for obs in result.interaction_indices("strict")] == [0.0, 0.1, 0.2]
    outcomes = {outcome.property_name: outcome for outcome in result.outcomes}
    assert outcomes["interactions"].verdict == "passed"  # mean bounds 0.05..0.15 <= 0.2
    assert outcomes["strict"].verdict == "inconclusive"  # 2.png: 0.15..0.25 straddles 0.2

    paths = write_reports(result, tmp_path / "out")
    html = paths["html"].read_text()
    section = re.search(r'<section id="interactions-strict">(.*?)</section>', html, re.DOTALL)
    assert section is not None
    assert 'id="interaction-bars-strict" src="data:image/png;base64,' in section.group(1)
    assert section.group(1).count("<code>") == 3
    document = json.loads(paths["json"].read_text())
    strict = [obs for obs in document["interactions"] if obs["rule"] == "strict"]
    assert [obs["share_high"] for obs in strict] == pytest.approx([0.05, 0.15, 0.25])


def test_a_sharded_review_merges_to_the_same_interaction_verdicts(tmp_path):
    images = make_images(tmp_path, 4)
    loaded = interactions_spec(share_rule(over="every_image"))
    whole = run_review(loaded, images, InteractionsClient())
    partials = [
        ReviewPartial.from_dict(
            json.loads(json.dumps(run_shard(loaded, images, InteractionsClient(), shard).to_dict()))
        )
        for shard in (Shard(0, 2), Shard(1, 2))
    ]
    merged = merge_partials(partials)
    assert merged.interactions == whole.interactions
    assert [o.verdict for o in merged.outcomes] == [o.verdict for o in whole.outcomes]
