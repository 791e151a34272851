"""BuildGraph protobuf <-> domain: every refusal names its field, defaults are
GraphSpec's, events become the contract's messages field for field; and ListModels
shows an open model's layers and optional inputs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from propscope.v1 import explain_pb2 as pb
from propscope.v1 import graph_pb2 as gpb
from propscope_server import graph_domain as gd
from propscope_server.api.convert import model_info
from propscope_server.api.convert_graph import graph_event, graph_spec
from propscope_server.api.memory import estimate_bytes
from propscope_server.config import Limits, Settings
from propscope_server.errors import InvalidArgument
from propscope_server.inference import Layer, ModelDescription, RepositoryEntry, Tensor


def png(height: int = 8, width: int = 6, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = png()


def request(**fields: object) -> gpb.BuildGraphRequest:
    base = gpb.BuildGraphRequest(
        images=[IMAGE], model=pb.ModelRef(name="synth_hue"), layers=["features.1", "features.2"]
    )
    base.MergeFrom(gpb.BuildGraphRequest(**fields))
    return base


def refused(message: gpb.BuildGraphRequest, limits: Limits | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        graph_spec(message, limits or Limits())
    return info.value


def test_defaults_are_graph_spec_defaults_and_the_target_is_the_models():
    spec = graph_spec(request(), Limits())
    assert spec.images[0].shape == (8, 6, 3) and spec.images[0].dtype == np.uint8
    assert spec.layers == ("features.1", "features.2")
    assert (spec.steps, spec.alpha, spec.permutations, spec.baseline) == (10, 0.05, 1000, "mean")
    assert (spec.nodes_per_layer, spec.max_edges, spec.min_share, spec.bootstrap) == (
        16,
        32,
        0.5,
        1000,
    )
    assert spec.target is None and spec.repair_property is None and spec.request_id
    targeted = request(model=pb.ModelRef(name="synth_hue", target_class=2))
    assert graph_spec(targeted, Limits()).target == 2


def test_every_option_is_carried():
    spec = graph_spec(
        request(
            steps=4,
            alpha=0.1,
            permutations=200,
            min_probability_change=0.0,
            nodes_per_layer=3,
            max_edges=5,
            min_share=1.0,
            bootstrap=50,
            seed=9,
            baseline=gpb.GRAPH_BASELINE_ZERO,
            repair_property=pb.Property(
                name="hue",
                editor=pb.EditorIntervention(model="procedural", parameters={"operation": "hue"}),
            ),
            repair_max_share=0.5,
        ),
        Limits(),
    )
    assert (spec.steps, spec.alpha, spec.permutations, spec.min_probability_change) == (
        4,
        0.1,
        200,
        0.0,
    )
    assert (spec.nodes_per_layer, spec.max_edges, spec.min_share, spec.bootstrap) == (3, 5, 1.0, 50)
    assert (spec.seed, spec.baseline, spec.repair_max_share) == (9, "zero", 0.5)
    assert spec.repair_property.name == "hue"
    assert spec.repair_property.editor.parameters == {"operation": "hue"}


@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        ({"model": pb.ModelRef(name="")}, "model.name", "model.name is required"),
        ({"steps": 1}, "steps", "steps must be in 2..256"),
        ({"steps": 257}, "steps", "the limit max_steps is 256"),
        ({"alpha": 1.0}, "alpha", "alpha must be in (0, 1)"),
        ({"alpha": -0.1}, "alpha", "alpha must be in (0, 1)"),
        ({"alpha": float("nan")}, "alpha", "alpha must be in (0, 1)"),
        ({"permutations": 50}, "permutations", "permutations must be in 100..100000"),
        ({"alpha": 0.001, "permutations": 100}, "permutations", "raise permutations"),
        ({"min_probability_change": 1.5}, "min_probability_change", "in [0, 1]"),
        ({"min_share": 0.0}, "min_share", "min_share must be in (0, 1]"),
        ({"nodes_per_layer": 5000}, "nodes_per_layer", "nodes_per_layer must be in 1..4096"),
        ({"max_edges": 5000}, "max_edges", "max_edges must be in 1..4096"),
        ({"bootstrap": 100_001}, "bootstrap", "bootstrap must be in 1..100000"),
        ({"baseline": 7}, "baseline", "baseline 7 is not a known value"),
        (
            {"baseline": gpb.GRAPH_BASELINE_ZERO, "reference_images": [IMAGE] * 8},
            "reference_images",
            "apply to the mean baseline only",
        ),
        ({"reference_images": [IMAGE] * 7}, "reference_images", "needs 8..256"),
        ({"reference_images": [IMAGE] * 257}, "reference_images", "needs 8..256"),
        ({"repair_max_share": 0.1}, "repair_property", "repair_max_share needs repair_property"),
        (
            {
                "repair_property": pb.Property(name="h", editor=pb.EditorIntervention(model="e")),
                "repair_max_share": 0.6,
            },
            "repair_max_share",
            "repair_max_share must be in (0, 0.5]",
        ),
        (
            {"repair_property": pb.Property(name="h", provided_path=pb.ProvidedPath())},
            "repair_property.editor",
            "repair_property needs an editor",
        ),
        (
            {
                "repair_property": pb.Property(
                    name="h",
                    editor=pb.EditorIntervention(model="e"),
                    region=pb.Region(box=pb.Box(right=1, bottom=1)),
                )
            },
            "repair_property.region",
            "region is not supported",
        ),
        (
            {"repair_property": pb.Property(name="h", editor=pb.EditorIntervention())},
            "repair_property.editor.model",
            "editor.model is required",
        ),
        ({"layers": ["features.1", "features.1"]}, "layers[1]", "named twice"),
        ({"layers": [""]}, "layers[0]", "is empty"),
        ({"images": [b"not an image"]}, "images[1]", "could not be decoded"),
        (
            {"reference_images": [IMAGE] * 7 + [b"\x89PNG broken"]},
            "reference_images[7]",
            "could not be decoded",
        ),
    ],
)
def test_refusals_name_the_field(fields, field, needle):
    message = request()
    if "layers" in fields:
        del message.layers[:]
    if "model" in fields:
        message.ClearField("model")
    message.MergeFrom(gpb.BuildGraphRequest(**fields))
    error = refused(message)
    assert error.field == field
    assert needle in str(error)


def test_image_count_is_bounded_by_the_limit_it_names():
    empty = request()
    del empty.images[:]
    error = refused(empty)
    assert error.field == "images" and "send 1..64" in str(error)
    error = refused(request(images=[IMAGE] * 3), Limits(max_graph_images=3))
    assert error.field == "images" and "max_graph_images" in str(error)


def test_images_are_decoded_with_explains_limits():
    error = refused(request(images=[png(20, 20)]), Limits(max_image_pixels=399))
    assert error.field == "images[1]" and "max_image_pixels is 399" in str(error)


def test_events_become_their_messages_field_for_field():
    accepted = graph_event(
        "r",
        gd.GraphAccepted(
            model="m",
            model_version="1",
            layers=(Layer("features.1", 32),),
            steps=4,
            images=2,
            targets=(3, 3),
            target_labels=("a", "a"),
            baseline_source=gd.BASELINE_CONFIG,
            planned_passes=99,
            warnings=("w",),
        ),
    )
    assert accepted.request_id == "r" and accepted.WhichOneof("event") == "accepted"
    assert accepted.accepted.layers[0].name == "features.1"
    assert accepted.accepted.layers[0].channels == 32
    assert list(accepted.accepted.targets) == [3, 3] and accepted.accepted.planned_passes == 99
    node = gd.NodeResult(
        0, "features.1", 7, False, 0.0, 0.2, 0.01, 0.02, -0.4, True, True, (1, 0.6)
    )
    message = graph_event("r", node).node
    assert (message.layer, message.channel, message.probability_change) == ("features.1", 7, -0.4)
    assert message.significant and message.relevant and list(message.curve) == [1.0, 0.6]
    edge = gd.EdgeResult(
        1, "a", 1, "b", 2, 0.5, 0.3, 0.1, 0.02, 0.04, True, False, (0, 0.3), (1, 0.7)
    )
    message = graph_event("r", edge).edge
    assert (message.image, message.target_channel, message.path_effect) == (1, 2, 0.3)
    assert message.significant and not message.relevant
    assert list(message.clamped_curve) == [1.0, 0.7]
    task = gd.TaskGraph(3, "cat", (0, 1), (gd.TaskNode("a", 1, 1.0, 0.9, 0.2),), (), 0.5, (2,))
    message = graph_event("r", task).task_graph
    assert message.nodes[0].bootstrap_frequency == 0.9 and list(message.excluded_images) == [2]
    repair = gd.Repair("hue", (gd.RepairChannel("a", 1, 0.25, 3.0, 0.2),), ("w",))
    message = graph_event("r", repair).repair
    assert message.channels[0].value == 0.25 and message.property == "hue"
    done = graph_event("r", gd.GraphDone(total_s=1.5, passes=12, warnings=("image 0: w",))).done
    assert (done.total_ms, done.passes, list(done.warnings)) == (1500.0, 12, ["image 0: w"])
    progress = graph_event("r", gd.GraphProgress(done=3, total=9)).progress
    assert (progress.passes_done, progress.passes_total) == (3, 9)


def test_list_models_shows_layers_and_optional_inputs():
    description = ModelDescription(
        name="open",
        version="1",
        versions=("1",),
        role="classifier",
        inputs=(
            Tensor("IMAGE", "UINT8", [32, 32, 3]),
            Tensor("INTERVENE_LAYER", "INT32", [1], optional=True),
        ),
        outputs=(Tensor("LOGITS", "FP32", [3]),),
        max_batch_size=8,
        layers=(Layer("features.0", 16), Layer("features.1", 32)),
    )
    info = model_info(RepositoryEntry("open", "1", "READY"), description)
    assert [(layer.name, layer.channels) for layer in info.layers] == [
        ("features.0", 16),
        ("features.1", 32),
    ]
    assert [tensor.optional for tensor in info.inputs] == [False, True]


def test_the_memory_estimate_grows_with_images_and_references():
    settings = Settings()
    one = estimate_bytes(request(images=[png(64, 64)]), settings)
    two = estimate_bytes(request(images=[png(64, 64)] * 2), settings)
    referenced = estimate_bytes(request(reference_images=[png(64, 64)] * 8), settings)
    assert one < two < referenced
    assert estimate_bytes(gpb.BuildGraphRequest(images=[b"junk"]), settings) < one
