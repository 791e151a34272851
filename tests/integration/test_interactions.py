"""Interactions through the real stack (gateway, Triton's procedural editor and synthetic
classifiers, Redis): the hue-biased model's hue carries its variance and the patch none,
a second classifier reuses every composed image (no editor call), a provided design
round-trips through InteractionDesign, and a pair's second-order index comes back."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import redis
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc, interactions_pb2_grpc
from propscope.v1 import interactions_pb2 as ipb
from propscope_server.triton_models.editors.procedural import edit_path
from tests.integration.conftest import SAMPLE, png
from tests.integration.test_attribution import settled_count

HUE = pb.Property(
    name="hue",
    editor=pb.EditorIntervention(
        model="procedural", parameters={"operation": "hue", "region": "object"}
    ),
)
PATCH = pb.Property(
    name="patch",
    editor=pb.EditorIntervention(model="procedural", parameters={"operation": "blend"}),
)
# N 16: 64 composed images, 33 editor calls (one for every first strength, then one per
# distinct first strength with its two second strengths).
DESIGN_SIZE = 16


@pytest.fixture(scope="module")
def stub(channel) -> interactions_pb2_grpc.InteractionServiceStub:
    return interactions_pb2_grpc.InteractionServiceStub(channel)


def interactions(stub, model: str, seed: int, **fields) -> list:
    values = dict(
        image=SAMPLE.read_bytes(),
        model=pb.ModelRef(name=model),
        properties=[HUE, PATCH],
        design_size=DESIGN_SIZE,
        seed=seed,
    )
    values.update(fields)
    return list(stub.Interactions(ipb.InteractionsRequest(**values), timeout=300))


def result_of(events: list) -> ipb.InteractionsResult:
    assert events[0].WhichOneof("event") == "accepted"
    assert events[-1].WhichOneof("event") == "result"
    return events[-1].result


def test_hue_carries_the_hue_models_variance_and_a_second_classifier_edits_nothing(
    stub, triton, live_stack
):
    redis.Redis.from_url(live_stack.redis_url).flushall()  # cold, whatever ran before
    editor_calls, classified = (
        settled_count(triton, "procedural"),
        settled_count(triton, "synth_hue"),
    )
    events = interactions(stub, "synth_hue", seed=11)
    accepted, result = events[0].accepted, result_of(events)
    assert list(accepted.composition_order) == ["hue", "patch"]
    assert (accepted.design_size, accepted.bootstrap) == (DESIGN_SIZE, 1000)
    assert accepted.planned_images == 4 * DESIGN_SIZE
    # One call for the first property, then one per distinct first strength (A's and B's).
    assert settled_count(triton, "procedural") - editor_calls == 1 + 2 * DESIGN_SIZE
    assert result.edits == accepted.planned_edits == 2 * DESIGN_SIZE + 4 * DESIGN_SIZE
    assert (result.cache_hits, result.cache_misses) == (0, 4 * DESIGN_SIZE)
    passes = settled_count(triton, "synth_hue") - classified
    assert passes == result.forward_passes == accepted.planned_forward_passes
    hue, patch = result.indices
    assert (hue.property_name, patch.property_name) == ("hue", "patch")
    assert hue.total_order.value > 0.5 and patch.total_order.value < 0.05
    assert hue.total_order.ci_low > patch.total_order.ci_high
    assert result.variance > 0.01 and result.target_class == 0
    assert not any("barely moves" in w for w in result.warnings)
    stages = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
    assert stages[0] == "edit" and stages[-1] == "classify"

    editor_calls = settled_count(triton, "procedural")
    other = result_of(interactions(stub, "synth_patch", seed=11))
    assert settled_count(triton, "procedural") == editor_calls
    assert (other.cache_hits, other.cache_misses, other.edits) == (4 * DESIGN_SIZE, 0, 0)
    hue, patch = other.indices
    assert patch.total_order.value > hue.total_order.value


def test_a_score_that_barely_moves_is_warned_about_and_never_significant(stub):
    # synth_unbiased's shape decides: its probability saturates and the edits move its
    # ninth decimal; the indices stay as computed, the warning says to read the variance.
    result = result_of(interactions(stub, "synth_unbiased", seed=11))
    assert 0.0 < result.variance < 1e-4
    negligible = [w for w in result.warnings if "barely moves" in w]
    assert len(negligible) == 1 and "read `variance` first" in negligible[0]
    assert any(index.total_order.value > 0.0 for index in result.indices)
    assert result.negligible_variance and not result.interaction_significant
    # Its near-zero resampled variances spread the intervals, but no design size helps a
    # score that does not move: no interval warning advises one.
    assert not any("design_size" in w for w in result.warnings)


# The procedural editor's parameters resolved against its schema (the gateway sends these).
HUE_PARAMETERS = {"operation": "hue", "region": "object", "amount": ""}
PATCH_PARAMETERS = {
    "operation": "blend",
    "region": "all",
    "amount": "",
    "position": "fixed",
    "patch_x": "0.05",
    "patch_y": "0.05",
    "patch_size": "0.22",
}


def test_a_provided_design_from_interaction_design_gives_the_composed_indices(stub, triton):
    seed = 5
    design = stub.InteractionDesign(
        ipb.InteractionDesignRequest(properties=2, design_size=8, seed=seed), timeout=30
    )
    assert len(design.rows) == 4 * 8 and list(design.row_kinds[::8]) == ["A", "B", "C1", "C2"]
    image = np.asarray(Image.open(SAMPLE).convert("RGB"))
    images = []
    for row in design.rows:  # the caller's own edits: hue, then the patch, in process
        hue, patch = np.asarray(row.strengths, np.float32)
        edited = edit_path(image, np.array([hue]), HUE_PARAMETERS, seed)[0]
        images.append(png(edit_path(edited, np.array([patch]), PATCH_PARAMETERS, seed)[0]))
    editor_calls = settled_count(triton, "procedural")
    provided = result_of(
        interactions(
            stub,
            "synth_hue",
            seed=seed,
            design_size=8,
            properties=[pb.Property(name="hue"), pb.Property(name="patch")],
            provided_design=ipb.ProvidedDesign(images=images),
        )
    )
    assert settled_count(triton, "procedural") == editor_calls
    assert (provided.edits, provided.cache_hits, provided.cache_misses) == (0, 0, 0)
    assert provided.forward_passes == 4 * 8 + 1
    composed = result_of(interactions(stub, "synth_hue", seed=seed, design_size=8))
    # The gateway composed the same images (the editor is the same code): the same indices.
    for mine, theirs in zip(provided.indices, composed.indices, strict=True):
        assert mine.total_order == theirs.total_order
        assert mine.first_order == theirs.first_order
    assert provided.interaction_share == composed.interaction_share


def test_a_pairs_second_order_index_comes_back(stub):
    result = result_of(interactions(stub, "synth_hue", seed=11, second_order_pair=["patch", "hue"]))
    assert list(result.second_order.property_names) == ["hue", "patch"]
    index = result.second_order.index
    assert np.isfinite([index.value, index.ci_low, index.ci_high]).all()
    assert index.ci_low <= index.value <= index.ci_high
    # With two properties the pair's rows are B's: composed and classified once.
    assert result.cache_hits + result.cache_misses == 4 * DESIGN_SIZE
    assert result.forward_passes == 4 * DESIGN_SIZE + 1


def test_a_refusal_names_the_field_in_a_bad_request_detail(stub):
    with pytest.raises(grpc.RpcError) as caught:
        interactions(stub, "synth_hue", seed=0, properties=[HUE], design_size=0)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least two properties" in error.details()
    status = status_pb2.Status.FromString(
        dict(error.trailing_metadata())["grpc-status-details-bin"]
    )
    detail = error_details_pb2.BadRequest()
    status.details[0].Unpack(detail)
    assert detail.field_violations[0].field == "properties"


def test_interaction_design_refuses_a_design_size_that_is_no_power_of_two(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.InteractionDesign(
            ipb.InteractionDesignRequest(properties=2, design_size=24), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "use 16 or 32" in caught.value.details()


def test_listed_methods_include_interactions(channel):
    listing = explain_pb2_grpc.ExplainServiceStub(channel).ListModels(
        pb.ListModelsRequest(), timeout=30
    )
    by_name = {m.name: m for m in listing.models}
    assert "interactions" in by_name["synth_hue"].methods
    assert "interactions" not in by_name["procedural"].methods
