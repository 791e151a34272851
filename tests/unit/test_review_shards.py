"""Sharded reviews against the fake client: which images a shard takes, the partial's JSON, a
merge equal to the unsharded run, and every refusal of the merge. The real service is
exercised by tests/integration/test_review_shards.py."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from propscope.cli import app
from propscope.review import (
    PARTIAL_FILE,
    MergeError,
    ReviewPartial,
    Shard,
    merge_partials,
    read_partial,
    run_review,
    run_shard,
    spec_digest,
)
from propscope.review.report.html import ATTRIBUTION_OVERLAYS
from propscope.review.spec import ImageEntry
from tests.unit.test_review_attribution import AttributingClient, share_rule
from tests.unit.test_review_runner import make_images, spec

IMAGES = 30


def review_spec():
    """Two attribution settings (so that the order of shares matters), strips and rules."""
    other = {**share_rule(), "name": "centre", "region": {"box": [0.25, 0.25, 0.75, 0.75]}}
    other["attribution"] = {"grid_size": 4}
    return spec(
        rules=[
            {"rule": "max_score", "max": 0.05},
            {"rule": "no_regression", "metric": "score", "alpha": 0.05},
            share_rule(),
            other,
        ]
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[ImageEntry]:
    return make_images(tmp_path_factory.mktemp("images"), IMAGES)


@pytest.fixture(scope="module")
def partials(images) -> list[ReviewPartial]:
    return [run_shard(review_spec(), images, AttributingClient(), Shard(i, 3)) for i in range(3)]


def without_seconds(data: dict) -> dict:
    return {key: value for key, value in data.items() if key != "seconds"}


# --- shards ---------------------------------------------------------------------------------


def test_a_shard_takes_the_images_at_its_index_modulo_n():
    entries = [ImageEntry(f"{i}.png", Path(f"{i}.png"), None) for i in range(7)]
    assert [e.id for e in Shard(1, 3).select(entries)] == ["1.png", "4.png"]
    assert [e.id for e in Shard(0, 1).select(entries)] == [e.id for e in entries]
    chosen = [e.id for i in range(3) for e in Shard(i, 3).select(entries)]
    assert sorted(chosen) == sorted(e.id for e in entries) and len(set(chosen)) == 7
    assert Shard.parse(" 2/5 ") == Shard(2, 5) and str(Shard(2, 5)) == "2/5"


@pytest.mark.parametrize("text", ["3/3", "1", "a/3", "-1/3", "0/0", "1/2/3"])
def test_a_shard_outside_0_to_n_or_not_i_slash_n_is_refused_naming_the_form(text):
    with pytest.raises(ValueError, match=r"expected I/N with 0 <= I < N"):
        Shard.parse(text)


def test_a_shard_with_no_image_is_refused(images):
    with pytest.raises(Exception, match=r"shard 30/31 has no image: the set has 30"):
        run_shard(review_spec(), images, AttributingClient(), Shard(30, 31))


def test_a_shard_explains_only_its_images_and_follows_the_whole_sets_class(tmp_path):
    # Image 1 of 3 is unlabelled: the whole set follows predictions, so shard 0 (images 0
    # and 2, both labelled) must too.
    found = make_images(tmp_path, 3)
    labelled = [replace(found[0], label=0), found[1], replace(found[2], label=1)]
    client = AttributingClient()
    partial = run_shard(review_spec(), labelled, client, Shard(0, 2))
    assert partial.covered == ("0.png", "2.png")
    assert {image for image, _, paths in client.calls if not paths} == {"0.png", "2.png"}
    assert partial.settings.target_class == "predicted"
    assert {call["target_class"] for call in client.attribute_calls} == {None}


# --- the partial's JSON ---------------------------------------------------------------------


def test_a_partial_survives_its_json_and_keeps_the_overlays_its_shard_could_show(
    partials, tmp_path
):
    partial = partials[0]
    path = partial.write(tmp_path / "shard-0")
    assert path == tmp_path / "shard-0" / PARTIAL_FILE
    assert read_partial(path) == partial
    data = json.loads(path.read_text())
    assert data["format"] == "propscope-review-partial" and data["shard"] == {
        "index": 0,
        "count": 3,
    }
    assert data["covered"] == [f"{i}.png" for i in range(0, IMAGES, 3)]
    assert len(data["image_set"]) == data["images"] == IMAGES
    assert {model["served_version"] for model in data["models"]} == {"7"}
    assert data["cache"]["misses"] == len(partial.observations)
    assert len(data["observations"]) == 10 * 2 and len(data["attributions"]) == 10 * 2
    # 10 images per rule, of which the 8 highest shares keep their overlay.
    for rule in ("watermark", "centre"):
        shown = [obs for obs in partial.attributions if obs.rule == rule and obs.overlay]
        assert len(shown) == ATTRIBUTION_OVERLAYS
    assert len(partial.strips) == 2 and all(strip.images for strip in partial.strips)


def test_the_digest_covers_the_spec_and_the_image_set_but_not_how_it_runs(images):
    digest = spec_digest(review_spec(), images)
    assert spec_digest(review_spec().model_copy(update={"concurrency": 9}), images) == digest
    assert spec_digest(review_spec().model_copy(update={"strips": 1}), images) != digest
    assert spec_digest(review_spec(), images[:-1]) != digest
    relabelled = [replace(images[0], label=1), *images[1:]]
    assert spec_digest(review_spec(), relabelled) != digest


# --- the merge ------------------------------------------------------------------------------


def test_three_shards_merged_give_exactly_the_unsharded_review(images, partials):
    whole = run_review(review_spec(), images, AttributingClient())
    merged = merge_partials(list(reversed(partials)))
    assert without_seconds(merged.to_dict()) == without_seconds(whole.to_dict())
    assert merged.verdict == whole.verdict == "failed"
    assert [outcome.verdict for outcome in merged.outcomes] == [
        outcome.verdict for outcome in whole.outcomes
    ]
    assert [(s.image, s.property_name, s.images) for s in merged.strips] == [
        (s.image, s.property_name, s.images) for s in whole.strips
    ]
    for rule in ("watermark", "centre"):
        top = sorted(whole.shares(rule), key=lambda obs: -obs.share)[:ATTRIBUTION_OVERLAYS]
        merged_overlays = {obs.image: obs.overlay for obs in merged.shares(rule)}
        assert all(merged_overlays[obs.image] == obs.overlay for obs in top)
    assert merged.seconds == max(partial.seconds for partial in partials)


def _refusal(partials, names=None) -> str:
    with pytest.raises(MergeError) as refused:
        merge_partials(partials, names)
    return str(refused.value)


def test_a_missing_shard_is_named(partials):
    assert _refusal(partials[:2]) == (
        "missing shard 2/3 of 3 (given: 0/3, 1/3); run "
        "`propscope review SPEC --shard 2/3 --out DIR` and merge its partial too"
    )
    assert _refusal(partials[1:2]) == (
        "missing shards 0/3, 2/3 of 3 (given: 1/3); run "
        "`propscope review SPEC --shard 0/3 --out DIR` (each missing one) and merge its "
        "partial too"
    )


def test_a_shard_given_twice_is_named_with_both_files(partials):
    message = _refusal([*partials, partials[1]], ["a.json", "b.json", "c.json", "d.json"])
    assert message == "shard 1/3 given twice: b.json and d.json"


def test_partials_of_different_shard_counts_are_refused(partials, images):
    other = run_shard(review_spec(), images, AttributingClient(), Shard(1, 2))
    assert _refusal([partials[0], other]) == (
        "different shard counts: shard 0/3 is shard 0/3, shard 1/2 is shard 1/2; give every "
        "shard of one review the same N (a partial of an earlier run? delete it)"
    )


def test_partials_of_different_specs_are_refused(partials):
    other = replace(partials[2], spec_digest="0" * 64)
    assert _refusal([*partials[:2], other]).startswith(
        f"different specs or image sets: shard 0/3 (spec digest {partials[0].spec_digest[:12]}) "
        "and shard 2/3 (000000000000); run every shard from one spec and image set"
    )


def test_overlapping_images_are_named(partials):
    overlapping = replace(partials[1], covered=(*partials[1].covered, "0.png"))
    assert _refusal([partials[0], overlapping, partials[2]]) == (
        "overlapping shards: image '0.png' is in shard 0/3 and shard 1/3"
    )


def test_missing_images_are_named(partials):
    short = replace(partials[2], covered=partials[2].covered[:-1])
    assert _refusal([*partials[:2], short]) == (
        "missing images: 1 of 30 in no partial (first: '29.png')"
    )


def test_images_of_another_shard_are_refused(partials):
    swapped = [
        replace(partials[0], covered=("1.png", *partials[0].covered[1:])),
        replace(partials[1], covered=("0.png", *partials[1].covered[1:])),
        partials[2],
    ]
    assert _refusal(swapped) == "shard 0/3: its images are not those of shard 0/3 (e.g. '1.png')"


def test_different_model_versions_are_refused(partials):
    candidate, baseline = partials[1].models
    other = replace(partials[1], models=(replace(candidate, served_version="8"), baseline))
    assert _refusal([partials[0], other, partials[2]]) == (
        "different model versions of candidate 'new': '7' in shard 0/3, '8' in shard 1/3"
    )


def test_different_service_settings_are_refused(partials):
    other = replace(partials[2], settings=replace(partials[2].settings, permutations=999))
    assert _refusal([*partials[:2], other]) == (
        "different service settings: permutations 100 in shard 0/3, 999 in shard 2/3; run "
        "every shard through one --target whose gateways share their settings"
    )
    other = replace(partials[2], settings=replace(partials[2].settings, target="other:1"))
    assert "target 'fake:1' in shard 0/3, 'other:1' in shard 2/3" in _refusal(
        [*partials[:2], other]
    )


def test_a_partial_missing_an_observation_is_refused(partials):
    short = replace(partials[0], observations=partials[0].observations[1:])
    assert _refusal([short, *partials[1:]]) == (
        "shard 0/3: no observation of (image, model, property) ('0.png', 'new', 'hue')"
    )
    doubled = replace(partials[0], attributions=partials[0].attributions * 2)
    assert _refusal([doubled, *partials[1:]]) == (
        "shard 0/3: a duplicate attribution share of (rule, image)"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", r"not a review partial \(not JSON"),
        ('{"title": "a review.json"}', r'not a review partial \(no "format"'),
        ('{"format": "propscope-review-partial", "version": 99}', r"format version 99"),
        ('{"format": "propscope-review-partial", "version": 1}', r"not a complete review partial"),
    ],
)
def test_a_file_that_is_not_a_partial_is_refused(tmp_path, content, message):
    path = tmp_path / "review.json"
    path.write_text(content)
    with pytest.raises(MergeError, match=message):
        read_partial(path)


# --- the command line -----------------------------------------------------------------------


def test_merge_on_the_command_line_writes_the_reports_and_exits_with_the_verdict(
    partials, tmp_path
):
    folders = [
        partial.write(tmp_path / f"shard-{partial.shard.index}").parent for partial in partials
    ]
    out = tmp_path / "merged"
    finished = CliRunner().invoke(app, ["review", "merge", *map(str, folders), "--out", str(out)])
    assert finished.exit_code == 1, finished.output
    assert "propscope review: merged 3 shards, 30 images" in finished.output
    assert "propscope review: FAILED in" in finished.output
    assert sorted(path.name for path in out.iterdir()) == [
        "junit.xml", "review.html", "review.json", "review.md"
    ]  # fmt: skip
    assert json.loads((out / "review.json").read_text())["verdict"] == "failed"


def test_merge_on_the_command_line_refuses_with_exit_2_naming_the_file(partials, tmp_path):
    paths = [partial.write(tmp_path / f"s{partial.shard.index}") for partial in partials[:2]]
    out = tmp_path / "merged"
    finished = CliRunner().invoke(app, ["review", "merge", *map(str, paths), "--out", str(out)])
    assert finished.exit_code == 2
    assert "cannot merge the partial results: missing shard 2/3 of 3" in finished.output
    assert not out.exists()
    bad = tmp_path / "nothing.json"
    finished = CliRunner().invoke(app, ["review", "merge", str(bad)])
    assert finished.exit_code == 2
    assert re.search(r"cannot read '.*nothing\.json': No such file", finished.output)


def test_a_bad_shard_option_exits_2_before_any_work(tmp_path):
    finished = CliRunner().invoke(
        app, ["review", str(tmp_path / "spec.yaml"), "--shard", "3/3", "--out", str(tmp_path)]
    )
    assert finished.exit_code == 2
    assert "expected I/N with 0 <= I < N" in finished.output
    assert "Invalid value for '--shard': shard 3/3" in finished.output  # names the option


@pytest.mark.parametrize("arguments", [["review", "--help"], ["review", "run", "--help"],
                                       ["review", "merge", "--help"]])  # fmt: skip
def test_the_review_help_fits_80_columns(arguments):
    finished = CliRunner().invoke(app, arguments, env={"COLUMNS": "80"})
    assert finished.exit_code == 0
    assert max(len(line) for line in finished.output.splitlines()) <= 80
    assert "--shard" in finished.output or "PARTIAL" in finished.output
