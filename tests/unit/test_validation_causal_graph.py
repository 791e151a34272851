"""The causal-graph table's pure pieces: the in-process reference of a served model, the
graph's ranking, the rank statistics and the repair's random comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import propscope
from propscope_dev.validation import causal_graph as vg
from propscope_server.triton_models.classifiers.cnn import load_classifier, normalise_uint8_hwc
from propscope_server.triton_models.classifiers.open_model import OpenModel


@pytest.fixture(scope="module")
def reference() -> vg.Reference:
    return vg.Reference("synth_patch")


@pytest.fixture(scope="module")
def images(reference) -> tuple[np.ndarray, np.ndarray]:
    return vg.own_images(reference, 6)


def node(layer: str, channel: int, score: float, significant: bool, screened_out: bool = False):
    return propscope.GraphNode(
        image=0,
        layer=layer,
        channel=channel,
        screened_out=screened_out,
        prescreen_change=0.0,
        score=0.0 if screened_out else score,
        p_value=0.001 if significant else 0.5,
        q_value=0.01 if significant else 0.6,
        probability_change=-score,
        significant=significant,
        relevant=False,
        curve=(),
    )


def graph(nodes, repair=None) -> propscope.GraphResult:
    return propscope.GraphResult(
        request_id="r",
        model="synth_patch",
        model_version="1",
        layers=(),
        steps=10,
        images=1,
        targets=(1,),
        target_labels=("square",),
        baseline_source="config",
        planned_passes=0,
        warnings=(),
        nodes=tuple(nodes),
        edges=(),
        task_graph=None,
        repair=repair,
        passes=0,
        total_ms=0.0,
    )


def test_the_reference_without_ablation_is_the_served_network(reference, images):
    weights = vg.DEFAULT_MODEL_REPOSITORY.parent / "weights" / "patch_biased.pt"
    with torch.inference_mode():
        plain = load_classifier(weights)(normalise_uint8_hwc(images[0])).numpy()
    assert np.array_equal(reference.logits(images[0]), plain.astype(np.float64))
    nothing = np.zeros(reference.total_channels)
    assert np.array_equal(reference.logits(images[0], nothing), plain.astype(np.float64))


def test_a_channel_set_to_its_mean_reads_as_its_mean(reference, images):
    flat = reference.flat("features.1", 5)
    assert reference.key(flat) == "features.1:5" and flat == 16 + 5
    mask = np.zeros(reference.total_channels)
    mask[flat] = 1
    kept = []
    handle = reference.network.features[1].register_forward_hook(
        lambda module, args, output: kept.append(output)
    )
    try:
        reference.logits(images[0][:1], mask)
    finally:
        handle.remove()
    # The hook that records runs after the reference's own, so it sees the ablated map.
    assert torch.allclose(kept[0][0, 5], reference.means[flat].expand_as(kept[0][0, 5]))


def test_grad_x_activation_is_the_served_models_output(reference, images):
    """The reference's Grad x Activation is OpenModel's GRAD_X_ACTIVATION (what Triton
    serves), and the baseline-aware one differs by mean x CHANNEL_GRADIENTS."""
    image = images[0][0]
    served = OpenModel(
        load_classifier(vg.DEFAULT_MODEL_REPOSITORY.parent / "weights" / "patch_biased.pt"),
        reference.layers,
        torch.zeros(1, 3, 64, 64),
    )(
        normalise_uint8_hwc(image[None]),
        {"GRADIENT_CLASS": np.array([[1]], dtype=np.int32)},
        ["GRAD_X_ACTIVATION", "CHANNEL_GRADIENTS"],
    )
    plain = reference.grad_x_activation(image, 1)
    delta = reference.grad_x_activation(image, 1, from_mean=True)
    assert np.allclose(plain, served["GRAD_X_ACTIVATION"][0], rtol=1e-5, atol=1e-6)
    expected = reference.means.numpy() * served["CHANNEL_GRADIENTS"][0]
    assert np.allclose(plain - delta, expected, rtol=1e-4, atol=1e-5)


def test_the_graph_ranks_significant_nodes_first_then_tested_then_screened(reference):
    result = graph(
        [
            node("features.0", 0, 0.9, False),
            node("features.0", 1, 0.2, True),
            node("features.0", 2, 0.5, True),
            node("features.2", 3, 0.0, False, screened_out=True),
        ]
    )
    nodes = vg.node_scores(result, reference)
    order = vg.graph_ranking(nodes)
    assert list(order[:3]) == [2, 1, 0]
    assert nodes["tested"].sum() == 3 and nodes["significant"].sum() == 2
    assert nodes["score"][reference.flat("features.2", 3)] == 0.0


def test_rank_statistics():
    assert vg.jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert vg.spearman(np.zeros(4), np.zeros(4)) == 1.0
    assert vg.spearman(np.zeros(4), np.arange(4.0)) == 0.0
    assert vg.spearman(np.arange(5.0), np.arange(5.0) ** 2) == pytest.approx(1.0)
    assert vg.paired_greater(np.ones(20), np.ones(20)) == 1.0
    rng = np.random.default_rng(0)
    low = rng.random(30)
    assert vg.paired_greater(low + 1, low) < 1e-6
    assert vg.paired_greater(low, low + 1) > 0.99


def test_a_repair_without_channels_draws_no_random_channels(reference):
    sets = vg.shortcut_sets("synth_patch", 12)
    empty = propscope.RepairResult(property="patch", channels=(), warnings=("nothing",))
    found = vg.repair(graph([], empty), reference, sets, random_draws=3)
    assert found.channels == 0 and found.random == [] and found.warnings == ["nothing"]
    assert found.before == found.after and found.before.shortcut_rate == 1.0
    chosen = propscope.RepairChannel(
        layer="features.0", channel=7, value=0.1, movement=2.0, score=0.1
    )
    repaired = vg.repair(
        graph([], propscope.RepairResult("patch", (chosen,), ())), reference, sets, 3
    )
    assert repaired.after.channels == ["features.0:7"] and len(repaired.random) == 3
    assert all(len(draw.channels) == 1 for draw in repaired.random)


def test_block_effects_collapse_a_serial_network(reference, images):
    effects = vg.block_effects(reference, *images)
    assert [e.layer for e in effects] == ["features.0", "features.1", "features.2"]
    # A confident model made constant: KL at least about ln 2 on balanced images.
    assert all(e.mean_kl > 0.6 and e.square_share in (0.0, 1.0) for e in effects)


def test_the_dead_channels_are_silent_on_the_models_own_images(reference, images):
    dead = reference.dead_channels()
    assert len(dead) == 13 and all(reference.key(int(c)).startswith("features.2:") for c in dead)
    largest = reference.largest_activation(images[0])
    assert largest.shape == (6, 112)
    assert np.all(largest[:, dead] == 0.0) and np.all(largest.max(axis=0)[:16] > 0)
