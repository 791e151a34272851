"""The causal graph method on a tiny known network: a numpy fake that implements the
open-model contract (interventions, patches, channel means, activations) for

    x = image mean per colour / 255                      [3]
    h1 = relu(W1 x + b1)      4 channels; channel 3 has no outgoing weight
    h2 = relu(W2 h1 + b2)     3 channels; channel 0 is the only path to the output
    logits = W3 h2 + b3       2 classes

so the truth is known: h1.0 -> h2.0 -> output carries everything, the rest nothing."""

from __future__ import annotations

import asyncio
import dataclasses
from contextlib import aclosing

import numpy as np
import pytest

from propscope_server.config import PreprocessingConfig, Settings
from propscope_server.domain import ClassifierRef, EditorRef, PropertySpec
from propscope_server.editor_contract import EditorSchema
from propscope_server.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from propscope_server.graph_domain import (
    EdgeResult,
    GraphAccepted,
    GraphDone,
    GraphProgress,
    GraphSpec,
    NodeResult,
    Repair,
    TaskGraph,
)
from propscope_server.inference import Layer, ModelDescription, Tensor
from propscope_server.methods.causal_graph import CausalGraph
from propscope_server.orchestration.runner import run_method
from propscope_server.scoring import causal_graph as scoring

W1 = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
B1 = np.array([0.0, 0.5, 0.5, 0.5])
W2 = np.array([[2.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])  # column 3: h1.3 goes nowhere
B2 = np.zeros(3)
W3 = np.array([[1.0, 0, 0], [-1.0, 0, 0]])  # only h2.0 reaches the output
B3 = np.array([-0.5, 0.0])
LAYERS = (Layer("h1", 4), Layer("h2", 3))
OPTIONAL = [
    Tensor("INTERVENE_LAYER", "INT32", [1], True),
    Tensor("INTERVENE_CHANNEL", "INT32", [1], True),
    Tensor("INTERVENE_STRENGTH", "FP32", [1], True),
    Tensor("INTERVENE_BASELINE", "FP32", [1], True),
    Tensor("PATCH_LAYER", "INT32", [1], True),
    Tensor("PATCH_CHANNEL", "INT32", [1], True),
    Tensor("PATCH_VALUE", "FP32", [-1], True),
    Tensor("ACTIVATION_LAYER", "INT32", [1], True),
]
OPEN = ModelDescription(
    name="tiny",
    version="1",
    versions=("1",),
    role="classifier",
    inputs=(Tensor("IMAGE", "UINT8", [8, 8, 3]), *OPTIONAL),
    outputs=(
        Tensor("LOGITS", "FP32", [2]),
        Tensor("CHANNEL_MEANS", "FP32", [7]),
        Tensor("ACTIVATIONS", "FP32", [-1]),
    ),
    max_batch_size=4,
    parameters={"propscope.capabilities": "activations,interventions,gradients"},
    preprocessing=PreprocessingConfig(output_kind="logits"),
    layers=LAYERS,
    channel_means={"h1": (0.5, 1.0, 1.0, 1.5), "h2": (1.0, 1.0, 1.0)},
)
EDITOR = ModelDescription(
    name="tint",
    version="1",
    versions=("1",),
    role="editor",
    inputs=(),
    outputs=(),
    max_batch_size=0,
    editor_schema=EditorSchema(),
)


class FakeOpenModel:
    """The open-model contract in numpy; counts every forward pass (row)."""

    def __init__(self, model: ModelDescription = OPEN) -> None:
        self.model = model
        self.passes = 0

    async def describe(self, name, version="", deadline=None):
        return EDITOR if name == "tint" else self.model

    async def require_ready(self, model, deadline):
        return None

    async def infer(self, model, inputs, outputs, deadline):
        images = inputs["IMAGE"]
        rows = len(images)
        assert rows <= model.max_batch_size
        for group in ("INTERVENE_", "PATCH_"):
            present = [n for n in inputs if n.startswith(group)]
            assert len(present) in (0, 4 if group == "INTERVENE_" else 3), present
        self.passes += rows
        x = images.astype(np.float64).mean(axis=(1, 2)) / 255.0
        activations = []
        a = x
        for index, (w, b) in enumerate(((W1, B1), (W2, B2))):
            a = np.maximum(a @ w.T + b, 0.0)
            if "INTERVENE_LAYER" in inputs:
                for r in np.flatnonzero(inputs["INTERVENE_LAYER"][:, 0] == index):
                    c = inputs["INTERVENE_CHANNEL"][r, 0]
                    t = inputs["INTERVENE_STRENGTH"][r, 0]
                    a[r, c] = (1 - t) * a[r, c] + t * inputs["INTERVENE_BASELINE"][r, 0]
            if "PATCH_LAYER" in inputs:
                for r in np.flatnonzero(inputs["PATCH_LAYER"][:, 0] == index):
                    assert inputs["PATCH_VALUE"].shape[1] == 1  # H * W of a [B, C] layer
                    a[r, inputs["PATCH_CHANNEL"][r, 0]] = inputs["PATCH_VALUE"][r, 0]
            activations.append(a)
        answer = {"LOGITS": (a @ W3.T + B3).astype(np.float32)}
        if "CHANNEL_MEANS" in outputs:
            answer["CHANNEL_MEANS"] = np.concatenate(activations, axis=1).astype(np.float32)
        if "ACTIVATIONS" in outputs:
            layers = set(inputs["ACTIVATION_LAYER"][:, 0].tolist())
            assert len(layers) == 1
            answer["ACTIVATIONS"] = activations[layers.pop()].astype(np.float32)
        return {name: answer[name] for name in outputs}

    async def edit(self, editor, image, strengths, parameters, seeds, deadline, progress=None):
        """Raises blue a lot and red a little along the path."""
        path = np.repeat(image[None, None].astype(np.float64), len(strengths), axis=1)
        path[..., 2] += 120 * strengths[None, :, None, None]
        path[..., 0] += 10 * strengths[None, :, None, None]
        return np.clip(path, 0, 255).astype(np.uint8)


def image(red: int, green: int = 100, blue: int = 100) -> np.ndarray:
    pixels = np.empty((8, 8, 3), np.uint8)
    pixels[...] = (red, green, blue)
    return pixels


def spec(**changes) -> GraphSpec:
    values = dict(
        request_id="r",
        images=(image(128),),
        classifier=ClassifierRef("tiny"),
        baseline="zero",
        permutations=200,
        bootstrap=200,
    )
    values.update(changes)
    return GraphSpec(**values)


def run(graph_spec: GraphSpec, fake: FakeOpenModel | None = None) -> tuple[list, FakeOpenModel]:
    fake = fake or FakeOpenModel()

    async def collect():
        method = CausalGraph(fake, Settings())
        async with aclosing(run_method(method, "causal_graph", graph_spec, None)) as events:
            return [event async for event in events]

    return asyncio.run(collect()), fake


def node(events, layer, channel, image_index=0) -> NodeResult:
    (found,) = [
        e
        for e in events
        if isinstance(e, NodeResult)
        and (e.image, e.layer, e.channel) == (image_index, layer, channel)
    ]
    return found


def test_the_causal_channels_are_significant_and_the_dead_ones_never():
    events, _ = run(spec())
    assert isinstance(events[0], GraphAccepted) and isinstance(events[-1], GraphDone)
    assert events[0].targets == (0,) and events[0].baseline_source == "zero"
    assert node(events, "h1", 0).significant and node(events, "h1", 0).relevant
    assert node(events, "h2", 0).significant
    for layer, channel in (("h1", 1), ("h1", 2), ("h1", 3), ("h2", 1), ("h2", 2)):
        result = node(events, layer, channel)
        assert not result.significant and result.p_value == 1.0
        assert np.ptp(result.curve) == 0.0  # no path to the output: p never moves
    zero_outgoing = node(events, "h1", 3)
    assert zero_outgoing.probability_change == 0.0 and zero_outgoing.score == 0.0
    causal = node(events, "h1", 0)
    assert causal.probability_change < -0.05 and len(causal.curve) == 11
    assert np.all(np.diff(causal.curve) < 0)  # toward the zero baseline, p falls steadily


def test_the_edge_through_the_only_path_is_significant_and_its_clamped_curve_flat():
    events, _ = run(spec())
    edges = [e for e in events if isinstance(e, EdgeResult)]
    assert [
        (e.source_layer, e.source_channel, e.target_layer, e.target_channel) for e in edges
    ] == [("h1", 0, "h2", 0)]
    (edge,) = edges
    assert edge.significant and edge.q_value < 0.05
    assert np.ptp(edge.clamped_curve) == pytest.approx(0.0, abs=1e-7)
    assert edge.direct_effect == pytest.approx(-2 * 128 / 255, rel=1e-5)  # h2.0 = 2 h1.0 -> 0
    causal = node(events, "h1", 0)
    assert edge.path_effect == pytest.approx(causal.curve[-1] - causal.curve[0], abs=1e-6)


def test_q_values_are_benjamini_hochberg_of_the_image_nodes():
    events, _ = run(spec())
    nodes = [e for e in events if isinstance(e, NodeResult) and not e.screened_out]
    expected = scoring.q_values(np.array([n.p_value for n in nodes]))
    assert [n.q_value for n in nodes] == pytest.approx(expected.tolist())
    assert nodes[0].q_value > nodes[0].p_value  # 7 tests: the smallest p is adjusted up


def test_pass_counts_equal_the_formula():
    for changes, screened in (({}, False), ({"nodes_per_layer": 2, "steps": 6}, True)):
        events, fake = run(spec(max_edges=1, **changes))
        steps = changes.get("steps", 10)
        nodes = changes.get("nodes_per_layer", 16)
        per_image = scoring.image_passes([4, 3], nodes, steps, edges=1, edge_layers=1)
        expected = (1 + 4 + 3 + 2 * (steps - 1) * 2 + steps + 1) if screened else None
        assert expected is None or per_image == expected
        assert fake.passes == per_image == events[-1].passes
        assert events[0].planned_passes == per_image  # one edge possible, one found
        progress = [e for e in events if isinstance(e, GraphProgress)]
        assert progress[-1].done == fake.passes and progress[-1].total == per_image
    # More possible edges than found: the plan states the bound, the count the truth.
    events, fake = run(spec(images=(image(128), image(200))))
    assert fake.passes == 2 * scoring.image_passes([4, 3], 16, 10, 1, 1) == events[-1].passes
    assert events[0].planned_passes == 2 * scoring.image_passes([4, 3], 16, 10, 12, 1)


def test_the_prescreen_keeps_the_channels_that_move_p_most():
    events, _ = run(spec(nodes_per_layer=2, steps=6))
    h1 = [e for e in events if isinstance(e, NodeResult) and e.layer == "h1"]
    # h1.0 moves p; the others tie at 0 and the lower channel goes on.
    assert [e.screened_out for e in h1] == [False, False, True, True]
    assert h1[0].prescreen_change > 0.05 and h1[0].significant
    # t = 1 is the pre-screen's full ablation, reused: the curve is whole.
    assert len(h1[0].curve) == 7
    assert h1[0].curve[-1] - h1[0].curve[0] == pytest.approx(-h1[0].prescreen_change)
    assert h1[2].curve == () and h1[2].probability_change == 0.0


def test_a_task_graph_keeps_the_shared_nodes_with_seeded_bootstrap_frequencies():
    images = (image(128), image(200), image(160), image(20))  # the last is class 1
    first, _ = run(spec(images=images, seed=3))
    again, _ = run(spec(images=images, seed=3))
    (task,) = [e for e in first if isinstance(e, TaskGraph)]
    assert task == next(e for e in again if isinstance(e, TaskGraph))
    assert task.target_class == 0 and task.images == (0, 1, 2) and task.excluded_images == (3,)
    assert {(n.layer, n.channel) for n in task.nodes} == {("h1", 0), ("h2", 0)}
    assert all(n.share == 1.0 and n.bootstrap_frequency == 1.0 for n in task.nodes)
    assert [
        (e.source_layer, e.source_channel, e.target_layer, e.target_channel) for e in task.edges
    ] == [("h1", 0, "h2", 0)]
    single, _ = run(spec())
    assert not any(isinstance(e, TaskGraph) for e in single)


def test_the_repair_ablates_significant_channels_only_with_their_baseline():
    repair_property = PropertySpec("blueness", editor=EditorRef("tint"))
    images = (image(128), image(200), image(160))
    events, fake = run(
        spec(images=images, baseline="mean", repair_property=repair_property, max_edges=1)
    )
    (repair,) = [e for e in events if isinstance(e, Repair)]
    assert repair.property == "blueness" and len(repair.channels) == 1  # floor(0.05 * 7) -> 1
    (channel,) = repair.channels
    assert (channel.layer, channel.channel) in {("h1", 0), ("h2", 0)}  # blue moves h1.2 most
    assert channel.value == OPEN.channel_means[channel.layer][channel.channel]
    assert channel.movement > 0
    # An edge (max_edges 1) joins relevant nodes only: image(128)'s h1.0 (128 / 255) sits at
    # its mean baseline 0.5, so moving it changes p by 0.001 (significant, not relevant).
    edges = [sum(isinstance(e, EdgeResult) and e.image == i for e in events) for i in range(3)]
    assert edges == [0, 1, 1]
    done = sum(scoring.image_passes([4, 3], 16, 10, n, n) + 10 for n in edges)
    assert fake.passes == done == events[-1].passes
    assert done < events[0].planned_passes == 3 * (scoring.image_passes([4, 3], 16, 10, 1, 1) + 10)


@pytest.mark.parametrize(
    ("changes", "error", "named"),
    [
        ({"layers": ("h1", "conv9")}, InvalidArgument, "h1, h2"),
        ({"steps": 1}, InvalidArgument, "steps"),
        ({"baseline": "median"}, InvalidArgument, "baseline"),
        ({"alpha": 0.0}, InvalidArgument, "alpha"),
        ({"reference_images": (image(1),) * 3}, InvalidArgument, "reference_images"),
        ({"images": (image(1),) * 65}, InvalidArgument, "max_graph_images"),
        ({"steps": 200, "images": (image(1),) * 20}, ResourceExhausted, "max_graph_passes"),
        ({"min_share": 0.0}, InvalidArgument, "min_share"),
        ({"repair_property": PropertySpec("x")}, InvalidArgument, "repair_property"),
        # The API's ranges (graph.proto), not looser ones of the method's own.
        ({"repair_max_share": 0.6}, InvalidArgument, "repair_max_share"),
        ({"nodes_per_layer": 4097}, InvalidArgument, "nodes_per_layer"),
        ({"max_edges": 0}, InvalidArgument, "max_edges"),
        ({"reference_images": (image(1),) * 8}, InvalidArgument, "mean baseline only"),
    ],
)
def test_bad_requests_are_refused_before_any_pass_naming_the_field(changes, error, named):
    fake = FakeOpenModel()
    with pytest.raises(error, match=named):
        run(spec(**changes), fake)
    assert fake.passes == 0


def test_a_mean_baseline_needs_config_means_or_reference_images():
    bare = dataclasses.replace(OPEN, channel_means={"h1": (0.5, 1.0, 1.0, 1.5)})
    with pytest.raises(InvalidArgument, match="h2.*reference_images") as caught:
        run(spec(baseline="mean"), FakeOpenModel(bare))
    assert caught.value.field == "reference_images"
    references = tuple(image(50 + 10 * k) for k in range(8))
    events, fake = run(spec(baseline="mean", reference_images=references), FakeOpenModel(bare))
    assert events[0].baseline_source == "reference_images"
    assert fake.passes == events[-1].passes == 8 + scoring.image_passes([4, 3], 16, 10, 1, 1)
    events, _ = run(spec(baseline="mean", layers=("h1",)), FakeOpenModel(bare))
    assert events[0].baseline_source == "config" and events[0].layers == (Layer("h1", 4),)


def test_a_black_box_model_is_refused_naming_the_missing_capability():
    black_box = dataclasses.replace(OPEN, parameters={})
    with pytest.raises(FailedPrecondition, match="activations, interventions"):
        run(spec(), FakeOpenModel(black_box))


@pytest.mark.parametrize(
    ("changes", "error", "named"),
    [
        ({"parameters": {}}, FailedPrecondition, "activations, interventions"),
        ({}, InvalidArgument, "no layer 'conv9'"),
    ],
)
def test_a_model_without_a_declared_output_kind_is_refused_before_any_pass(changes, error, named):
    # Its output kind is detected by a forward pass: the model's refusals come first.
    undeclared = dataclasses.replace(OPEN, preprocessing=PreprocessingConfig(), **changes)
    fake = FakeOpenModel(undeclared)
    with pytest.raises(error, match=named):
        run(spec(layers=("h1", "conv9")), fake)
    assert fake.passes == 0


def test_the_output_kind_detection_pass_is_counted_in_the_plan_and_the_result():
    # Triton counts the pass that detects an undeclared output kind; so does the result.
    undeclared = dataclasses.replace(OPEN, preprocessing=PreprocessingConfig())
    events, fake = run(spec(max_edges=1), FakeOpenModel(undeclared))
    per_image = scoring.image_passes([4, 3], 16, 10, edges=1, edge_layers=1)
    assert fake.passes == 1 + per_image == events[-1].passes
    assert events[0].planned_passes == 1 + per_image
    progress = [e for e in events if isinstance(e, GraphProgress)]
    assert progress[-1].done == fake.passes and progress[-1].total == fake.passes


# --- the scoring functions, numerically ---


def test_q_values_match_a_hand_computed_benjamini_hochberg():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 -> p * m / rank = 0.04, 0.06, 0.0533, 0.5, then the
    # running minimum from the top: 0.04, 0.0533, 0.0533, 0.5
    assert scoring.q_values(p) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert scoring.q_values(np.array([])).size == 0


def test_a_flat_curve_scores_zero_with_p_one_and_a_ramp_is_significant():
    rng = np.random.default_rng(0)
    scores, p = scoring.score_curves(
        np.array([np.full(11, 0.3), np.linspace(0.9, 0.5, 11)]), 999, rng
    )
    assert scores[0] == 0.0 and p[0] == 1.0
    assert scores[1] == pytest.approx(0.04) and p[1] == pytest.approx(1 / 1000)


def test_prescreen_edges_majority_and_repair_choice():
    assert scoring.prescreen(np.array([0.1, -0.5, 0.0, 0.3]), 2).tolist() == [1, 3]
    assert scoring.prescreen(np.array([0.0, 0.0, 0.0]), 2).tolist() == [0, 1]
    assert scoring.choose_edges(np.array([0.1, -0.9, 0.1, 0.5]), 3).tolist() == [1, 3, 0]
    assert scoring.majority_class([2, 1, 2, 1]) == 1
    movement = np.array([5.0, 1.0, 3.0, 2.0])
    candidates = np.array([False, True, True, True])
    assert scoring.repair_choice(movement, candidates, 0.5, 4).tolist() == [2, 3]
    assert scoring.repair_choice(movement, candidates, 0.01, 4).tolist() == [2]


def test_task_shares_and_bootstrap_frequency():
    significant = np.array([[True, True], [True, False], [True, False], [False, False]])
    scores = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 1.0], [7.0, 1.0]])
    share, frequency, mean_score = scoring.task_shares(
        significant, scores, 0.5, 4000, np.random.default_rng(1)
    )
    assert share.tolist() == [0.75, 0.25]
    assert mean_score.tolist() == [4.0, pytest.approx(4 / 3)]
    # P(at least 2 of 4 draws hit the 3 of 4 significant images) = 1 - (1/4)^4 - 4 (3/4)(1/4)^3
    assert frequency[0] == pytest.approx(1 - 0.25**4 - 4 * 0.75 * 0.25**3, abs=0.02)
    assert frequency[1] == pytest.approx(1 - 0.75**4 - 4 * 0.25 * 0.75**3, abs=0.02)


def test_movements_are_in_units_of_their_layers_scale():
    # Two layers: channels 0-1 (clean RMS 2) and channel 2 (RMS 10). Channel 1 never
    # varies over the clean images: its movement stays in its layer's units, not / 0.
    clean = np.array([[2.0, 2.0, 10.0], [2.0, 2.0, 10.0]])
    path = clean[:, None, :] + np.array([[[1.0, 0.5, 5.0], [2.0, 0.25, 2.0]]] * 2)
    moved = scoring.movements(path, clean, (0, 2, 3))
    scale = 2.0 + scoring.MOVEMENT_EPS
    assert moved.tolist() == pytest.approx([2.0 / scale, 0.5 / scale, 5.0 / 10.0])


def test_a_path_too_short_to_reach_alpha_is_refused_naming_the_fewest_steps():
    # 5 points: of the 120 orders of the best curve, 8 are as extreme; no curve does better.
    assert scoring.best_p_value(4, 1000) == pytest.approx(8 / 120)
    assert scoring.best_p_value(5, 1000) < 0.05 <= scoring.best_p_value(4, 100_000)
    assert scoring.best_p_value(20, 200) == 1 / 201
    assert scoring.fewest_reachable_steps(1000, 0.05, 256) == 5
    assert scoring.fewest_reachable_steps(1000, 0.01, 256) == 6
    assert scoring.fewest_reachable_steps(100, 0.005, 256) is None  # 1 / 101 > 0.005
    fake = FakeOpenModel()
    with pytest.raises(InvalidArgument, match=r"steps is 4.*p = 0\.0667.*steps >= 5") as caught:
        run(spec(steps=4, permutations=1000), fake)
    assert caught.value.field == "steps" and fake.passes == 0
    assert "(>= 6 for a straight-line curve to reach it)" in str(caught.value)
    with pytest.raises(InvalidArgument, match="steps >= 6"):
        run(spec(steps=5, alpha=0.01, permutations=1000), fake)
    assert scoring.best_p_value(5, 1000, line=True) == pytest.approx(0.0611, abs=1e-4)
    events, _ = run(spec(steps=6, permutations=1000))  # h1.0's curve is near a line
    assert node(events, "h1", 0).significant
    assert not events[0].warnings


def test_a_path_on_which_a_straight_line_cannot_reach_alpha_runs_and_says_so():
    """steps 5 at alpha 0.05: an S-shaped curve can reach it (p = 0.022), a line cannot
    (p = 0.061); near-linear channels would come out not significant without a word."""
    events, _ = run(spec(steps=5, permutations=1000))
    (warning,) = events[0].warnings
    assert "straight-line curve of 6 points gets at best p = 0.0611" in warning
    assert "steps >= 6 let a straight line reach it" in warning


def test_an_edge_is_relevant_only_with_a_path_effect_of_a_tenth_of_min_probability_change():
    events, _ = run(spec(images=(image(200),)))
    (edge,) = [e for e in events if isinstance(e, EdgeResult)]
    assert edge.significant and edge.relevant and abs(edge.path_effect) > 0.1
    events, _ = run(spec(images=(image(200),), min_probability_change=0.01))
    (edge,) = [e for e in events if isinstance(e, EdgeResult)]
    assert edge.relevant
    # Above |path_effect| / 0.1 the same significant edge is no longer relevant, and its nodes
    # (|dp| = |path_effect| here: h2.0 carries everything) are not kept, so no edge is tried.
    events, _ = run(spec(images=(image(200),), min_probability_change=0.99))
    assert not [e for e in events if isinstance(e, EdgeResult)]
    assert node(events, "h1", 0).significant and not node(events, "h1", 0).relevant


class SaturatedModel(FakeOpenModel):
    """The tiny network with 20 added to class 0's float32 logit: p0 = 1 - e^-21.5
    (4.6e-10), so h1.0's full ablation moves p by ~3e-9, as on synth_hue's own images
    (1 - 8.6e-12, largest change 4e-9; the score must stay above the permutation test's
    TIE_TOLERANCE 1e-12 to be told from a flat curve)."""

    async def infer(self, model, inputs, outputs, deadline):
        answer = await super().infer(model, inputs, outputs, deadline)
        answer["LOGITS"] = answer["LOGITS"] + np.float32([20.0, 0.0])
        return answer


def test_a_saturated_image_is_ranked_in_float64_and_warned_that_nothing_is_relevant():
    events, _ = run(spec(), SaturatedModel())
    causal = node(events, "h1", 0)
    # float64 softmax of the float32 logits: a float32 softmax gives p == 1.0 exactly and
    # a flat curve (p_value 1), so the ranking would vanish too.
    expected = np.exp(-21.5) - np.exp(-19.5)
    assert causal.curve[0] < 1.0
    assert causal.probability_change == pytest.approx(expected, rel=1e-2)
    assert causal.significant and not causal.relevant
    assert not any(isinstance(e, EdgeResult) for e in events)
    (warning,) = events[-1].warnings
    assert warning.startswith("image 0: the target probability is 1 - 4.6e-10;")
    assert "largest 2.9e-09), so no node is relevant (2 of 7 significant)" in warning
    assert "lower min_probability_change or explain less confident images" in warning


def test_an_image_whose_channels_move_p_enough_has_no_warning():
    events, _ = run(spec())
    assert events[-1].warnings == ()


def test_saturation_warning_wording():
    assert scoring.saturation_warning(0, 0.6, 0.05, 0.05, 1, 4) is None
    at_one = scoring.saturation_warning(2, 1.0, 0.0, 0.05, 0, 4)
    assert at_one is not None and at_one.startswith("image 2: the target probability is 1 to")
    # Nothing significant (below the test's ties): lowering the floor would not help.
    assert at_one.endswith(
        "nothing is significant either, so even the scores rank noise; "
        "explain less confident images"
    )
    # Not saturated, just robust: lowering the floor is the only fix named.
    robust = scoring.saturation_warning(1, 0.5, 0.01, 0.05, 3, 4)
    assert robust is not None and robust.endswith("lower min_probability_change")
    assert scoring.saturation_warning(0, 0.999, 0.0, 0.0, 0, 4) is None
