"""BuildGraph through the real stack (gateway, Triton's open synthetic classifier): the
stream's order (plan, nodes, then edges, done), the SDK's GraphResult and its DOT text, and
the refusals (a black-box model, an unknown layer)."""

from __future__ import annotations

import grpc
import pytest

from propscope import Client, GraphResult, PropscopeError
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import graph_pb2 as gpb
from propscope.v1 import graph_pb2_grpc
from tests.integration.conftest import scene_png

LAYERS = ["features.1", "features.2"]
# Small enough to take seconds: 7 points per path (a monotone one can reach alpha 0.05), 4
# channels a layer.
SMALL = {"steps": 6, "nodes_per_layer": 4, "max_edges": 4, "permutations": 200}


@pytest.fixture(scope="module")
def graph_stub(channel) -> graph_pb2_grpc.CausalGraphServiceStub:
    return graph_pb2_grpc.CausalGraphServiceStub(channel)


def test_a_graph_streams_its_plan_nodes_then_edges(graph_stub):
    request = gpb.BuildGraphRequest(
        images=[scene_png(hue_deg=5.0)], model=pb.ModelRef(name="synth_hue"), layers=LAYERS, **SMALL
    )
    events = list(graph_stub.BuildGraph(request, timeout=300))
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "accepted" and kinds[-1] == "done"
    accepted = events[0].accepted
    assert [(layer.name, layer.channels) for layer in accepted.layers] == [
        ("features.1", 32),
        ("features.2", 64),
    ]
    assert accepted.steps == 6 and accepted.images == 1 and len(accepted.targets) == 1
    items = [kind for kind in kinds if kind in ("node", "edge")]
    assert "node" in items
    assert items == sorted(items, key=lambda kind: kind == "edge")  # every node before an edge
    nodes = [event.node for event in events if event.WhichOneof("event") == "node"]
    assert {node.layer for node in nodes} == set(LAYERS)
    tested = [node for node in nodes if not node.screened_out]
    assert 0 < len(tested) <= 4 * len(LAYERS)
    assert all(len(node.curve) == 7 and 0 < node.p_value <= 1 for node in tested)
    significant = {(n.layer, n.channel) for n in tested if n.significant}
    for event in events:
        if event.WhichOneof("event") == "edge":
            edge = event.edge
            assert (edge.source_layer, edge.target_layer) == tuple(LAYERS)
            assert (edge.source_layer, edge.source_channel) in significant
            assert (edge.target_layer, edge.target_channel) in significant
    assert 0 < events[-1].done.passes <= accepted.planned_passes


def test_the_sdk_folds_the_stream_into_a_graph_result(client: Client):
    found = client.graph(scene_png(hue_deg=5.0), "synth_hue", layers=LAYERS, **SMALL)
    assert isinstance(found, GraphResult) and found.images == 1
    assert found.nodes and found.passes <= found.planned_passes
    dot = found.to_dot()
    assert dot.startswith("digraph propscope {")
    for node in found.significant_nodes(0):
        assert f'"{node.key}"' in dot


def test_a_black_box_model_is_refused_naming_the_capability(graph_stub):
    request = gpb.BuildGraphRequest(
        images=[scene_png()], model=pb.ModelRef(name="calibration_probe"), **SMALL
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(graph_stub.BuildGraph(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "interventions" in caught.value.details()


def test_an_unknown_layer_is_refused_listing_the_known_ones(client: Client):
    with pytest.raises(PropscopeError) as caught:
        client.graph(scene_png(), "synth_hue", layers=["features.9"], **SMALL)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [violation.field for violation in caught.value.field_violations] == ["layers"]
    assert "it declares features.0, features.1, features.2" in caught.value.message
