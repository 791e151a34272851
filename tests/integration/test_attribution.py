"""Attribute and EvaluateAttribution through the real stack (gateway, Triton, Redis):
forward passes counted by Triton, exact ground truth on the corner probe,
determinism cold and warm, fidelity metrics' sanity, cancellation, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import redis
from PIL import Image

from propscope.v1 import attribution_pb2 as apb
from propscope.v1 import attribution_pb2_grpc, explain_pb2_grpc
from propscope.v1 import explain_pb2 as pb
from tests.integration.conftest import inference_count, png

PROBE = "calibration_probe"  # reads only the bottom-right 8 x 8 pixels of its 64 x 64 input


def settled_count(triton, model: str = PROBE) -> int:
    """Triton's inference_count once it stops moving: its statistics may trail the
    last response by a moment."""
    count = inference_count(triton, model)
    for _ in range(20):
        time.sleep(0.1)
        again = inference_count(triton, model)
        if again == count:
            return count
        count = again
    return count


def noise_image(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def attribution(channel) -> attribution_pb2_grpc.AttributionServiceStub:
    return attribution_pb2_grpc.AttributionServiceStub(channel)


def attribute(stub, image: np.ndarray, model: str = PROBE, **fields) -> list:
    """The probe's class 1 (its logit, 10 x the corner's mean, is what moves; class 0's is
    constant by construction)."""
    reference = (
        pb.ModelRef(name=model, target_class=1) if model == PROBE else pb.ModelRef(name=model)
    )
    request = apb.AttributeRequest(image=png(image), model=reference, **fields)
    return list(stub.Attribute(request, timeout=300))


def result_of(events: list) -> apb.AttributionResult:
    assert events[0].WhichOneof("event") == "accepted"
    assert events[-1].WhichOneof("event") == "result"
    return events[-1].result


def as_array(values: apb.AttributionMap) -> np.ndarray:
    return np.asarray(values.values, dtype=np.float32).reshape(values.height, values.width)


def test_sobol_counts_its_passes_and_gives_unseen_cells_exactly_zero(attribution, triton):
    before = settled_count(triton)
    events = attribute(attribution, noise_image(1), sobol=apb.SobolOptions())
    after = settled_count(triton)
    accepted, result = events[0].accepted, result_of(events)
    assert accepted.method == "sobol"
    assert (accepted.sobol.grid_size, accepted.sobol.nb_design) == (8, 32)
    assert accepted.planned_forward_passes == 32 * (8 * 8 + 2) == result.forward_passes
    # The design's passes plus the one pass on the original, as Accepted announced.
    assert after - before == accepted.planned_forward_passes_total == 2112 + 1
    progress = [e.progress for e in events if e.WhichOneof("event") == "progress"]
    assert progress[-1].forward_passes_done == progress[-1].forward_passes_total == 2112
    grid = as_array(result.grid)
    assert grid[7, 7] > 0.5
    unseen = np.ones((8, 8), bool)
    unseen[7, 7] = False
    assert np.all(grid[unseen] == 0.0), grid
    assert (result.map.height, result.map.width) == (64, 64)
    assert "black" in accepted.perturbation_description  # a UINT8 model: input zero is black
    assert accepted.target_score == apb.TARGET_SCORE_LOGIT  # the probe returns logits
    # The default (Xplique's unscrambled) design at N 32 < 64 factors: said, naming cells.
    assert any("9 (row 1, column 1) x0.20" in w for w in accepted.warnings), accepted.warnings


def test_maps_are_bit_identical_cold_and_warm(attribution, live_stack):
    request = {"rise": apb.RiseOptions(nb_samples=256, grid_size=4), "seed": 7}
    redis.Redis.from_url(live_stack.redis_url).flushall()
    cold = result_of(attribute(attribution, noise_image(2), **request))
    warm = result_of(attribute(attribution, noise_image(2), **request))
    redis.Redis.from_url(live_stack.redis_url).flushall()
    cold_again = result_of(attribute(attribution, noise_image(2), **request))
    assert (cold.cache_hit, warm.cache_hit, cold_again.cache_hit) == (False, True, False)
    assert warm.forward_passes == 0 and cold.forward_passes == 256
    assert as_array(cold.map).tobytes() == as_array(warm.map).tobytes()
    assert as_array(cold.map).tobytes() == as_array(cold_again.map).tobytes()


def test_a_non_square_photo_like_image_gets_a_map_of_its_own_size(attribution):
    image = noise_image(3, height=120, width=200)
    events = attribute(
        attribution,
        image,
        model="synth_patch",
        sobol=apb.SobolOptions(grid_size=4, nb_design=8),
        perturbation=apb.Perturbation(baseline=apb.Perturbation.BASELINE_MEAN_COLOUR),
    )
    result = result_of(events)
    assert (result.map.height, result.map.width) == (120, 200)
    assert (result.grid.height, result.grid.width) == (4, 4)
    assert np.isfinite(as_array(result.map)).all()
    assert "mean colour" in events[0].accepted.perturbation_description


def evaluate(stub, image: np.ndarray, explanation: np.ndarray, **fields) -> dict:
    request = apb.EvaluateAttributionRequest(
        image=png(image),
        model=pb.ModelRef(name=PROBE, target_class=1),
        explanation=apb.AttributionMap(
            height=explanation.shape[0], width=explanation.shape[1], values=explanation.ravel()
        ),
        **fields,
    )
    events = list(stub.EvaluateAttribution(request, timeout=300))
    assert events[0].WhichOneof("event") == "accepted"
    return {e.metric.metric: e.metric for e in events if e.WhichOneof("event") == "metric"}


def oracle_map() -> np.ndarray:
    explanation = np.zeros((64, 64), np.float32)
    explanation[-8:, -8:] = 1.0
    return explanation


def test_the_oracle_map_of_the_probe_beats_random_maps(attribution):
    image = np.full((64, 64, 3), 200, np.uint8)  # a bright corner: class 1 is confident
    oracle = evaluate(attribution, image, oracle_map())
    assert set(oracle) == {"deletion", "insertion", "mu_fidelity"}
    assert oracle["mu_fidelity"].value >= 0.9
    assert len(oracle["deletion"].scores) == len(oracle["deletion"].fractions) == 11
    rng = np.random.default_rng(0)
    random_deletions = [
        evaluate(attribution, image, rng.random((64, 64), dtype=np.float32))["deletion"].value
        for _ in range(3)
    ]
    assert oracle["deletion"].value < min(random_deletions)
    constant = evaluate(
        attribution, image, np.ones((64, 64), np.float32), mu_fidelity=apb.MuFidelityOptions()
    )
    # Xplique's subsets draw each cell independently, so a constant map's sum still
    # grows with the subset's size (and so does the chance of hiding the corner): far
    # below the oracle, but not 0 (docs/results/attribution.md records the figure).
    assert constant["mu_fidelity"].value < oracle["mu_fidelity"].value - 0.5
    assert any("map is constant" in w for w in constant["mu_fidelity"].warnings)
    assert not oracle["mu_fidelity"].warnings


def test_stability_recomputes_the_method_on_noisy_images(attribution, triton):
    before = settled_count(triton)
    metrics = evaluate(
        attribution,
        noise_image(4),
        oracle_map(),
        stability=apb.StabilityOptions(
            nb_samples=2, sobol=apb.SobolOptions(grid_size=4, nb_design=4)
        ),
    )
    stability = metrics["stability"]
    assert len(stability.distances) == 2 and stability.value >= 0
    assert stability.forward_passes == 3 * 4 * (16 + 2)
    assert settled_count(triton) - before == stability.forward_passes + 1


def test_a_map_of_a_score_that_never_moves_says_so_and_is_not_cached(attribution):
    """Class 0's logit of the probe is 0 whatever the image: the map is meaningless."""
    request = apb.AttributeRequest(
        image=png(noise_image(10)),
        model=pb.ModelRef(name=PROBE, target_class=0),
        rise=apb.RiseOptions(nb_samples=64, grid_size=4),
    )
    first = result_of(list(attribution.Attribute(request, timeout=300)))
    again = result_of(list(attribution.Attribute(request, timeout=300)))
    assert any("carries no information" in w for w in first.warnings), first.warnings
    assert (first.cache_hit, again.cache_hit) == (False, False)


def test_cancelling_stops_triton_work_within_a_second(attribution, triton):
    request = apb.AttributeRequest(
        image=png(noise_image(5)),
        model=pb.ModelRef(name=PROBE),
        rise=apb.RiseOptions(nb_samples=60_000),
    )
    call = attribution.Attribute(request, timeout=300)
    for event in call:
        if event.WhichOneof("event") == "progress":
            break
    call.cancel()
    time.sleep(1.0)
    settled = inference_count(triton, PROBE)
    time.sleep(1.5)
    assert inference_count(triton, PROBE) == settled
    assert settled < 60_000


@pytest.mark.parametrize(
    ("fields", "code", "field", "words"),
    [
        (
            {"sobol": apb.SobolOptions(nb_design=30)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "sobol.nb_design",
            "power of two",
        ),
        (
            {"sobol": apb.SobolOptions(grid_size=32)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "sobol.grid_size",
            "larger than the image",
        ),
        (
            {"sobol": apb.SobolOptions(grid_size=32, nb_design=1024)},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "sobol.nb_design",
            "max_forward_passes",
        ),
    ],
)
def test_bad_attribute_requests_are_refused_before_any_work(
    attribution, triton, fields, code, field, words
):
    image = noise_image(6, 16, 16)
    before = settled_count(triton)
    with pytest.raises(grpc.RpcError) as caught:
        attribute(attribution, image, **fields)
    assert caught.value.code() == code
    assert field in caught.value.details() or field in str(caught.value.trailing_metadata())
    assert words in caught.value.details()
    assert inference_count(triton, PROBE) == before


def test_a_map_of_the_wrong_shape_is_refused(attribution):
    with pytest.raises(grpc.RpcError) as caught:
        evaluate(attribution, noise_image(7), np.zeros((32, 64), np.float32))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "64 x 64" in caught.value.details()


def test_list_models_says_which_methods_each_model_supports(channel):
    models = explain_pb2_grpc.ExplainServiceStub(channel).ListModels(pb.ListModelsRequest())
    by_name = {m.name: m for m in models.models}
    assert {"propgrad", "sobol", "rise", "deletion", "mu_fidelity"} <= set(by_name[PROBE].methods)
    assert list(by_name["procedural"].methods) == []


def test_the_cli_writes_an_overlay_and_a_map_then_scores_it_in_80_columns(live_stack, tmp_path):
    """What a user runs: `propscope attribute` then `propscope evaluate` on its JSON, as
    a CI log would show it (no terminal, 80 columns)."""
    image = tmp_path / "probe.png"
    image.write_bytes(png(noise_image(9, 96, 128)))
    environment = {**os.environ, "COLUMNS": "80", "CI": "true"}
    common = ["--target", live_stack.gateway, "--model", PROBE]
    attributed = subprocess.run(
        [sys.executable, "-m", "propscope", "attribute", str(image), *common,
         "--grid-size", "4", "--nb-design", "16", "--out", str(tmp_path)],  # fmt: skip
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert attributed.returncode == 0, attributed.stderr
    overlay = Image.open(tmp_path / "probe.sobol.png")
    assert overlay.size == (128, 96)
    written = json.loads((tmp_path / "probe.sobol.json").read_text())
    assert (written["map"]["height"], written["map"]["width"]) == (96, 128)
    assert written["forward_passes"] == 16 * (16 + 2)
    assert "passes" in attributed.stderr  # progress lines in a CI log
    evaluated = subprocess.run(
        [sys.executable, "-m", "propscope", "evaluate", str(image), *common,
         "--map", str(tmp_path / "probe.sobol.json"), "--metrics", "deletion,insertion"],
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    lines = evaluated.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in evaluated.stdout
    assert any(line.lstrip().startswith("deletion") for line in lines)


def test_the_cli_says_whether_an_eva_map_is_guaranteed_in_80_columns(live_stack, tmp_path):
    """`propscope attribute --method eva` on an open model: the guarantee in words, the overlap
    bound and the sampled overlap whole, as a CI log shows them."""
    image = tmp_path / "patch.png"
    image.write_bytes(png(noise_image(11, 64, 64)))
    environment = {**os.environ, "COLUMNS": "80", "CI": "true"}
    common = ["--target", live_stack.gateway, "--model", "synth_patch", "--out", str(tmp_path)]
    eva = ["--method", "eva", "--grid-size", "4", "--samples", "8", "--epsilon", "0.01"]
    attributed = subprocess.run(
        [sys.executable, "-m", "propscope", "attribute", str(image), *common, *eva],
        capture_output=True, text=True, timeout=300, env=environment,
    )  # fmt: skip
    assert attributed.returncode == 0, attributed.stderr
    # The written paths stay whole on a line of their own, however long tmp_path is.
    lines = [line for line in attributed.stdout.splitlines() if not line.startswith("wrote ")]
    assert max(len(line) for line in lines) <= 80, attributed.stdout
    assert "…" not in attributed.stdout
    written = json.loads((tmp_path / "patch.eva.json").read_text())
    assert written["eva"]["guaranteed"] is True and len(written["eva"]["region_bounds"]) == 4
    flat = " ".join(attributed.stdout.split())
    assert "bounds: verified (guaranteed), crown" in flat
    assert f"overlap bound {written['eva']['overlap_bound']:.4g} " in flat
    assert f"sampled overlap {written['eva']['sampled_overlap']:.4g} " in flat
