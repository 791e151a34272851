"""A review sharded 3 ways (`propscope review SPEC --shard I/3`, the three shards at once, or
the Python API's run_shard) and merged (`propscope review merge`) gives exactly the reports,
verdict and exit code of the unsharded run, through the running service; the merge's refusals
are in tests/unit/test_review_shards.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

import propscope
from propscope.cli import app
from propscope.review import Shard, load_spec, run_shard
from tests.integration.test_review import EXAMPLES, review

SHARDS = 3
# 7 images: 4 circles and 3 squares; no_regression at alpha 0.05 needs at least 5.
IMAGES = 7
RULES = {
    # The hue-biased candidate flips along every hue path and regresses against the unbiased
    # model: exit code 1.
    "failing": (
        "synth_hue",
        "synth_unbiased",
        "  - {rule: no_regression, properties: [object_hue], tolerance: 0.1, margin: 0.002,"
        " alpha: 0.05}\n"
        "  - {rule: max_flip_rate, properties: [object_hue], max: 0.25}\n"
        "  - {rule: min_accuracy, min: 0.8}\n"
        "  - {rule: max_score, properties: [patch], max: 0.01}\n"
        # RISE maps of few masks: the shares and overlays go through the partials too.
        "  - {rule: max_attribution_share, name: corner, region: {box: [0.75, 0.75, 1, 1]},"
        " max: 0.5, attribution: {method: rise, nb_samples: 64, grid_size: 4, seed: 0}}\n",
    ),
    # The reverse: the unbiased candidate stays within the hue-biased baseline's allowance.
    "passing": (
        "synth_unbiased",
        "synth_hue",
        "  - {rule: no_regression, properties: [object_hue], tolerance: 0.1, margin: 0.002,"
        " alpha: 0.05}\n"
        "  - {rule: max_score, properties: [patch], max: 0.01}\n",
    ),
}


def write_spec(folder: Path, kind: str) -> Path:
    candidate, baseline, rules = RULES[kind]
    rows = (EXAMPLES / "manifest.csv").read_text().splitlines()[: IMAGES + 1]
    (folder / "manifest.csv").write_text(
        "\n".join(rows).replace("images/", f"{EXAMPLES}/images/") + "\n"
    )
    spec = folder / "spec.yaml"
    spec.write_text(
        f"candidate: {{name: {candidate}}}\n"
        f"baseline: {{name: {baseline}}}\n"
        "images: {manifest: manifest.csv}\n"
        "properties:\n"
        "  object_hue: 'procedural:operation=hue,region=object'\n"
        "  patch: 'procedural:operation=blend'\n"
        "explain: {steps: 20, seed: 0, permutations: 10000, alpha: 0.01}\n"
        "strips: 2\n"
        f"rules:\n{rules}"
    )
    return spec


def shard_commands(spec: Path, target: str, out: Path) -> list[list[str]]:
    return [
        [
            sys.executable, "-m", "propscope", "review", str(spec), "--target", target,
            "--shard", f"{index}/{SHARDS}", "--out", str(out / f"shard-{index}"),
        ]
        for index in range(SHARDS)
    ]  # fmt: skip


def without_timings(out: Path) -> dict[str, object]:
    """The reports with the seconds they state taken out."""
    data = json.loads((out / "review.json").read_text())
    del data["seconds"]
    junit = re.sub(r' time="[^"]*"', "", (out / "junit.xml").read_text())
    markdown = re.sub(r", [\d.]+ s\.", ", s.", (out / "review.md").read_text())
    return {"json": data, "junit": junit, "markdown": markdown}


def run_shards_by_cli(spec: Path, target: str, out: Path) -> None:
    """The three shards at once, as an Indexed Job runs them."""
    running = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in shard_commands(spec, target, out)
    ]
    for process in running:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stdout + stderr
        assert "partial result in" in stderr and stdout == ""


def run_shards_in_process(spec: Path, target: str, out: Path) -> None:
    """The three shards one after the other through the Python API (no interpreter to start)."""
    loaded, images = load_spec(spec)
    with propscope.Client(target, timeout=300) as client:
        for index in range(SHARDS):
            run_shard(loaded, images, client, Shard(index, SHARDS)).write(out / f"shard-{index}")


@pytest.mark.parametrize(
    ("kind", "exit_code", "run_shards"),
    [("failing", 1, run_shards_by_cli), ("passing", 0, run_shards_in_process)],
)
def test_a_review_sharded_3_ways_and_merged_is_the_unsharded_review(
    live_stack, tmp_path, kind, exit_code, run_shards
):
    spec = write_spec(tmp_path, kind)
    cache = redis.Redis.from_url(live_stack.redis_url)
    # Each run starts from an empty cache, so that their cache hits compare too.
    cache.flushall()
    whole = review(spec, live_stack.gateway, tmp_path / "whole")
    assert whole.returncode == exit_code, whole.stdout + whole.stderr

    cache.flushall()
    run_shards(spec, live_stack.gateway, tmp_path)
    partials = [tmp_path / f"shard-{index}" / "review-partial.json" for index in range(SHARDS)]
    covered = [json.loads(path.read_text())["covered"] for path in partials]
    assert [len(images) for images in covered] == [3, 2, 2]

    merge = [sys.executable, "-m", "propscope", "review", "merge", *map(str, partials)]
    merged = subprocess.run(
        [*merge, "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=120
    )
    assert merged.returncode == exit_code, merged.stdout + merged.stderr
    assert merged.stdout == (tmp_path / "merged" / "review.md").read_text()

    expected, found = without_timings(tmp_path / "whole"), without_timings(tmp_path / "merged")
    assert found["json"] == expected["json"]
    assert found["junit"] == expected["junit"]
    assert found["markdown"] == expected["markdown"]
    assert found["json"]["verdict"] == ("failed" if exit_code else "passed")
    assert len(found["json"]["observations"]) == IMAGES * 2 * 2
    assert len(found["json"]["attributions"]) == (IMAGES if kind == "failing" else 0)
    # The strips of the merged set's highest scores, with their path images.
    html = (tmp_path / "merged" / "review.html").read_text()
    assert html.count("data:image/png;base64,") == (
        (tmp_path / "whole" / "review.html").read_text().count("data:image/png;base64,")
    )

    # Parts that do not fit are refused, naming the problem, and nothing is written.
    refused = refusals(partials, tmp_path)
    for (name, message), finished in refused.items():
        assert finished.exit_code == 2, (name, finished.output)
        assert f"cannot merge the partial results: {message}" in finished.output, name
        assert not (tmp_path / name).exists()


def refusals(partials: list[Path], folder: Path) -> dict[tuple[str, str], Result]:
    """`propscope review merge` of the real partials with one altered as a shard of another
    model version or spec, or overlapping another, would give: keyed by (out folder, message)."""
    data = json.loads(partials[1].read_text())
    (candidate, *_) = data["models"]
    assert candidate["served_version"], "the service states the version it served"
    changed = {
        ("other-version", "different model versions of candidate"): {
            "models": [{**candidate, "served_version": candidate["served_version"] + "0"},
                       *data["models"][1:]],
        },
        ("other-spec", "different specs or image sets"): {"spec_digest": "0" * 64},
        ("overlapping", "overlapping shards: image"): {
            "covered": [*data["covered"], json.loads(partials[0].read_text())["covered"][0]],
        },
    }  # fmt: skip
    finished = {}
    for (name, message), fields in changed.items():
        altered = folder / f"{name}.json"
        altered.write_text(json.dumps({**data, **fields}))
        merge = ["review", "merge", str(partials[0]), str(altered), str(partials[2]),
                 "--out", str(folder / name)]  # fmt: skip
        finished[(name, message)] = CliRunner().invoke(app, merge)  # in-process: no interpreter
    return finished
