"""The open-model contract in pure torch (triton_models/classifiers/open_model.py): every
answer checked against the plain SmallCNN computed by hand, layer by layer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from propscope_server.triton_models.classifiers.cnn import SmallCNN
from propscope_server.triton_models.classifiers.open_model import (
    ABLATION_FILE,
    Ablation,
    Layer,
    OpenModel,
    check_declared_tensors,
    declared_open,
    parse_layers,
    read_ablation,
)

LAYERS = (Layer("features.0", 16), Layer("features.1", 32), Layer("features.2", 64))
B = 6


@pytest.fixture(scope="module")
def network() -> SmallCNN:
    torch.manual_seed(17)
    return SmallCNN().eval()


@pytest.fixture(scope="module")
def opened(network: SmallCNN) -> OpenModel:
    return OpenModel(network, LAYERS, torch.zeros(1, 3, 64, 64), name="m")


@pytest.fixture(scope="module")
def plain() -> SmallCNN:
    """The same weights in a module that carries no hooks."""
    torch.manual_seed(17)
    return SmallCNN().eval()


def batch(seed: int = 0, size: int = B) -> torch.Tensor:
    return torch.from_numpy(
        np.random.default_rng(seed).normal(size=(size, 3, 64, 64)).astype(np.float32)
    )


def column(values, dtype=np.int32) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


def intervene(layer, channel, strength, baseline) -> dict[str, np.ndarray]:
    return {
        "INTERVENE_LAYER": column(layer),
        "INTERVENE_CHANNEL": column(channel),
        "INTERVENE_STRENGTH": column(strength, np.float32),
        "INTERVENE_BASELINE": column(baseline, np.float32),
    }


def by_hand(network: SmallCNN, x: torch.Tensor, edit=None) -> tuple[np.ndarray, list[torch.Tensor]]:
    """Logits and the three block outputs; `edit(index, activation)` may change a block's
    output before the next block sees it."""
    outputs = []
    with torch.no_grad():
        a = x
        for index, block in enumerate(network.features):
            a = block(a)
            if edit is not None:
                a = edit(index, a.clone())
            outputs.append(a)
        return network.head(a.mean(dim=(2, 3))).numpy(), outputs


def test_plain_calls_are_the_plain_module_bit_for_bit(opened: OpenModel, plain: SmallCNN):
    for seed in range(3):
        x = batch(seed, size=1 + 7 * seed)
        with torch.inference_mode():
            expected = plain(x).numpy()
        assert np.array_equal(opened(x)["scores"], expected)
        assert np.array_equal(opened(x, {"GRADIENT_CLASS": None}, ())["scores"], expected)


def test_strength_zero_is_the_clean_pass_and_one_is_do(opened: OpenModel, network: SmallCNN):
    x = batch(1)
    clean = opened(x)["scores"]
    zero = opened(x, intervene([1] * B, [3] * B, [0.0] * B, [5.0] * B))["scores"]
    assert np.array_equal(zero, clean)

    def do(index: int, a: torch.Tensor) -> torch.Tensor:
        if index == 1:
            a[:, 3] = 5.0
        return a

    expected, _ = by_hand(network, x, do)
    full = opened(x, intervene([1] * B, [3] * B, [1.0] * B, [5.0] * B))["scores"]
    np.testing.assert_allclose(full, expected, rtol=0, atol=1e-6)
    assert not np.allclose(full, clean, atol=1e-4)  # channel 3 matters


def test_a_partial_strength_blends_towards_the_baseline(opened: OpenModel, network: SmallCNN):
    x = batch(2)

    def blend(index: int, a: torch.Tensor) -> torch.Tensor:
        if index == 0:
            a[:, 9] = 0.7 * a[:, 9] + 0.3 * -1.5
        return a

    expected, outputs = by_hand(network, x, blend)
    result = opened(x, intervene([0] * B, [9] * B, [0.3] * B, [-1.5] * B), ["CHANNEL_MEANS"])
    np.testing.assert_allclose(result["scores"], expected, atol=1e-6)
    means = torch.cat([o.mean(dim=(2, 3)) for o in outputs], dim=1).numpy()
    np.testing.assert_allclose(result["CHANNEL_MEANS"], means, atol=1e-6)


def test_each_sample_takes_its_own_intervention_in_one_pass(opened: OpenModel, network: SmallCNN):
    x = batch(3)
    layers, channels = [0, 1, 2, -1, 2, 1], [4, 31, 0, 7, 63, 2]
    strengths, baselines = [1.0, 0.5, 1.0, 1.0, 0.25, 0.0], [0.0, 2.0, -1.0, 9.0, 3.0, 1.0]
    result = opened(x, intervene(layers, channels, strengths, baselines))["scores"]
    for row in range(B):
        if layers[row] < 0:
            assert np.array_equal(result[row], opened(x)["scores"][row])  # untouched sample
            continue
        alone = opened(
            x[row : row + 1],
            intervene([layers[row]], [channels[row]], [strengths[row]], [baselines[row]]),
        )["scores"]
        np.testing.assert_allclose(result[row : row + 1], alone, atol=1e-6)
    assert not np.allclose(result[0], opened(x)["scores"][0], atol=1e-5)


def test_a_patch_sets_the_channels_map_after_the_intervention(opened: OpenModel, network: SmallCNN):
    x = batch(4)
    rng = np.random.default_rng(9)
    values = rng.normal(size=(B, 16 * 16)).astype(np.float32)

    def edit(index: int, a: torch.Tensor) -> torch.Tensor:
        if index == 1:
            a[:, 5] = 0.0  # the intervention (t = 1, b = 0), then the patch overwrites it
            a[:, 5] = torch.from_numpy(values).view(B, 16, 16)
        return a

    expected, _ = by_hand(network, x, edit)
    patch = {
        "PATCH_LAYER": column([1] * B),
        "PATCH_CHANNEL": column([5] * B),
        "PATCH_VALUE": values,
    }
    both = {**patch, **intervene([1] * B, [5] * B, [1.0] * B, [0.0] * B)}
    np.testing.assert_allclose(opened(x, both)["scores"], expected, atol=1e-6)
    # One value broadcast over the map.
    broadcast = {**patch, "PATCH_VALUE": np.full((B, 1), 2.0, np.float32)}

    def constant(index: int, a: torch.Tensor) -> torch.Tensor:
        if index == 1:
            a[:, 5] = 2.0
        return a

    np.testing.assert_allclose(
        opened(x, broadcast)["scores"], by_hand(network, x, constant)[0], atol=1e-6
    )


def test_channel_means_and_activations_are_the_blocks_outputs(opened: OpenModel, network: SmallCNN):
    x = batch(5)
    expected_logits, outputs = by_hand(network, x)
    for index in range(3):
        result = opened(
            x, {"ACTIVATION_LAYER": column([index] * B)}, ["CHANNEL_MEANS", "ACTIVATIONS"]
        )
        np.testing.assert_allclose(result["scores"], expected_logits, atol=1e-6)
        assert result["CHANNEL_MEANS"].shape == (B, 112)
        means = torch.cat([o.mean(dim=(2, 3)) for o in outputs], dim=1).numpy()
        np.testing.assert_allclose(result["CHANNEL_MEANS"], means, atol=1e-6)
        np.testing.assert_allclose(
            result["ACTIVATIONS"], outputs[index].reshape(B, -1).numpy(), atol=1e-6
        )


def test_gradients_match_autograd_on_the_plain_module(opened: OpenModel, plain: SmallCNN):
    x = batch(6)
    classes = [0, 1, 1, 0, 1, 0]
    leaf = x.clone().requires_grad_(True)
    activations = []
    a = leaf
    for block in plain.features:
        a = block(a)
        activations.append(a)
    logits = plain.head(a.mean(dim=(2, 3)))
    selected = logits[torch.arange(B), torch.tensor(classes)].sum()
    *layer_grads, input_grad = torch.autograd.grad(selected, [*activations, leaf])
    result = opened(
        x,
        {"GRADIENT_CLASS": column(classes)},
        ["INPUT_GRADIENT", "CHANNEL_GRADIENTS", "GRAD_X_ACTIVATION"],
    )
    np.testing.assert_allclose(result["scores"], logits.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(result["INPUT_GRADIENT"], input_grad.numpy(), atol=1e-6)
    channel_grads = torch.cat([g.sum(dim=(2, 3)) for g in layer_grads], dim=1).numpy()
    grad_x = torch.cat(
        [(g * a.detach()).sum(dim=(2, 3)) for g, a in zip(layer_grads, activations, strict=True)],
        dim=1,
    ).numpy()
    assert result["CHANNEL_GRADIENTS"].shape == result["GRAD_X_ACTIVATION"].shape == (B, 112)
    np.testing.assert_allclose(result["CHANNEL_GRADIENTS"], channel_grads, atol=1e-5)
    np.testing.assert_allclose(result["GRAD_X_ACTIVATION"], grad_x, atol=1e-5)
    assert np.abs(channel_grads).max() > 1e-3  # not trivially zero


@pytest.mark.parametrize(
    ("optional", "requested", "message"),
    [
        (intervene([3] * B, [0] * B, [1.0] * B, [0.0] * B), (), "INTERVENE_LAYER[0] is 3; layer indices are 0..2"),
        (intervene([0] * B, [16] * B, [1.0] * B, [0.0] * B), (), "INTERVENE_CHANNEL[0] is 16; layer 'features.0' has channels 0..15"),
        (intervene([0] * B, [1] * B, [np.nan] * B, [0.0] * B), (), "INTERVENE_STRENGTH[0] is nan; give t in [0, 1]"),
        (intervene([0] * B, [1] * B, [1.0] * B, [np.inf] * B), (), "INTERVENE_BASELINE[0] is not finite"),
        ({"INTERVENE_LAYER": column([0] * B)}, (), "without INTERVENE_CHANNEL, INTERVENE_STRENGTH, INTERVENE_BASELINE"),
        ({"PATCH_LAYER": column([2] * B), "PATCH_CHANNEL": column([0] * B), "PATCH_VALUE": np.zeros((B, 5), np.float32)}, (), "PATCH_VALUE has 5 values per sample; layer 'features.2' needs 64"),
        ({"INTERVENE_LAYER": column([0] * 2), "INTERVENE_CHANNEL": column([0] * 2), "INTERVENE_STRENGTH": column([0] * 2, np.float32), "INTERVENE_BASELINE": column([0] * 2, np.float32)}, (), "INTERVENE_LAYER must be [B, 1] for a batch of 6, got [2, 1]"),
        ({}, ("ACTIVATIONS",), "ACTIVATIONS requested without ACTIVATION_LAYER"),
        ({"ACTIVATION_LAYER": column([0, 1, 0, 0, 0, 0])}, ("ACTIVATIONS",), "ACTIVATION_LAYER differs between samples"),
        ({}, ("CHANNEL_GRADIENTS",), "CHANNEL_GRADIENTS requested without GRADIENT_CLASS"),
        ({"GRADIENT_CLASS": column([2] * B)}, ("INPUT_GRADIENT",), "GRADIENT_CLASS [2, 2, 2, 2, 2, 2] out of range"),
    ],
)  # fmt: skip
def test_bad_optional_inputs_are_refused_naming_the_input(opened, optional, requested, message):
    with pytest.raises(ValueError) as refused:
        opened(batch(7), optional, requested)
    assert message in str(refused.value)


def test_the_dry_run_names_the_layer_and_both_channel_counts(network: SmallCNN):
    wrong = (Layer("features.0", 16), Layer("features.1", 33))
    with pytest.raises(ValueError) as refused:
        OpenModel(network, wrong, torch.zeros(1, 3, 64, 64), name="synth")
    assert str(refused.value) == (
        "synth: layer 'features.1' outputs 32 channels, propscope.layers declares 33"
    )
    with pytest.raises(ValueError, match="names layer 'features.9', which the network lacks"):
        OpenModel(SmallCNN(), (Layer("features.9", 4),), torch.zeros(1, 3, 64, 64))
    with pytest.raises(
        ValueError, match="layer 'head' outputs 2 channels, propscope.layers declares 16"
    ):
        OpenModel(SmallCNN(), (Layer("head", 16),), torch.zeros(1, 3, 64, 64))


def test_the_version_folders_ablation_applies_to_every_pass(tmp_path: Path, network: SmallCNN):
    (tmp_path / ABLATION_FILE).write_text(
        json.dumps(
            {"channels": [{"layer": "features.1", "channel": 7, "value": 0.125}], "source": "t"}
        )
    )
    ablation = read_ablation(tmp_path, LAYERS)
    assert ablation == (Ablation("features.1", 7, 0.125),)
    repaired = OpenModel(network, LAYERS, torch.zeros(1, 3, 64, 64), ablation)
    x = batch(8)

    def ablate(index: int, a: torch.Tensor) -> torch.Tensor:
        if index == 1:
            a[:, 7] = 0.125
        return a

    expected, _ = by_hand(network, x, ablate)
    np.testing.assert_allclose(repaired(x)["scores"], expected, atol=1e-6)
    means = repaired(x, requested=["CHANNEL_MEANS"])["CHANNEL_MEANS"]
    assert np.all(means[:, 16 + 7] == np.float32(0.125))
    (tmp_path / ABLATION_FILE).write_text(
        json.dumps({"channels": [{"layer": "features.1", "channel": 32, "value": 0}]})
    )
    with pytest.raises(ValueError, match="channel 32 of 'features.1' is out of range 0..31"):
        read_ablation(tmp_path, LAYERS)
    assert read_ablation(tmp_path / "missing", LAYERS) == ()


def test_layers_and_declared_tensors_are_parsed_strictly():
    assert parse_layers('{"features.0": 16, "features.1": 32}') == LAYERS[:2]
    assert parse_layers(None) == ()
    with pytest.raises(ValueError, match="layer 'a' has 0 channels"):
        parse_layers('{"a": 0}')
    with pytest.raises(ValueError, match="propscope.layers is not JSON"):
        parse_layers("{a: 1}")
    assert declared_open({"propscope.capabilities": {"string_value": "gradients"}})
    assert not declared_open({"propscope.capabilities": {"string_value": ""}})
    good = {"name": "INTERVENE_LAYER", "data_type": "TYPE_INT32", "dims": [1], "optional": True}
    check_declared_tensors(
        [good], [{"name": "CHANNEL_MEANS", "data_type": "TYPE_FP32", "dims": [112]}]
    )
    with pytest.raises(ValueError, match="input 'INTERVENE_LAYER' must be declared optional: true"):
        check_declared_tensors([{**good, "optional": False}], [])
    with pytest.raises(ValueError, match="'INTERVENE_LAYER' must have data_type TYPE_INT32"):
        check_declared_tensors([{**good, "data_type": "TYPE_FP32"}], [])
    with pytest.raises(ValueError, match="input 'MASK' is not an open-model input"):
        check_declared_tensors([{**good, "name": "MASK"}], [])
