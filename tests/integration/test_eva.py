"""EVA through the real stack (gateway, Triton's bound propagation in the open model,
Redis): a map on synth_patch whose largest cell is the patch's, the result's bounds
coherent with each other and with Triton's pass count, the hybrid marked as not
guaranteed, the cache, stability of EVA maps, and every refusal before any bound row.
Small grids and few samples: the soundness of the bounds themselves is
tests/integration/test_eva_soundness.py."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from propscope.v1 import attribution_pb2 as apb
from propscope.v1 import attribution_pb2_grpc, explain_pb2_grpc
from propscope.v1 import explain_pb2 as pb
from propscope_server.open_contract import BOUND_ATTACK_PASSES
from tests.integration import open_resnet
from tests.integration.conftest import inference_count, scene_png
from tests.integration.test_attribution import settled_count

MODEL = "synth_patch"
SQUARE_WITH_PATCH = scene_png(shape=1, patch=True)
PATCH_CELL = 0  # the patch (pixels 3..16 of 64) lies in the top-left cell of a 4 x 4 grid
SMALL = {"grid_size": 4, "samples": 8}


@pytest.fixture(scope="module")
def attribution(channel) -> attribution_pb2_grpc.AttributionServiceStub:
    return attribution_pb2_grpc.AttributionServiceStub(channel)


def attribute(stub, image: bytes = SQUARE_WITH_PATCH, model: str = MODEL, **fields) -> list:
    request = apb.AttributeRequest(image=image, model=pb.ModelRef(name=model), **fields)
    return list(stub.Attribute(request, timeout=300))


def grid_of(result: apb.AttributionResult) -> np.ndarray:
    return np.asarray(result.grid.values).reshape(result.grid.height, result.grid.width)


def refusal(stub, **fields) -> tuple[grpc.StatusCode, str, str]:
    """(status, details, the field its BadRequest names) of a refused Attribute."""
    with pytest.raises(grpc.RpcError) as caught:
        attribute(stub, **fields)
    status = rpc_status.from_call(caught.value)
    fields_named = []
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields_named += [v.field for v in bad.field_violations]
    return caught.value.code(), caught.value.details(), ",".join(fields_named)


def test_an_eva_map_on_synth_patch_is_largest_on_the_patch(attribution, triton):
    before = settled_count(triton, MODEL)
    # seed 11: a cache key no other test uses, so the map is computed here
    events = attribute(attribution, eva=apb.EvaOptions(**SMALL), seed=11)
    after = settled_count(triton, MODEL)
    accepted, result = events[0].accepted, events[-1].result
    assert accepted.method == "eva" and accepted.eva.grid_size == 4
    assert accepted.eva.bound == apb.BOUND_METHOD_CROWN and accepted.eva.samples == 8
    assert not accepted.HasField("perturbation")  # EVA perturbs nothing
    assert accepted.planned_forward_passes == 17 == result.forward_passes
    # 17 bound rows, the probe row and the original: Triton counts each (not the samples).
    assert after - before == accepted.planned_forward_passes_total == 17 + 2
    eva = result.eva
    assert (
        eva.guaranteed and eva.bound_passes == 17 and eva.sample_passes == 8 + BOUND_ATTACK_PASSES
    )
    assert result.target_label == "square" and eva.adversary_label == "circle"
    assert list(eva.epsilon_input) == pytest.approx([8.0] * 3)  # UINT8: pixel values
    slack = 1e-5 * max(1.0, abs(eva.overlap_bound))
    assert max(eva.region_bounds) <= eva.overlap_bound + slack  # B_u lies inside B
    assert eva.sampled_overlap <= eva.overlap_bound
    grid = grid_of(result)
    np.testing.assert_allclose(
        grid.ravel(), eva.overlap_bound - np.asarray(eva.region_bounds), rtol=1e-5, atol=1e-5
    )
    assert int(grid.argmax()) == PATCH_CELL, grid
    assert result.map.height == result.map.width == 64
    assert not result.warnings

    without = attribute(attribution, scene_png(shape=1, patch=False), eva=apb.EvaOptions(**SMALL))[
        -1
    ].result
    assert without.target_label == "circle"  # the patch is what made the square a square
    assert grid[0, 0] > 1.5 * grid_of(without)[0, 0]


def test_list_models_offers_eva_to_models_declaring_bounds_only(channel):
    models = explain_pb2_grpc.ExplainServiceStub(channel).ListModels(pb.ListModelsRequest())
    by_name = {m.name: set(m.methods) for m in models.models}
    assert "eva" in by_name[MODEL] and "eva" in by_name["synth_hue_fp32"]
    assert "eva" not in by_name["calibration_probe"] and "sobol" in by_name["calibration_probe"]


def test_a_float_channels_first_model_gets_the_radius_over_its_std(attribution):
    """synth_hue_fp32 takes FP32 NCHW normalised with std 0.25: the radius is eps / 0.25 in
    its units, laid out channels first; the hue model looks at the object, the centre."""
    result = attribute(
        attribution, scene_png(), model="synth_hue_fp32", eva=apb.EvaOptions(**SMALL)
    )
    result = result[-1].result
    assert list(result.eva.epsilon_input) == pytest.approx([8 / 255 / 0.25] * 3)
    grid = grid_of(result)
    centre = {(1, 1), (1, 2), (2, 1), (2, 2)}
    largest = {divmod(int(k), 4) for k in np.argsort(grid.ravel())[-4:]}
    assert largest == centre, grid


def test_a_small_ball_is_certified(attribution):
    result = attribute(attribution, eva=apb.EvaOptions(epsilon=1 / 255, **SMALL))[-1].result
    assert result.eva.overlap_bound < 0 and result.eva.certified and result.eva.guaranteed


def test_a_hybrid_from_a_layer_is_marked_not_guaranteed(attribution):
    events = attribute(attribution, eva=apb.EvaOptions(hybrid_layer="features.1", **SMALL))
    result = events[-1].result
    assert not result.eva.guaranteed and not result.eva.certified
    assert result.eva.hybrid_layer == "features.1"
    assert result.eva.sample_passes == 17 * (8 + BOUND_ATTACK_PASSES)  # every row samples
    (warning,) = result.warnings
    assert "not guaranteed" in warning and "'features.1'" in warning and "8 sampled" in warning
    assert any("not guaranteed" in w for w in events[0].accepted.warnings)
    assert "hybrid from layer 'features.1'" in events[0].accepted.perturbation_description


def test_a_repeat_is_served_from_the_cache_with_its_bounds(attribution, triton):
    options = {"eva": apb.EvaOptions(grid_size=2, samples=4), "seed": 23}
    first = attribute(attribution, **options)[-1].result
    before = settled_count(triton, MODEL)
    second = attribute(attribution, **options)[-1].result
    after = settled_count(triton, MODEL)
    assert second.cache_hit and second.forward_passes == 0
    assert after - before == 2  # the original and the probe row: no bound row
    assert second.eva == first.eva
    assert list(second.grid.values) == list(first.grid.values)
    other = attribute(attribution, eva=apb.EvaOptions(grid_size=2, samples=4, epsilon=0.02))
    assert not other[-1].result.cache_hit  # every EVA option is in the key


def test_stability_recomputes_eva_maps(channel):
    stub = attribution_pb2_grpc.AttributionServiceStub(channel)
    request = apb.EvaluateAttributionRequest(
        image=SQUARE_WITH_PATCH,
        model=pb.ModelRef(name=MODEL),
        stability=apb.StabilityOptions(nb_samples=2, eva=apb.EvaOptions(grid_size=2, samples=2)),
    )
    events = list(stub.EvaluateAttribution(request, timeout=300))
    assert events[0].accepted.planned_forward_passes == 3 * 5
    (metric,) = [e.metric for e in events if e.WhichOneof("event") == "metric"]
    assert metric.metric == "stability" and "method eva" in metric.settings
    assert np.isfinite(metric.value) and len(metric.distances) == 2


@pytest.mark.parametrize(
    ("fields", "code", "field", "words"),
    [
        ({"model": "calibration_probe"}, "FAILED_PRECONDITION", "method", "needs bounds"),
        ({"eva": {"epsilon": 0.0}}, "INVALID_ARGUMENT", "eva.epsilon", "(0, 1]"),
        ({"eva": {"epsilon": 2.0}}, "INVALID_ARGUMENT", "eva.epsilon", "(0, 1]"),
        ({"eva": {"grid_size": 1}}, "INVALID_ARGUMENT", "eva.grid_size", "2..32"),
        (
            {"eva": {"hybrid_layer": "head"}},
            "INVALID_ARGUMENT",
            "eva.hybrid_layer",
            "features.0, features.1, features.2",
        ),
        (
            {"target_score": apb.TARGET_SCORE_PROBABILITY},
            "INVALID_ARGUMENT",
            "target_score",
            "logit margins",
        ),
        ({"eva": {"samples": 70000}}, "INVALID_ARGUMENT", "eva.samples", "1..65536"),
    ],
)
def test_a_refusal_names_the_field_before_any_bound_row(attribution, fields, code, field, words):
    fields = dict(fields)
    options = apb.EvaOptions(**SMALL)
    for key, value in fields.pop("eva", {}).items():
        setattr(options, key, value)
    status, details, named = refusal(attribution, eva=options, **fields)
    assert status.name == code and field in named.split(","), (status, details, named)
    assert words in details


def test_a_network_the_bound_propagation_does_not_support_is_refused_naming_it(
    attribution, triton, tmp_path, monkeypatch
):
    """A team's network with a sigmoid before its classifier head: served, explained by
    Sobol, refused by EVA's probe row with the module named."""
    monkeypatch.setattr(
        open_resnet,
        "MODULE_SOURCE",
        open_resnet.MODULE_SOURCE.replace(
            "        self.fc = nn.Linear(2 * width, num_classes)\n",
            "        self.fc = nn.Linear(2 * width, num_classes)\n        self.squash = nn.Sigmoid()\n",
        ).replace(
            "return self.fc(self.pool(x).flatten(1))",
            "return self.fc(self.squash(self.pool(x).flatten(1)))",
        ),
    )
    assert "self.squash(" in open_resnet.MODULE_SOURCE
    folder = open_resnet.write_model(tmp_path / "repository", name="tiny_resnet_sigmoid")
    with open_resnet.served(triton, folder) as name:
        before = inference_count(triton, name)
        status, details, named = refusal(attribution, model=name, eva=apb.EvaOptions(**SMALL))
        assert status == grpc.StatusCode.FAILED_PRECONDITION and named == "method"
        assert "bound propagation does not support" in details and "squash" in details
        assert settled_count(triton, name) - before == 2  # the original and the probe row
