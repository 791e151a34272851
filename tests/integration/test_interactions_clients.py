"""Interactions through the clients and the real stack: the SDK (editors, the caller's own
edit functions on InteractionDesign's rows, AsyncClient), `propscope interactions`, the Node
client, and the review rule max_interaction_share with its report section. Cheap designs (N 8)
on one image each; the gateway's own tests are tests/integration/test_interactions.py."""

from __future__ import annotations

import asyncio
import json
import subprocess

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from propscope import AsyncClient, Client, InteractionsResult
from propscope.cli import app
from propscope.review import load_spec, run_review, write_reports
from propscope_server.triton_models.editors.procedural import edit_path
from tests.integration.conftest import SAMPLE, scene_png
from tests.integration.test_interactions import HUE_PARAMETERS, PATCH_PARAMETERS
from tests.integration.test_node_client import NODE_CLIENT

HUE = "hue=procedural:operation=hue,region=object"
PATCH = "patch=procedural:operation=blend"
N = 8


def test_sdk_own_edit_functions_give_the_gateways_composed_indices(client: Client) -> None:
    """The same edits, run here on InteractionDesign's rows (the procedural editor's own code)
    or by the gateway's editor: the same images, so the same indices."""
    seed = 21

    def hue(image: np.ndarray, strength: float) -> np.ndarray:
        return edit_path(image, np.array([strength], np.float32), HUE_PARAMETERS, seed)[0]

    def patch(image: np.ndarray, strength: float) -> np.ndarray:
        return edit_path(image, np.array([strength], np.float32), PATCH_PARAMETERS, seed)[0]

    stages = set()
    own = client.interactions(
        SAMPLE,
        "synth_hue",
        {"hue": hue, "patch": patch},
        design_size=N,
        seed=seed,
        on_progress=lambda update: stages.add(update.stage),
    )
    composed = client.interactions(SAMPLE, "synth_hue", [HUE, PATCH], design_size=N, seed=seed)
    assert own.own_edits and not composed.own_edits
    assert (own.edits, own.cache_hits + own.cache_misses) == (0, 0)
    assert own.forward_passes == composed.forward_passes == 4 * N + 1
    assert "render" in stages and "classify" in stages
    assert own.composition_order == composed.composition_order == ("hue", "patch")
    for mine, theirs in zip(own.indices, composed.indices, strict=True):
        assert mine == theirs
    assert own.interaction_share == composed.interaction_share
    for item in composed.indices:
        for interval in (item.first_order, item.total_order, item.interaction):
            assert interval.low <= interval.high


def test_async_client_returns_the_sync_result_from_the_cache(live_stack, client: Client) -> None:
    first = client.interactions(SAMPLE, "synth_hue", [HUE, PATCH], design_size=N, seed=4)

    async def run() -> InteractionsResult:
        async with AsyncClient(live_stack.gateway, timeout=300) as aclient:
            return await aclient.interactions(
                SAMPLE, "synth_hue", [HUE, PATCH], design_size=N, seed=4
            )

    again = asyncio.run(run())
    assert (again.cache_hits, again.cache_misses, again.edits) == (4 * N, 0, 0)
    assert again.indices == first.indices and again.target_class == first.target_class


def test_cli_prints_the_table_plain_lines_and_json(live_stack) -> None:
    arguments = ["interactions", str(SAMPLE), "-m", "synth_hue", "-p", HUE, "-p", PATCH,
                 "--design-size", str(N), "--seed", "4", "--target", live_stack.gateway]  # fmt: skip
    table = CliRunner().invoke(app, [*arguments, "--pair", "hue,patch"], env={"COLUMNS": "80"})
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert [line.split()[0] for line in lines if line.startswith(("hue ", "patch "))] == [
        "hue",
        "patch",
    ]
    assert "second order hue × patch:" in table.stdout
    plain = CliRunner().invoke(app, [*arguments, "--format", "plain"])
    assert plain.exit_code == 0, plain.output
    kinds = [line.split()[0] for line in plain.stdout.splitlines()]
    assert kinds == ["property", "property", "share", "cost"]
    found = CliRunner().invoke(app, [*arguments, "--json"])
    document = json.loads(found.stdout)
    assert [item["name"] for item in document["indices"]] == ["hue", "patch"]
    # The table's run composed every image the plain and JSON runs need (one seed, one N).
    assert document["cache_misses"] == 0 and document["edits"] == 0


def test_cli_runs_a_model_loaded_on_demand(live_stack, tmp_path):
    """synth_conjunction is loaded on its first request (listed unloaded until then, with
    loads_on_demand): the pre-flight leaves it to the call instead of refusing it."""
    image = tmp_path / "cyan.png"
    image.write_bytes(scene_png(hue_deg=200.0))
    found = CliRunner().invoke(
        app,
        ["interactions", str(image), "-m", "synth_conjunction", "-p", HUE, "-p", PATCH,
         "--design-size", str(N), "--seed", "1", "--bootstrap", "200", "--format", "plain",
         "--target", live_stack.gateway],
    )  # fmt: skip
    assert found.exit_code == 0, found.output
    kinds = [line.split()[0] for line in found.stdout.splitlines()]
    assert kinds == ["property", "property", "share", "cost"]


def test_cli_refuses_a_design_size_that_is_no_power_of_two(live_stack) -> None:
    found = CliRunner().invoke(
        app,
        ["interactions", str(SAMPLE), "-m", "synth_hue", "-p", HUE, "-p", PATCH,
         "--design-size", "12", "--target", live_stack.gateway],
    )  # fmt: skip
    assert found.exit_code == 2
    assert "--design-size" in found.stderr and "8 or 16" in found.stderr


NODE_CALL = """
const { createClient } = require(process.argv[1]);
const [target, image, hue, patch] = process.argv.slice(2);
const client = createClient(target);
const call = (model) =>
  client.interactions({ image, model, properties: [hue, patch], designSize: 8, seed: 4 });
call("synth_hue")
  .then(async (found) => {
    const flat = await call("synth_unbiased");
    console.log(
      JSON.stringify({ accepted: found.accepted, result: found.result, flat: flat.result }),
    );
    client.close();
  })
  .catch((error) => {
    console.error(error);
    process.exit(1);
  });
"""


def test_node_client_gets_the_sdks_indices(live_stack, npm, client: Client) -> None:
    expected = client.interactions(SAMPLE, "synth_hue", [HUE, PATCH], design_size=N, seed=4)
    finished = subprocess.run(
        ["node", "-e", NODE_CALL, str(NODE_CLIENT / "dist" / "src"), live_stack.gateway,
         str(SAMPLE), HUE, PATCH],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    found = json.loads(finished.stdout)
    assert found["accepted"]["compositionOrder"] == ["hue", "patch"]
    assert found["accepted"]["plannedImages"] == 4 * N
    for node, sdk in zip(found["result"]["indices"], expected.indices, strict=True):
        assert node["propertyName"] == sdk.name
        assert node["totalOrder"]["value"] == pytest.approx(sdk.total_order.value)
        assert node["firstOrder"]["ciLow"] == pytest.approx(sdk.first_order.low)
    share = found["result"]["interactionShare"]["value"]
    assert share == pytest.approx(expected.interaction_share.value)
    assert found["result"]["negligibleVariance"] is expected.negligible_variance is False
    # synth_unbiased's saturated probability barely moves (the composed images are cached).
    flat = client.interactions(SAMPLE, "synth_unbiased", [HUE, PATCH], design_size=N, seed=4)
    assert flat.negligible_variance and not flat.interaction_significant
    assert found["flat"]["negligibleVariance"] is True
    assert found["flat"]["interactionSignificant"] is False
    assert found["flat"]["variance"] == pytest.approx(flat.variance)


def _review(live_stack, folder, model: str, maximum: float):
    """A review of ``model`` on two cyan scenes by two max_interaction_share rules (over the
    mean, over every image) of one setting: one estimate per image."""
    images = folder / "images"
    images.mkdir(parents=True)
    (images / "0.png").write_bytes(scene_png(hue_deg=200.0))
    (images / "1.png").write_bytes(scene_png(hue_deg=180.0, shape=1))
    spec_file = folder / "review.yaml"
    settings = {"design_size": N, "bootstrap": 200, "seed": 1}
    spec_file.write_text(
        yaml.safe_dump(
            {
                "service": {"target": live_stack.gateway},
                "candidate": {"name": model},
                "images": {"folder": "images"},
                "properties": {"hue": HUE.partition("=")[2], "patch": PATCH.partition("=")[2]},
                "explain": {"steps": 6, "alpha": 0.05, "permutations": 200},
                "rules": [
                    {"rule": "max_interaction_share", "max": maximum, "interactions": settings},
                    {
                        "rule": "max_interaction_share",
                        "name": "each",
                        "max": maximum,
                        "over": "every_image",
                        "interactions": settings,
                    },
                ],  # fmt: skip
            }
        )
    )
    spec, entries = load_spec(spec_file)
    # synth_conjunction is loaded on demand: the listing says so and the pre-flight lets the
    # review's first call load it.
    with Client(live_stack.gateway, timeout=300) as sdk:
        return run_review(spec, entries, sdk)


def test_review_rule_passes_the_hue_model_and_not_the_conjunction(live_stack, tmp_path) -> None:
    """On cyan objects synth_hue follows the hue alone (shares about 0, bounds within
    [-0.51, 0.36] at N 8), while synth_conjunction needs a red object AND the patch: its
    shares are large and their intervals reach far above max (at N 8 they are wide, so its
    verdict is failed or inconclusive, never passed)."""
    hue = _review(live_stack, tmp_path / "hue", "synth_hue", 0.5)
    conjunction = _review(live_stack, tmp_path / "conjunction", "synth_conjunction", 0.5)
    assert [outcome.verdict for outcome in hue.outcomes] == ["passed", "passed"]
    assert "passed" not in [outcome.verdict for outcome in conjunction.outcomes]
    shares = {
        result.models[0].name: np.mean([obs.share for obs in result.interaction_indices("each")])
        for result in (hue, conjunction)
    }
    assert shares["synth_conjunction"] > shares["synth_hue"] + 0.3, shares
    for result in (hue, conjunction):
        observations = result.interaction_indices("each")
        assert [obs.image for obs in observations] == ["0.png", "1.png"]
        for obs in observations:
            assert obs.properties == ("hue", "patch") and obs.design_size == N
            assert obs.share_low <= obs.share <= obs.share_high
        # Both rules share their properties and settings: one estimate per image.
        assert len(result.interactions) == 4
    paths = write_reports(conjunction, tmp_path / "out")
    html = paths["html"].read_text()
    for name in ("interactions", "each"):
        assert f'id="interaction-bars-{name}" src="data:image/png;base64,' in html
    document = json.loads(paths["json"].read_text())
    assert [rule["name"] for rule in document["rules"]] == [
        "max_interaction_share[interactions]",
        "max_interaction_share[each]",
    ]
    assert len(document["interactions"]) == 4
