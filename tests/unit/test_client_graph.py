"""Client.graph and AsyncClient.graph against an in-process fake CausalGraphService: the
request they send, the GraphResult folded from the stream, its JSON and DOT text (pure
client logic; the real method runs in tests/integration/test_graph.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from PIL import Image
from typer.testing import CliRunner

from propscope import AsyncClient, Client, GraphResult, PropscopeError
from propscope._graph import GraphCollector
from propscope._requests import build_graph_request
from propscope.cli import app
from propscope.v1 import explain_pb2, explain_pb2_grpc, graph_pb2, graph_pb2_grpc

LAYERS = [explain_pb2.LayerInfo(name="features.1", channels=32)] + [
    explain_pb2.LayerInfo(name="features.2", channels=64)
]


def _node(image: int, layer: str, channel: int, score: float, significant: bool = True):
    return graph_pb2.NodeResult(
        image=image,
        layer=layer,
        channel=channel,
        score=score,
        p_value=0.001,
        q_value=0.004,
        probability_change=-0.3,
        significant=significant,
        relevant=significant,
        curve=[0.9, 0.8, 0.6],
    )


def _edge(image: int, source: int, target: int, path_effect: float, significant: bool = True):
    return graph_pb2.EdgeResult(
        image=image,
        source_layer="features.1",
        source_channel=source,
        target_layer="features.2",
        target_channel=target,
        direct_effect=0.4,
        path_effect=path_effect,
        score=0.05,
        p_value=0.002,
        q_value=0.01,
        significant=significant,
        relevant=significant and abs(path_effect) >= 0.005,
        curve=[0, 0.1, path_effect],
        clamped_curve=[0.9, 0.85, 0.7],
    )


def events(images: int) -> list[graph_pb2.BuildGraphEvent]:
    """A plausible stream: plan, progress, per image nodes then edges, task graph, done."""
    stream = [
        graph_pb2.BuildGraphEvent(
            accepted=graph_pb2.GraphAccepted(
                model="synth_hue",
                model_version="1",
                layers=LAYERS,
                steps=2,
                images=images,
                targets=[1] * images,
                target_labels=["red"] * images,
                baseline_source="config",
                planned_passes=40,
                warnings=["a warning"],
            )
        ),
        graph_pb2.BuildGraphEvent(
            progress=graph_pb2.GraphProgress(passes_done=20, passes_total=40)
        ),
    ]
    for image in range(images):
        stream += [
            graph_pb2.BuildGraphEvent(node=_node(image, "features.1", 3, 0.2)),
            graph_pb2.BuildGraphEvent(node=_node(image, "features.1", 4, 0.01, significant=False)),
            graph_pb2.BuildGraphEvent(node=_node(image, "features.2", 9, 0.1)),
            graph_pb2.BuildGraphEvent(edge=_edge(image, 3, 9, 0.25 + image * 0.05)),
            graph_pb2.BuildGraphEvent(edge=_edge(image, 4, 9, 0.5, significant=False)),
        ]
    if images > 1:
        stream.append(
            graph_pb2.BuildGraphEvent(
                task_graph=graph_pb2.TaskGraph(
                    target_class=1,
                    target_label="red",
                    images=list(range(images)),
                    nodes=[
                        graph_pb2.TaskNode(
                            layer="features.2", channel=9, share=1.0, mean_score=0.1
                        ),
                        graph_pb2.TaskNode(
                            layer="features.1", channel=3, share=1.0, mean_score=0.2
                        ),
                    ],
                    edges=[
                        graph_pb2.TaskEdge(
                            source_layer="features.1",
                            source_channel=3,
                            target_layer="features.2",
                            target_channel=9,
                            share=1.0,
                            bootstrap_frequency=0.97,
                            mean_score=0.05,
                        )
                    ],
                    min_share=0.5,
                    excluded_images=[images] if images > 1 else [],
                )
            )
        )
    stream.append(
        graph_pb2.BuildGraphEvent(
            repair=graph_pb2.Repair(
                property="hue",
                channels=[
                    graph_pb2.RepairChannel(
                        layer="features.1", channel=3, value=0.125, movement=4.0, score=0.2
                    )
                ],
            )
        )
    )
    done = graph_pb2.GraphDone(total_ms=12.5, passes=38, warnings=["image 0: saturated"])
    stream.append(graph_pb2.BuildGraphEvent(done=done))
    for message in stream:
        message.request_id = "rid"
    return stream


def _no_means(context) -> None:
    """The server's refusal of a mean baseline on a model without channel means."""
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="baseline mean: model 'synth_hue' declares no channel means; give 8 to 256 "
        "reference_images or choose baseline zero",
    )
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="reference_images", description="8..256"
                )
            ]
        )
    )
    status.details.append(detail)
    context.abort_with_status(rpc_status.to_status(status))


class FakeGraph(graph_pb2_grpc.CausalGraphServiceServicer):
    def __init__(self) -> None:
        self.requests: list[graph_pb2.BuildGraphRequest] = []

    def BuildGraph(self, request, context):  # noqa: N802
        self.requests.append(request)
        if request.model.name == "blackbox":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "needs interventions")
        if request.baseline == graph_pb2.GRAPH_BASELINE_MEAN and request.model.target_class == 7:
            _no_means(context)
        if request.model.target_class == 8:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "the graph needs up to 26010 forward passes; the limit max_graph_passes is "
                "20000 per request; lower the cost with fewer images or layers, fewer steps, "
                "a smaller nodes_per_layer (pre-screens wide layers) or max_edges",
            )
        if request.model.name == "truncated":
            yield from events(len(request.images))[:3]
            return
        yield from events(len(request.images))


class FakeModels(explain_pb2_grpc.ExplainServiceServicer):
    """ListModels for the CLI's pre-flight."""

    def ListModels(self, request, context):  # noqa: N802
        return explain_pb2.ListModelsResponse(
            models=[
                explain_pb2.ModelInfo(
                    name="synth_hue",
                    versions=["1"],
                    state="READY",
                    methods=["propgrad", "causal_graph"],
                    layers=LAYERS,
                ),
                explain_pb2.ModelInfo(
                    name="blackbox", versions=["1"], state="READY", methods=["propgrad"]
                ),
            ]
        )


@pytest.fixture
def service():
    fake = FakeGraph()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    graph_pb2_grpc.add_CausalGraphServiceServicer_to_server(fake, server)
    explain_pb2_grpc.add_ExplainServiceServicer_to_server(FakeModels(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(grace=None)


def _image(value: int = 200) -> np.ndarray:
    return np.full((8, 8, 3), value, dtype=np.uint8)


def test_graph_sends_the_request_and_folds_the_stream(service):
    fake, target = service
    progress, items = [], []
    with Client(target) as client:
        result = client.graph(
            [_image(), _image(100)],
            "synth_hue",
            layers=["features.1", "features.2"],
            steps=2,
            baseline="zero",
            min_share=0.5,
            repair_property="hue=procedural:operation=hue",
            on_progress=progress.append,
            on_item=items.append,
        )
    request = fake.requests[0]
    assert len(request.images) == 2 and list(request.layers) == ["features.1", "features.2"]
    assert request.baseline == graph_pb2.GRAPH_BASELINE_ZERO and request.steps == 2
    assert request.model.predicted_class and request.HasField("min_share")
    assert request.repair_property.editor.parameters == {"operation": "hue"}
    assert not request.HasField("repair_max_share")
    assert isinstance(result, GraphResult) and result.request_id == "rid"
    assert [(layer.name, layer.channels) for layer in result.layers] == [
        ("features.1", 32),
        ("features.2", 64),
    ]
    assert len(result.nodes) == 6 and len(result.edges) == 4
    assert [node.key for node in result.significant_nodes(1)] == ["features.1:3", "features.2:9"]
    assert result.nodes[0].curve == (0.9, 0.8, 0.6)
    assert result.task_graph is not None and result.task_graph.edges[0].bootstrap_frequency == 0.97
    assert result.repair.ablation("hue") == {
        "channels": [{"layer": "features.1", "channel": 3, "value": 0.125}],
        "source": "hue",
    }
    # The plan's warnings, then the finished graph's (GraphDone: per image).
    warnings = ("a warning", "image 0: saturated")
    assert (result.passes, result.total_ms, result.warnings) == (38, 12.5, warnings)
    assert [(p.passes_done, p.passes_total) for p in progress] == [(20, 40)]
    assert len(items) == 10  # every node and edge, as it came
    decoded = json.loads(result.to_json())
    assert decoded["edges"][0]["clamped_curve"] == [0.9, 0.85, 0.7]
    assert decoded["task_graph"]["nodes"][0]["channel"] == 9


def test_async_graph_returns_the_same_result(service):
    _, target = service

    async def run() -> GraphResult:
        async with AsyncClient(target) as client:
            return await client.graph(_image(), "synth_hue", steps=2)

    result = asyncio.run(run())
    assert result.images == 1 and result.task_graph is None and len(result.edges) == 2


def test_a_refusal_and_a_truncated_stream_raise(service):
    _, target = service
    with Client(target) as client:
        with pytest.raises(PropscopeError) as refused:
            client.graph(_image(), "blackbox")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(PropscopeError, match="GraphAccepted and GraphDone"):
            client.graph(_image(), "truncated")


def test_bad_arguments_are_refused_before_sending():
    with pytest.raises(ValueError, match="baseline must be one of mean, zero"):
        build_graph_request(_image(), "m", baseline="median")
    with pytest.raises(ValueError, match=r"min_share must be in \(0, 1\]"):
        build_graph_request(_image(), "m", min_share=0.0)
    with pytest.raises(ValueError, match=r"repair_max_share must be in \(0, 0.5\]"):
        build_graph_request(_image(), "m", repair_max_share=0.9)
    with pytest.raises(TypeError, match="layers must be a sequence"):
        build_graph_request(_image(), "m", layers="features.1")
    with pytest.raises(ValueError, match="at least one image"):
        build_graph_request([], "m")


def _result(images: int) -> GraphResult:
    collector = GraphCollector("")
    for message in events(images):
        collector.add(message)
    return collector.result()


def test_dot_of_one_image_draws_its_significant_nodes_and_edges_by_layer():
    dot = _result(1).to_dot()
    assert dot.startswith("digraph propscope {") and "rankdir=LR;" in dot
    assert 'subgraph "layer features.1" {' in dot and "rank=same;" in dot
    assert '"features.1:3" [label="features.1:3\\n0.2"];' in dot
    assert '"features.1:4"' not in dot  # not significant
    assert '"features.1:3" -> "features.2:9" [penwidth=6.00, label="+0.25"];' in dot
    assert dot.count("->") == 1  # the non-significant edge is left out
    assert dot.index("layer features.1") < dot.index("layer features.2")


def test_dot_of_several_images_draws_the_task_graph_with_mean_path_effects():
    result = _result(3)
    dot = result.to_dot()
    assert "task graph of class 1 (red)" in dot
    # Mean path effect over the three images: (0.25 + 0.30 + 0.35) / 3.
    assert 'label="+0.3"' in dot
    assert "image 2, class 1 (red)" in result.to_dot(image=2)
    with pytest.raises(ValueError, match="image must be in 0..2"):
        result.to_dot(image=3)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_svg_is_laid_out_by_graphviz():
    svg = _result(1).to_svg()
    assert "<svg" in svg and "features.1:3" in svg


@pytest.fixture
def image_files(tmp_path):
    paths = []
    for index, value in enumerate((200, 90)):
        paths.append(tmp_path / f"img{index}.png")
        Image.fromarray(_image(value)).save(paths[-1])
    return paths


def test_cli_graph_writes_tables_dot_svg_and_report(service, image_files, tmp_path):
    fake, target = service
    dot, svg, report = tmp_path / "g.dot", tmp_path / "g.svg", tmp_path / "g.html"
    args = ["graph", *map(str, image_files), "-m", "synth_hue", "--target", target]
    args += ["--layers", "features.1,features.2", "--steps", "2", "--no-progress"]
    args += ["--min-probability-change", "0.001"]
    result = CliRunner().invoke(app, [*args, "--dot", str(dot), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert list(fake.requests[0].layers) == ["features.1", "features.2"]
    assert fake.requests[0].min_probability_change == 0.001
    assert "task graph of class 1 (red)" in result.stdout
    assert "features.1:3 -> features.2:9" in result.stdout
    assert "2 of 3 tested channels kept (relevant), 2 significant" in result.stdout
    assert "image 0: 1 of 2 edges kept" in result.stdout
    assert "warning: image 0: saturated" in result.stdout
    assert dot.read_text().startswith("digraph propscope {")
    page = report.read_text()
    assert "<h1>propscope graph: synth_hue version 1</h1>" in page
    assert ("<svg" in page) == (shutil.which("dot") is not None)
    if shutil.which("dot"):
        assert CliRunner().invoke(app, [*args, "--svg", str(svg)]).exit_code == 0
        assert "<svg" in svg.read_text()


def test_cli_graph_plain_and_json(service, image_files):
    _, target = service
    args = ["graph", str(image_files[0]), "-m", "synth_hue", "--target", target, "--no-progress"]
    plain = CliRunner().invoke(app, [*args, "--format", "plain"])
    assert plain.exit_code == 0, plain.output
    lines = plain.stdout.splitlines()
    assert lines[0].startswith("node model=synth_hue image=") and "channel=3" in lines[0]
    assert any(line.startswith("edge ") and "path_effect=0.25" in line for line in lines)
    assert any(line.startswith("repair_channel ") for line in lines)
    assert lines[-1].startswith("graph model=synth_hue version=1 images=1 nodes=3 edges=2")
    assert "kept_nodes=2 kept_edges=1" in lines[-1]  # as GraphResult.kept_nodes/kept_edges
    assert any(
        line.startswith("edge ") and line.endswith("significant=no relevant=no") for line in lines
    )
    assert 'warning model=synth_hue message="image 0: saturated"' in lines
    as_json = CliRunner().invoke(app, [*args, "--format", "json"])
    decoded = json.loads(as_json.stdout)
    assert decoded["model"] == "synth_hue" and len(decoded["nodes"]) == 3


def test_cli_graph_refusals_exit_2(service, image_files):
    _, target = service
    base = ["graph", str(image_files[0]), "--target", target, "--no-progress"]
    blackbox = CliRunner().invoke(app, [*base, "-m", "blackbox"])
    assert blackbox.exit_code == 2 and "causal_graph" in blackbox.output
    assert "causal_graph needs an open model" in blackbox.output
    assert "activations,interventions" in blackbox.output
    bad = CliRunner().invoke(app, [*base, "-m", "synth_hue", "--baseline", "median"])
    assert bad.exit_code == 2 and "--baseline" in bad.output


def test_cli_repair_writes_the_next_version(service, image_files, tmp_path):
    fake, target = service
    root = tmp_path / "repo"
    (root / "synth_hue" / "1").mkdir(parents=True)
    (root / "synth_hue" / "1" / "model.py").write_text("# model\n")
    config = root / "synth_hue" / "config.pbtxt"
    config.write_text('name: "synth_hue"\n')
    args = ["repair", *map(str, image_files), "-m", "synth_hue", "--version", "1"]
    args += ["-p", "procedural:operation=hue", "--repository", str(root), "--target", target]
    args += ["--no-progress", "--format", "plain"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "version_policy: { all { } }" in refused.output
    assert not fake.requests  # refused before the graph was asked for
    config.write_text('name: "synth_hue"\nversion_policy: { all { } }\n')
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    request = fake.requests[0]
    assert request.repair_property.name == "repair" and request.model.version == "1"
    assert request.repair_property.editor.model == "procedural"
    ablation = json.loads((root / "synth_hue" / "2" / "propscope_ablation.json").read_text())
    assert ablation["channels"] == [{"layer": "features.1", "channel": 3, "value": 0.125}]
    assert (root / "synth_hue" / "2" / "model.py").read_text() == "# model\n"
    assert "/v2/repository/models/synth_hue/load" in result.stderr
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "synth_hue/2 exists already" in again.output


def test_cli_graph_json_keeps_the_image_names(service, image_files):
    """The result's ``images`` is a count; the names are ``image_files`` (they were lost)."""
    _, target = service
    args = ["graph", *map(str, image_files), "-m", "synth_hue", "--target", target]
    result = CliRunner().invoke(app, [*args, "--no-progress", "--format", "json"])
    assert result.exit_code == 0, result.output
    decoded = json.loads(result.stdout)
    assert decoded["images"] == 2
    assert decoded["image_files"] == [str(path) for path in image_files]


def test_cli_graph_plain_lines_carry_the_tables_scores(service, image_files):
    _, target = service
    args = ["graph", *map(str, image_files), "-m", "synth_hue", "--target", target]
    lines = CliRunner().invoke(app, [*args, "--no-progress", "--format", "plain"]).stdout
    task_edge = next(line for line in lines.splitlines() if line.startswith("task_edge "))
    assert task_edge.endswith("bootstrap_frequency=0.97 mean_score=0.05")
    repair = next(line for line in lines.splitlines() if line.startswith("repair_channel "))
    assert repair.endswith("value=0.125 movement=4.0 score=0.2")


def test_cli_graph_refuses_unwritable_drawings_before_any_pass(service, image_files, tmp_path):
    fake, target = service
    args = ["graph", str(image_files[0]), "-m", "synth_hue", "--target", target, "--no-progress"]
    missing = tmp_path / "no-such-folder" / "g.dot"
    result = CliRunner().invoke(app, [*args, "--dot", str(missing)])
    assert result.exit_code == 2
    assert "--dot" in result.stderr and "does not exist" in result.stderr
    assert not fake.requests  # nothing computed and then lost


def test_cli_graph_refusals_speak_of_options(service, image_files):
    """A refusal naming the request's reference_images speaks of --reference and --baseline;
    the pass budget's of --steps, --nodes-per-layer and --max-edges."""
    _, target = service
    args = ["graph", str(image_files[0]), "-m", "synth_hue", "--target", target, "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--target-class", "7"])
    assert result.exit_code == 2
    assert "give 8 to 256 --reference images or choose --baseline zero" in result.stderr
    assert "(option --reference)" in result.stderr
    budget = CliRunner().invoke(app, [*args, "--target-class", "8"])
    assert budget.exit_code == 2
    assert "fewer --steps, a smaller --nodes-per-layer (pre-screens wide layers) or " in (
        budget.stderr
    )


def test_cli_repair_sends_the_baseline_and_reference_images(service, image_files, tmp_path):
    """A model without channel means can be repaired: --reference (or --baseline zero)."""
    fake, target = service
    root = tmp_path / "repo"
    (root / "synth_hue" / "1").mkdir(parents=True)
    (root / "synth_hue" / "config.pbtxt").write_text("version_policy: { all { } }\n")
    references = tmp_path / "references"
    references.mkdir()
    for index in range(8):
        Image.fromarray(_image(10 * index)).save(references / f"r{index}.png")
    args = ["repair", str(image_files[0]), "-m", "synth_hue", "--version", "1"]
    args += ["-p", "procedural:operation=hue", "--repository", str(root), "--target", target]
    result = CliRunner().invoke(app, [*args, "--no-progress", "--reference", str(references)])
    assert result.exit_code == 0, result.output
    assert len(fake.requests[0].reference_images) == 8
    zero = CliRunner().invoke(
        app, [*args, "--no-progress", "--baseline", "zero", "--repository", str(tmp_path)]
    )
    assert zero.exit_code == 2  # no synth_hue folder there: refused before the graph
    assert len(fake.requests) == 1
    (root / "synth_hue" / "2").rename(root / "synth_hue" / "old2")
    zero = CliRunner().invoke(app, [*args, "--no-progress", "--baseline", "zero"])
    assert zero.exit_code == 0, zero.output
    assert fake.requests[1].baseline == graph_pb2.GRAPH_BASELINE_ZERO


def test_cli_repair_says_the_version_is_written_when_triton_cannot_load_it(
    service, image_files, tmp_path
):
    _, target = service
    root = tmp_path / "repo"
    (root / "synth_hue" / "1").mkdir(parents=True)
    (root / "synth_hue" / "config.pbtxt").write_text("version_policy: { all { } }\n")
    args = ["repair", str(image_files[0]), "-m", "synth_hue", "--version", "1", "--no-progress"]
    args += ["-p", "procedural:operation=hue", "--repository", str(root), "--target", target]
    result = CliRunner().invoke(app, [*args, "--triton-url", "http://127.0.0.1:1"])
    assert result.exit_code == 2
    assert (root / "synth_hue" / "2" / "propscope_ablation.json").is_file()
    assert "cannot reach Triton at http://127.0.0.1:1" in result.stderr
    assert "version 2 is written, not loaded: load it with curl -X POST " in result.stderr


def test_dot_of_an_empty_graph_says_nothing_was_kept():
    result = _result(1)
    empty = dataclasses.replace(
        result,
        nodes=tuple(dataclasses.replace(n, relevant=False) for n in result.nodes),
        edges=(),
    )
    assert 'image 0, class 1 (red): no node kept (relevant)"' in empty.to_dot()
    assert "no node kept" not in result.to_dot()


def test_models_lists_an_open_models_layers(service):
    _, target = service
    with Client(target) as client:
        models = {info.name: info for info in client.list_models()}
    assert [(x.name, x.channels) for x in models["synth_hue"].layers] == [
        ("features.1", 32),
        ("features.2", 64),
    ]
    assert models["blackbox"].layers == ()
    listed = CliRunner().invoke(app, ["models", "--target", target])
    assert "layers: features.1 (32), features.2 (64)" in " ".join(listed.stdout.split())


def test_cli_task_graph_rows_most_shared_first_and_excluded_images_named(service, image_files):
    _, target = service
    args = ["graph", *map(str, image_files), "-m", "synth_hue", "--target", target]
    out = CliRunner().invoke(app, [*args, "--no-progress"], env={"COLUMNS": "200"}).stdout
    assert "task graph of class 1 (red) over 2 images, min share 0.5 (image 2 excluded: " in out
    task = out[out.index("task graph of class") :].splitlines()
    rows = [line.split()[0] for line in task[3:5]]
    assert rows == ["features.1:3", "features.2:9"]  # share 1 each: the larger mean score first
