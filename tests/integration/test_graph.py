"""BuildGraph through the real stack (gateway, Triton's open classifiers): the stream's
order, the forward passes Triton counts against the plan's formula, the task graph, the
SDK's GraphResult and its DOT text, the refusals (each before any pass), ListModels' view
of an open model, and a residual network that is not ours explained as a graph.

synth_hue is certain of most images (p0 > 0.999: one channel moves p by < 1e-3, nothing
is relevant); a circle of hue 72 degrees and radius 8 sits between its hue ranges
(p0 0.5), where single channels move p by 0.17..0.35."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from propscope import Client, GraphResult, PropscopeError
from propscope.v1 import explain_pb2 as pb
from propscope.v1 import explain_pb2_grpc, graph_pb2_grpc
from propscope.v1 import graph_pb2 as gpb
from propscope_server.scoring.causal_graph import image_passes
from tests.integration import open_resnet
from tests.integration.conftest import extra_gateway, inference_count, png, scene_png

LAYERS = ["features.1", "features.2"]
CHANNELS = {"features.1": 32, "features.2": 64}
# 7 points: a straight-line curve reaches alpha 0.05 (6 points: only a sigmoid-like one);
# 6 of 32 / 64 channels get a path, 6 edges at most.
SMALL = {"steps": 6, "nodes_per_layer": 6, "max_edges": 6, "permutations": 200}
UNCERTAIN = {"hue_deg": 72.0, "radius_px": 8.0}


@pytest.fixture(scope="module")
def graph_stub(channel) -> graph_pb2_grpc.CausalGraphServiceStub:
    return graph_pb2_grpc.CausalGraphServiceStub(channel)


def request(images: list[bytes], model: str = "synth_hue", **fields) -> gpb.BuildGraphRequest:
    values = {"layers": LAYERS, **SMALL, **fields}
    return gpb.BuildGraphRequest(images=images, model=pb.ModelRef(name=model), **values)


def passes_counted(triton, model: str, before: int, expected: int) -> int:
    """Triton's count of `model`'s inferences since `before`. Triton updates its statistics
    after the response leaves, so the last batch may lag the stream's end: wait (at most
    10 s) until `expected` are counted, then a little longer for any beyond them."""
    deadline = time.monotonic() + 10.0
    while inference_count(triton, model) - before < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    return inference_count(triton, model) - before


def formula_passes(
    channels: list[int], edges_per_image: list[int], nodes_per_layer: int, steps: int
) -> int:
    """The design's count with each image's actual edges: an ACTIVATIONS pass per
    downstream layer that has edges (every edge here ends in the last layer)."""
    return sum(
        image_passes(channels, nodes_per_layer, steps, edges, 1 if edges else 0)
        for edges in edges_per_image
    )


def test_a_graph_streams_plan_progress_nodes_then_edges_and_triton_counts_its_passes(
    graph_stub, triton
):
    before = inference_count(triton, "synth_hue")
    events = list(graph_stub.BuildGraph(request([scene_png(**UNCERTAIN)]), timeout=300))
    counted = passes_counted(triton, "synth_hue", before, events[-1].done.passes)
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[0] == "accepted" and kinds[-1] == "done"
    assert "progress" in kinds[1 : kinds.index("node")]
    items = [kind for kind in kinds if kind in ("node", "edge")]
    assert items.count("edge") > 0
    assert items == sorted(items, key=lambda kind: kind == "edge")  # every node before an edge
    accepted, done = events[0].accepted, events[-1].done
    assert [(layer.name, layer.channels) for layer in accepted.layers] == list(CHANNELS.items())
    assert accepted.steps == 6 and accepted.baseline_source == "config"
    nodes = [event.node for event in events if event.WhichOneof("event") == "node"]
    edges = [event.edge for event in events if event.WhichOneof("event") == "edge"]
    assert len(nodes) == 32 + 64 and sum(not node.screened_out for node in nodes) == 12
    kept = {(n.layer, n.channel) for n in nodes if n.relevant}
    for edge in edges:
        assert (edge.source_layer, edge.source_channel) in kept
        assert (edge.target_layer, edge.target_channel) in kept
        assert edge.relevant == (edge.significant and abs(edge.path_effect) >= 0.005)
    progress = [event.progress for event in events if event.WhichOneof("event") == "progress"]
    assert [p.passes_done for p in progress] == sorted(p.passes_done for p in progress)
    assert progress[-1].passes_done == done.passes
    expected = formula_passes(list(CHANNELS.values()), [len(edges)], 6, 6)
    assert counted == done.passes == expected <= accepted.planned_passes
    # With every possible edge the formula is the plan's bound, to the pass.
    assert accepted.planned_passes == formula_passes(list(CHANNELS.values()), [6], 6, 6)
    print(
        f"\nsynth_hue, one image, S=6: {done.passes} passes (Triton {counted}, plan "
        f"{accepted.planned_passes}), {done.total_ms / 1000:.2f} s; node |dp| "
        f"{sorted(round(abs(n.probability_change), 3) for n in nodes if not n.screened_out)}; "
        f"edge path effects {sorted(round(e.path_effect, 4) for e in edges)}"
    )


def test_a_certain_image_has_orderly_but_irrelevant_nodes_and_no_edges(client: Client, triton):
    before = inference_count(triton, "synth_hue")
    found = client.graph(scene_png(), "synth_hue", layers=LAYERS, **SMALL)
    assert passes_counted(triton, "synth_hue", before, found.passes) == found.passes
    tested = [node for node in found.nodes if not node.screened_out]
    assert tested and max(abs(node.probability_change) for node in tested) < 0.01
    assert not found.kept_nodes(0) and not found.edges
    assert found.passes == formula_passes(list(CHANNELS.values()), [0], 6, 6)
    # Never silently empty: GraphDone's warning says why, per image, and names the fix.
    (warning,) = found.warnings
    assert warning.startswith("image 0: the target probability is 1 - ")
    assert "so no node is relevant" in warning and "explain less confident images" in warning


def test_a_task_graph_keeps_what_is_relevant_on_min_share_of_the_class(client: Client, triton):
    images = [
        scene_png(**UNCERTAIN),
        scene_png(hue_deg=70.0, radius_px=8.0),
        scene_png(hue_deg=74.0, radius_px=8.0, center=(30.0, 33.0)),
        scene_png(),  # red circle: certain, no edges
    ]
    before = inference_count(triton, "synth_hue")
    found = client.graph(images, "synth_hue", layers=LAYERS, bootstrap=200, seed=3, **SMALL)
    counted = passes_counted(triton, "synth_hue", before, found.passes)
    task = found.task_graph
    assert task is not None and task.min_share == 0.5
    assert sorted(task.images + task.excluded_images) == [0, 1, 2, 3]
    edges = [len(found.image_edges(i)) for i in range(4)]
    assert counted == found.passes == formula_passes(list(CHANNELS.values()), edges, 6, 6)
    assert found.passes <= found.planned_passes
    used = task.images
    for node in task.nodes:
        share = np.mean(
            [any(n.key == node.key and n.relevant for n in found.image_nodes(i)) for i in used]
        )
        assert node.share == pytest.approx(share) and node.share >= 0.5
        assert 0.0 <= node.bootstrap_frequency <= 1.0
    for edge in task.edges:
        assert 0.5 <= edge.share <= 1.0 and 0.0 <= edge.bootstrap_frequency <= 1.0
    assert task.nodes, "the uncertain circles share relevant channels"
    dot = found.to_dot()
    assert all(f'"{node.key}"' in dot for node in task.nodes)
    print(
        f"\ntask graph over 4 images (S=6): {found.passes} passes, "
        f"{found.total_ms / 1000:.2f} s, {len(task.nodes)} nodes, {len(task.edges)} edges, "
        f"edges per image {edges}"
    )


def test_the_sdk_folds_the_stream_into_a_graph_result_drawn_by_its_kept_items(client: Client):
    found = client.graph(scene_png(**UNCERTAIN), "synth_hue", layers=LAYERS, **SMALL)
    assert isinstance(found, GraphResult) and found.images == 1 and found.task_graph is None
    assert found.warnings == ()  # channels move p by 0.17..0.35: nothing to warn about
    dot = found.to_dot()
    assert dot.startswith("digraph propscope {")
    assert found.kept_nodes(0) and all(f'"{n.key}"' in dot for n in found.kept_nodes(0))
    for edge in found.kept_edges(0):
        assert f'"{edge.source}" -> "{edge.target}"' in dot


def refused(graph_stub, message: gpb.BuildGraphRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(graph_stub.BuildGraph(message, timeout=60))
    return caught.value


def test_a_black_box_model_is_refused_naming_the_capability(graph_stub, triton):
    before = inference_count(triton, "calibration_probe")
    error = refused(graph_stub, request([scene_png()], model="calibration_probe", layers=[]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "interventions" in error.details() and "calibration_probe" in error.details()
    assert passes_counted(triton, "calibration_probe", before, 0) == 0


def test_an_unknown_layer_is_refused_listing_the_known_ones(client: Client):
    with pytest.raises(PropscopeError) as caught:
        client.graph(scene_png(), "synth_hue", layers=["features.9"], **SMALL)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [violation.field for violation in caught.value.field_violations] == ["layers"]
    assert "it declares features.0, features.1, features.2" in caught.value.message


def test_a_path_too_short_for_alpha_is_refused_naming_the_fewest_steps(graph_stub, triton):
    before = inference_count(triton, "synth_hue")
    error = refused(graph_stub, request([scene_png()], steps=4))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "steps is 4" in error.details() and "use steps >= 5" in error.details()
    assert passes_counted(triton, "synth_hue", before, 0) == 0


def test_a_reference_set_of_the_wrong_size_is_refused(graph_stub):
    error = refused(graph_stub, request([scene_png()], reference_images=[scene_png()] * 3))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reference_images has 3 images" in error.details() and "8..256" in error.details()


def test_a_graph_over_the_pass_budget_is_refused_before_any_pass(live_stack, triton, tmp_path):
    with extra_gateway(live_stack, tmp_path, PROPSCOPE_LIMITS__MAX_GRAPH_PASSES="100") as gateway:
        with grpc.insecure_channel(gateway.target) as channel:
            stub = graph_pb2_grpc.CausalGraphServiceStub(channel)
            before = inference_count(triton, "synth_hue")
            error = refused(stub, request([scene_png()]))
            assert passes_counted(triton, "synth_hue", before, 0) == 0
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_graph_passes is 100" in error.details()


def test_list_models_shows_an_open_models_layers_method_and_optional_inputs(channel):
    models = explain_pb2_grpc.ExplainServiceStub(channel).ListModels(pb.ListModelsRequest())
    (hue,) = [model for model in models.models if model.name == "synth_hue"]
    assert [(layer.name, layer.channels) for layer in hue.layers] == [
        ("features.0", 16),
        ("features.1", 32),
        ("features.2", 64),
    ]
    assert "causal_graph" in hue.methods
    optional = {tensor.name for tensor in hue.inputs if tensor.optional}
    assert {"INTERVENE_LAYER", "PATCH_VALUE", "ACTIVATION_LAYER"} <= optional
    assert [tensor.name for tensor in hue.inputs if not tensor.optional] == ["IMAGE"]
    (probe,) = [model for model in models.models if model.name == "calibration_probe"]
    assert not probe.layers and "causal_graph" not in probe.methods


# A layer inside the first residual block (its first convolution) besides the blocks.
RESNET_LAYERS = {"stem": 8, "stage1.conv1": 8, "stage1": 8, "stage2": 16}


def test_a_residual_network_not_ours_is_explained_as_a_graph(
    client: Client, triton, tmp_path: Path, monkeypatch
):
    monkeypatch.setattr(open_resnet, "LAYERS", RESNET_LAYERS)
    folder = open_resnet.write_model(tmp_path / "repository", name="tiny_resnet_graph")
    rng = np.random.default_rng(5)
    images = [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    references = [png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    layers = ["stage1.conv1", "stage1", "stage2"]
    with open_resnet.served(triton, folder) as name:
        before = inference_count(triton, name)
        found = client.graph(
            images,
            name,
            layers=layers,
            reference_images=references,
            steps=6,
            permutations=200,
            min_probability_change=0.001,
            max_edges=8,
            bootstrap=100,
        )
        counted = passes_counted(triton, name, before, found.passes)
    assert [layer.name for layer in found.layers] == layers
    assert found.baseline_source == "reference_images"
    assert {node.layer for node in found.nodes} == set(layers)
    assert all(not node.screened_out for node in found.nodes)  # 16 channels at most
    assert found.edges and {e.source_layer for e in found.edges} <= {"stage1.conv1", "stage1"}
    assert any(e.source_layer == "stage1.conv1" and e.target_layer == "stage1" for e in found.edges)
    edge_layers = [len({e.target_layer for e in found.image_edges(i)}) for i in range(2)]
    per_image = [
        image_passes([8, 8, 16], 16, 6, len(found.image_edges(i)), edge_layers[i]) for i in range(2)
    ]
    assert counted == found.passes == 8 + sum(per_image) <= found.planned_passes
    print(
        f"\ntiny_resnet (stage1.conv1, stage1, stage2), 2 images + 8 references, S=6: "
        f"{found.passes} passes, {found.total_ms / 1000:.2f} s, "
        f"{sum(n.relevant for n in found.nodes)} relevant nodes, {len(found.edges)} edges"
    )
