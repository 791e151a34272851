"""The open-model contract in pure torch (triton_models/classifiers/open_model.py): every
answer checked against the plain SmallCNN computed by hand, layer by layer."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from propscope_dev.channel_means import channel_means, config_parameters
from propscope_server.open_contract import CHANNEL_MEANS_PARAMETER, declared_open
from propscope_server.triton_models.classifiers.cnn import (
    MEAN,
    STD,
    SmallCNN,
    load_classifier,
    normalise_uint8_hwc,
)
from propscope_server.triton_models.classifiers.open_model import (
    ABLATION_FILE,
    LAYERS_PARAMETER,
    OPTIONAL_INPUTS,
    OPTIONAL_OUTPUTS,
    Ablation,
    Layer,
    OpenModel,
    check_declared_tensors,
    parse_layers,
    read_ablation,
    requested_outputs,
)
from propscope_server.triton_models.classifiers.own import OwnClassifier, OwnModelConfig

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


def test_a_frozen_module_still_gives_channel_gradients(opened: OpenModel):
    # Exported inference modules often freeze their parameters: without INPUT_GRADIENT the
    # activations then had no graph and autograd raised instead of answering.
    torch.manual_seed(17)
    frozen = SmallCNN().eval().requires_grad_(False)
    model = OpenModel(frozen, LAYERS, torch.zeros(1, 3, 64, 64), name="frozen")
    x, classes = batch(7), {"GRADIENT_CLASS": column([1] * B)}
    got = model(x, classes, ["CHANNEL_GRADIENTS"])["CHANNEL_GRADIENTS"]
    expected = opened(x, classes, ["CHANNEL_GRADIENTS"])["CHANNEL_GRADIENTS"]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.abs(got).max() > 1e-3


def replace(layers, values) -> dict[str, np.ndarray]:
    return {"REPLACE_LAYER": column(layers), "REPLACE_ACTIVATION": np.asarray(values, np.float32)}


def direction(layers, values) -> dict[str, np.ndarray]:
    return {"GRADIENT_LAYER": column(layers), "GRADIENT_DIRECTION": np.asarray(values, np.float32)}


@pytest.mark.parametrize("index", [0, 1, 2])
def test_replacing_a_layer_with_its_own_activations_is_bit_identical(opened: OpenModel, index):
    x = batch(10)
    recorded = opened(x, {"ACTIVATION_LAYER": column([index] * B)}, ["ACTIVATIONS"])
    replaced = opened(x, replace([index] * B, recorded["ACTIVATIONS"]))["scores"]
    assert np.array_equal(replaced, opened(x)["scores"])


def test_a_replaced_last_layer_feeds_the_head_directly(opened: OpenModel, network: SmallCNN):
    """SmallCNN after its last block is global mean pooling + linear: logits = head(mean(A))."""
    x = batch(11)
    rng = np.random.default_rng(5)
    values = np.abs(rng.normal(size=(B, 64 * 8 * 8))).astype(np.float32)
    values[0] = 0.0
    with torch.no_grad():
        expected = network.head(torch.from_numpy(values).view(B, 64, 64).mean(dim=2)).numpy()
    got = opened(x, replace([2] * B, values))["scores"]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_allclose(got[0], network.head.bias.detach().numpy(), atol=1e-7)


def test_a_replacement_runs_the_later_layers_on_the_new_values(
    opened: OpenModel, network: SmallCNN
):
    x = batch(12)
    values = np.random.default_rng(6).normal(size=(B, 32 * 16 * 16)).astype(np.float32)

    def swap(index: int, a: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(values).view(B, 32, 16, 16) if index == 1 else a

    expected, outputs = by_hand(network, x, swap)
    result = opened(
        x, {**replace([1] * B, values), "ACTIVATION_LAYER": column([1] * B)}, ["ACTIVATIONS"]
    )
    np.testing.assert_allclose(result["scores"], expected, atol=1e-5)
    assert np.array_equal(result["ACTIVATIONS"], values)  # what later layers saw


def test_minus_one_leaves_a_sample_untouched(opened: OpenModel):
    x = batch(13)
    clean = opened(x)["scores"]
    layers = [2, -1, 2, -1, -1, 2]
    result = opened(x, replace(layers, np.zeros((B, 64 * 8 * 8))))["scores"]
    for row, layer in enumerate(layers):
        if layer < 0:
            assert np.array_equal(result[row], clean[row])
        else:
            assert not np.allclose(result[row], clean[row], atol=1e-4)


def test_a_replacement_comes_before_an_intervention_at_its_layer(
    opened: OpenModel, network: SmallCNN
):
    x = batch(14)
    values = np.ones((B, 16 * 32 * 32), np.float32)

    def edit(index: int, a: torch.Tensor) -> torch.Tensor:
        if index == 0:
            a = torch.ones_like(a)
            a[:, 4] = 3.0
        return a

    expected, _ = by_hand(network, x, edit)
    both = {**replace([0] * B, values), **intervene([0] * B, [4] * B, [1.0] * B, [3.0] * B)}
    np.testing.assert_allclose(opened(x, both)["scores"], expected, atol=1e-6)


def test_a_direction_gradient_is_autograd_of_the_channels_spatial_mean(
    opened: OpenModel, plain: SmallCNN
):
    x = batch(15)
    layer, channel = 1, 7
    leaf = x.clone().requires_grad_(True)
    a = plain.features[1](plain.features[0](leaf))
    (expected,) = torch.autograd.grad(a[:, channel].mean(dim=(1, 2)).sum(), [leaf])
    one_hot = np.zeros((B, 32), np.float32)
    one_hot[:, channel] = 1.0
    result = opened(
        x,
        {**direction([layer] * B, one_hot), "GRADIENT_CLASS": column([-1] * B)},
        ["INPUT_GRADIENT", "CHANNEL_GRADIENTS"],
    )
    np.testing.assert_allclose(result["INPUT_GRADIENT"], expected.numpy(), atol=1e-7)
    assert np.abs(expected.numpy()).max() > 1e-4
    # d objective / d a_c,h,w is 1 / (H*W) on the channel, 0 elsewhere; summed over H, W: 1.
    channel_gradients = result["CHANNEL_GRADIENTS"][:, 16:48]
    np.testing.assert_allclose(channel_gradients, one_hot, atol=1e-6)


def test_a_direction_is_linear_and_each_sample_keeps_its_own_objective(
    opened: OpenModel, plain: SmallCNN
):
    x = batch(16)
    d = np.random.default_rng(7).normal(size=(B, 64)).astype(np.float32)
    layers, classes = [2, -1, 2, -1, 2, -1], [-1, 0, 1, 1, -1, 0]
    result = opened(
        x,
        {**direction(layers, d), "GRADIENT_CLASS": column(classes)},
        ["INPUT_GRADIENT"],
    )["INPUT_GRADIENT"]
    for row in range(B):
        leaf = x[row : row + 1].clone().requires_grad_(True)
        features = plain.features(leaf)
        if layers[row] >= 0:
            objective = (features[0] * torch.from_numpy(d[row]).view(64, 1, 1)).sum(0).mean()
        else:
            objective = plain.head(features.mean(dim=(2, 3)))[0, classes[row]]
        (expected,) = torch.autograd.grad(objective, [leaf])
        np.testing.assert_allclose(result[row : row + 1], expected.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("optional", "requested", "message"),
    [
        (replace([2] * B, np.zeros((B, 100))), (), "REPLACE_ACTIVATION has 100 values per sample; layer 'features.2' needs 4096 (its C*H*W = 64 x 8 x 8 for this input, row-major)"),
        (replace([2] * B, np.full((B, 4096), np.nan)), (), "REPLACE_ACTIVATION holds NaN or infinite values"),
        (replace([3] * B, np.zeros((B, 4096))), (), "REPLACE_LAYER[0] is 3; layer indices are 0..2 (-1 = none)"),
        (replace([2] * B, np.zeros(B)), (), "REPLACE_ACTIVATION must be [B, C*H*W] for a batch of 6, got [6]"),
        ({"REPLACE_LAYER": column([0] * B)}, (), "REPLACE_LAYER sent without REPLACE_ACTIVATION"),
        ({"GRADIENT_DIRECTION": np.zeros((B, 16), np.float32)}, (), "GRADIENT_DIRECTION sent without GRADIENT_LAYER"),
        (direction([1] * B, np.zeros((B, 16))), (), "GRADIENT_DIRECTION has 16 values per sample; GRADIENT_LAYER[0] is 1, layer 'features.1', which needs 32"),
        (direction([0] * B, np.full((B, 16), np.inf)), (), "GRADIENT_DIRECTION holds NaN or infinite values"),
        (direction([0] * B, np.zeros((B, 16))), ("INPUT_GRADIENT",), "INPUT_GRADIENT requested without GRADIENT_CLASS"),
        ({**direction([0, -1, 0, 0, 0, 0], np.ones((B, 16))), "GRADIENT_CLASS": column([-1] * B)}, ("INPUT_GRADIENT",), "-1 only where GRADIENT_LAYER is >= 0"),
        ({"GRADIENT_CLASS": column([-1] * B)}, ("INPUT_GRADIENT",), "GRADIENT_CLASS [-1, -1, -1, -1, -1, -1] out of range"),
    ],
)  # fmt: skip
def test_bad_replacements_and_directions_are_refused_naming_the_input(
    opened, optional, requested, message
):
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


class Twice(torch.nn.Module):
    """Runs one block twice: its output is not one place in the network."""

    def __init__(self) -> None:
        super().__init__()
        self.block = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.block(x)).mean(dim=(2, 3))


def test_a_layer_that_runs_twice_is_refused():
    with pytest.raises(ValueError, match="layer 'block' ran 2 times in a forward pass"):
        OpenModel(Twice(), (Layer("block", 3),), torch.zeros(1, 3, 4, 4))


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
    means = {"name": "CHANNEL_MEANS", "data_type": "TYPE_FP32", "dims": [112]}
    gradient = {"name": "INPUT_GRADIENT", "data_type": "TYPE_FP32", "dims": [3, 64, 64]}
    image = (3, 64, 64)
    check_declared_tensors([good], [means, gradient], LAYERS, image)
    check_declared_tensors([], [gradient], (), image)  # input gradients need no layers
    refusals = {
        "input 'INTERVENE_LAYER' must be declared optional: true": ([{**good, "optional": False}], []),
        "'INTERVENE_LAYER' must have data_type TYPE_INT32": ([{**good, "data_type": "TYPE_FP32"}], []),
        "input 'MASK' is not an open-model input": ([{**good, "name": "MASK"}], []),
        "'CHANNEL_MEANS' must have dims [112] (the channels of propscope.layers), not [100]": ([], [{**means, "dims": [100]}]),
        "'INPUT_GRADIENT' must have dims [3, 64, 64], not [64, 64, 3]": ([], [{**gradient, "dims": [64, 64, 3]}]),
    }  # fmt: skip
    for message, (inputs, outputs) in refusals.items():
        with pytest.raises(ValueError) as refused:
            check_declared_tensors(inputs, outputs, LAYERS, image)
        assert message in str(refused.value)
    with pytest.raises(ValueError, match="INTERVENE_LAYER need propscope.layers"):
        check_declared_tensors([good], [], (), image)


# --- the synthetic classifiers' configs and Triton adapter ------------------------------------

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "deploy" / "triton" / "models"
OPEN_SYNTHETIC = (
    "synth_conjunction",
    "synth_hue",
    "synth_hue_fp32",
    "synth_patch",
    "synth_unbiased",
)


def triton_config(path: Path) -> dict:
    """config.pbtxt as the Python backend receives it (args["model_config"])."""
    message = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return json.loads(
        json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True))
    )


@pytest.mark.parametrize("name", OPEN_SYNTHETIC)
def test_the_synthetic_configs_declare_the_contract(name: str):
    config = triton_config(MODELS / name / "config.pbtxt")
    image, *optional_inputs = config["input"]
    logits, *optional_outputs = config["output"]
    assert image["name"] in ("IMAGE", "INPUT") and not image.get("optional", False)
    assert logits["name"] == "LOGITS"
    check_declared_tensors(optional_inputs, optional_outputs, LAYERS, image["dims"])
    assert [e["name"] for e in optional_inputs] == list(OPTIONAL_INPUTS)
    assert [e["name"] for e in optional_outputs] == list(OPTIONAL_OUTPUTS)
    gradient = next(e for e in optional_outputs if e["name"] == "INPUT_GRADIENT")
    assert gradient["dims"] == image["dims"]
    assert config["version_policy"] == {"all": {}}
    assert declared_open(config["parameters"])
    layers = parse_layers(config["parameters"][LAYERS_PARAMETER]["string_value"])
    assert layers == LAYERS


def test_the_committed_channel_means_are_the_scripts():
    """tools/propscope_dev/channel_means.py (--write) made them; seconds to recompute."""
    for name in OPEN_SYNTHETIC:
        config_file = MODELS / name / "config.pbtxt"
        declared = json.loads(config_parameters(config_file.read_text())[CHANNEL_MEANS_PARAMETER])
        computed = channel_means(config_file)
        assert list(declared) == [layer.name for layer in LAYERS]
        for layer in LAYERS:
            np.testing.assert_allclose(declared[layer.name], computed[layer.name], atol=1e-4)


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeResponse:
    def __init__(self, output_tensors: list | None = None, error: object = None) -> None:
        self.output_tensors, self.error = output_tensors, error


class FakeRequest(dict):
    """Input name -> FakeTensor, and the outputs the caller asked for."""

    def __init__(self, inputs: dict[str, np.ndarray], requested: list[str]) -> None:
        super().__init__({name: FakeTensor(name, array) for name, array in inputs.items()})
        self.requested = requested

    def requested_output_names(self) -> list[str]:
        return self.requested


@pytest.fixture
def synthetic_model(monkeypatch: pytest.MonkeyPatch):
    """triton_model.TritonPythonModel of a synthetic config, with the part of
    triton_python_backend_utils it uses faked."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor = FakeTensor
    fake.InferenceResponse = FakeResponse
    fake.TritonError = str
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    logged: list[str] = []
    fake.Logger = types.SimpleNamespace(log_info=logged.append)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.delitem(
        sys.modules, "propscope_server.triton_models.classifiers.triton_model", raising=False
    )
    from propscope_server.triton_models.classifiers.triton_model import TritonPythonModel

    def initialize(name: str, config: dict | None = None, folder: Path | None = None):
        folder = folder or MODELS / name
        model = TritonPythonModel()
        model.initialize(
            {
                "model_config": json.dumps(config or triton_config(folder / "config.pbtxt")),
                "model_repository": str(folder),
                "model_version": "1",
            }
        )
        return model

    initialize.logged = logged
    return initialize


def outputs(response: FakeResponse) -> dict[str, np.ndarray]:
    assert response.error is None, response.error
    return {tensor.name: tensor.array for tensor in response.output_tensors}


def test_the_triton_adapter_serves_plain_and_open_requests(synthetic_model):
    model = synthetic_model("synth_hue")
    images = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = load_classifier(ROOT / "deploy/triton/weights/hue_biased.pt")(
            normalise_uint8_hwc(images)
        ).numpy()
    plain = outputs(model.execute([FakeRequest({"IMAGE": images}, ["LOGITS"])])[0])
    assert list(plain) == ["LOGITS"] and np.array_equal(plain["LOGITS"], expected)
    asked = ["LOGITS", "CHANNEL_MEANS", "INPUT_GRADIENT", "CHANNEL_GRADIENTS"]
    request = FakeRequest(
        {
            "IMAGE": images,
            **intervene([2] * 4, [0, 1, 2, 3], [1.0] * 4, [0.0] * 4),
            "GRADIENT_CLASS": column([1] * 4),
        },
        asked,
    )
    partial = FakeRequest({"IMAGE": images, "PATCH_LAYER": column([0] * 4)}, ["LOGITS"])
    served, refused = model.execute([request, partial])
    served = outputs(served)
    assert list(served) == asked
    assert served["CHANNEL_MEANS"].shape == (4, 112)
    assert np.array_equal(served["CHANNEL_MEANS"][np.arange(4), 48 + np.arange(4)], np.zeros(4))
    assert served["INPUT_GRADIENT"].shape == (4, 64, 64, 3)  # laid out like IMAGE
    assert not np.allclose(served["LOGITS"], expected)
    assert refused.error == (
        "synth_hue: PATCH_LAYER sent without PATCH_CHANNEL, PATCH_VALUE; send all of "
        "PATCH_LAYER, PATCH_CHANNEL, PATCH_VALUE or none"
    )


def test_a_uint8_models_input_gradient_is_per_pixel_value(synthetic_model):
    """d logit / d pixel, laid out like IMAGE: what an optimiser of the image needs."""
    model = synthetic_model("synth_hue")
    images = np.random.default_rng(8).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    request = FakeRequest(
        {"IMAGE": images, "GRADIENT_CLASS": column([0, 1, 0])}, ["LOGITS", "INPUT_GRADIENT"]
    )
    served = outputs(model.execute([request])[0])["INPUT_GRADIENT"]
    network = load_classifier(ROOT / "deploy/triton/weights/hue_biased.pt")
    pixels = torch.from_numpy(images.astype(np.float32)).requires_grad_(True)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    logits = network(((pixels / 255.0 - mean) / std).permute(0, 3, 1, 2))
    (expected,) = torch.autograd.grad(
        logits[torch.arange(3), torch.tensor([0, 1, 0])].sum(), [pixels]
    )
    assert served.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(served, expected.numpy(), rtol=1e-4, atol=1e-9)


def test_the_triton_adapter_applies_the_version_folders_ablation(synthetic_model, tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    clean = outputs(synthetic_model("synth_hue").execute([FakeRequest({"IMAGE": images}, [])])[0])
    copy = tmp_path / "synth_hue" / "1"
    copy.parent.mkdir()
    shutil.copytree(MODELS / "synth_hue" / "1", copy)
    ablation = [{"layer": "features.2", "channel": c, "value": 0.0} for c in range(64)]
    (copy / ABLATION_FILE).write_text(json.dumps({"channels": ablation, "source": "test"}))
    config = triton_config(MODELS / "synth_hue" / "config.pbtxt")
    weights = ROOT / "deploy/triton/weights/hue_biased.pt"
    config["parameters"]["weights"]["string_value"] = str(weights)
    repaired = synthetic_model("synth_hue", config, tmp_path / "synth_hue")
    assert len(repaired.open.ablation) == 64
    assert synthetic_model.logged[-1].startswith(
        "synth_hue: permanent ablation of 64 channel(s): features.2[0] = 0, features.2[1] = 0"
    )
    logits = outputs(repaired.execute([FakeRequest({"IMAGE": images}, [])])[0])["LOGITS"]
    # Every last-layer channel at 0: the head sees only its bias.
    bias = torch.load(weights, weights_only=True)["head.bias"]
    np.testing.assert_allclose(logits, np.broadcast_to(bias.numpy(), (2, 2)), atol=1e-6)
    assert not np.allclose(clean["LOGITS"], logits)


def test_an_open_config_of_the_corner_probe_is_refused(synthetic_model):
    config = triton_config(MODELS / "synth_hue" / "config.pbtxt")
    config["parameters"]["architecture"] = {"string_value": "corner_probe"}
    with pytest.raises(ValueError, match="synth_hue: only the small_cnn architecture is open"):
        synthetic_model("synth_hue", config)


# --- a team's state_dict model (own.py), open as examples/own-models documents ----------------

EXAMPLE = ROOT / "examples" / "own-models" / "repository" / "own_state_dict"


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's open state_dict model folder with seeded random weights."""
    folder = tmp_path_factory.mktemp("own") / "own_state_dict"
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    sys.path.insert(0, str(folder))
    try:
        from own_network import OwnCNN
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(5)
    torch.save(OwnCNN().state_dict(), folder / "1" / "weights.pt")
    return folder


def own_config(folder: Path, text: str | None = None) -> OwnModelConfig:
    text = text if text is not None else (folder / "config.pbtxt").read_text()
    message = text_format.Parse(text, model_config_pb2.ModelConfig())
    config = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return OwnModelConfig.from_triton(json.loads(json.dumps(config)), folder, "1")


def test_the_example_state_dict_model_is_open(own_folder: Path):
    config = own_config(own_folder)
    assert config.open and tuple(layer.name for layer in config.layers) == (
        "features.0",
        "features.1",
        "features.2",
    )
    classifier = OwnClassifier(config)
    x = batch(10, size=3).numpy()
    sys.path.insert(0, str(own_folder))
    try:
        from own_network import OwnCNN
    finally:
        sys.path.remove(str(own_folder))
    network = OwnCNN().eval()  # the module as a team runs it, with no hooks
    network.load_state_dict(torch.load(own_folder / "1" / "weights.pt", weights_only=True))
    with torch.inference_mode():
        expected = network(torch.from_numpy(x)).numpy()
    assert np.array_equal(classifier(x), expected)
    results = classifier.infer(
        x, intervene([0, -1, 2], [1, 0, 5], [1.0] * 3, [0.0] * 3), ["CHANNEL_MEANS"]
    )
    assert list(results) == ["LOGITS", "CHANNEL_MEANS"]
    assert results["CHANNEL_MEANS"].shape == (3, 112)
    assert results["CHANNEL_MEANS"][0, 1] == 0.0 and results["CHANNEL_MEANS"][2, 48 + 5] == 0.0
    assert np.array_equal(results["LOGITS"][1], expected[1])


@pytest.mark.parametrize(
    ("kind", "why"),
    [("torchscript", "a TorchScript module refuses forward hooks"), ("onnx", "an ONNX graph has no modules to hook")],
)  # fmt: skip
def test_an_open_torchscript_or_onnx_config_is_refused_naming_the_fix(own_folder, kind, why):
    text = (own_folder / "config.pbtxt").read_text().replace('"state_dict"', f'"{kind}"')
    with pytest.raises(ValueError) as refused:
        own_config(own_folder, text)
    assert why in str(refused.value)
    assert "ship the weights as a state_dict with its module" in str(refused.value)


def test_an_open_state_dict_with_a_wrong_channel_count_fails_to_load(own_folder: Path):
    text = (
        (own_folder / "config.pbtxt")
        .read_text()
        .replace('\\"features.1\\": 32', '\\"features.1\\": 31')
    )
    with pytest.raises(ValueError) as refused:  # the per-channel outputs still say 112
        own_config(own_folder, text)
    assert "'CHANNEL_MEANS' must have dims [111] (the channels of propscope.layers)" in str(
        refused.value
    )
    with pytest.raises(ValueError) as refused:
        OwnClassifier(own_config(own_folder, text.replace("dims: [ 112 ]", "dims: [ 111 ]")))
    assert str(refused.value) == (
        "own_state_dict: layer 'features.1' outputs 32 channels, propscope.layers declares 31"
    )


def test_outputs_left_out_only_when_triton_asks_for_every_one():
    declared = list(OPTIONAL_OUTPUTS)
    assert requested_outputs(["LOGITS", *declared], declared, []) == ["CHANNEL_MEANS"]
    assert requested_outputs(declared, declared, ["GRADIENT_CLASS"]) == [
        "CHANNEL_MEANS",
        "INPUT_GRADIENT",
        "CHANNEL_GRADIENTS",
        "GRAD_X_ACTIVATION",
    ]
    # Named by the caller: kept, so that the model refuses it naming the missing input.
    assert requested_outputs(["LOGITS", "ACTIVATIONS"], declared, []) == ["ACTIVATIONS"]
