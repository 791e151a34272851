"""The open-model contract on the real Triton of the live stack: the synthetic CNN's
plain LOGITS are the pure-torch SmallCNN's bit for bit, an intervention changes them as
computed in this process, a replacement and a direction's gradient are the pure-torch
ones, and a residual network that is not ours, packaged by following docs/own-models.md,
is served open."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc

from propscope_server.triton_models.classifiers.cnn import (
    MEAN,
    STD,
    load_classifier,
    normalise_uint8_hwc,
)
from propscope_server.triton_models.classifiers.open_model import ABLATION_FILE
from tests.integration import open_resnet

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "deploy" / "triton" / "weights" / "hue_biased.pt"
B = 8


def tensor(name: str, array: np.ndarray) -> triton_grpc.InferInput:
    datatype = {np.uint8: "UINT8", np.int32: "INT32", np.float32: "FP32"}[array.dtype.type]
    entry = triton_grpc.InferInput(name, list(array.shape), datatype)
    entry.set_data_from_numpy(array)
    return entry


def infer(
    client: triton_grpc.InferenceServerClient,
    model: str,
    inputs: dict[str, np.ndarray],
    outputs: list[str],
    version: str = "",
) -> dict[str, np.ndarray]:
    result = client.infer(
        model,
        [tensor(name, array) for name, array in inputs.items()],
        model_version=version,
        outputs=[triton_grpc.InferRequestedOutput(name) for name in outputs],
    )
    return {name: result.as_numpy(name) for name in outputs}


def column(values, dtype=np.int32) -> np.ndarray:
    return np.asarray(values, dtype=dtype).reshape(-1, 1)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(11).integers(0, 256, (B, 64, 64, 3), dtype=np.uint8)


def test_plain_logits_through_triton_are_the_pure_torch_cnns_bit_for_bit(triton, images):
    with torch.inference_mode():
        expected = load_classifier(WEIGHTS)(normalise_uint8_hwc(images)).numpy()
    served = infer(triton, "synth_hue", {"IMAGE": images}, ["LOGITS"])["LOGITS"]
    assert np.array_equal(served, expected)


def test_an_intervention_through_triton_is_the_hand_computed_do(triton, images):
    network = load_classifier(WEIGHTS)
    channels = np.arange(B) % 32
    with torch.no_grad():
        a = network.features[1](network.features[0](normalise_uint8_hwc(images)))
        a[np.arange(B), channels] = 0.25
        last = network.features[2](a)
        expected = network.head(last.mean(dim=(2, 3))).numpy()
        means = torch.cat([a.mean(dim=(2, 3)), last.mean(dim=(2, 3))], dim=1).numpy()
    result = infer(
        triton,
        "synth_hue",
        {
            "IMAGE": images,
            "INTERVENE_LAYER": column([1] * B),
            "INTERVENE_CHANNEL": column(channels),
            "INTERVENE_STRENGTH": column([1.0] * B, np.float32),
            "INTERVENE_BASELINE": column([0.25] * B, np.float32),
        },
        ["LOGITS", "CHANNEL_MEANS"],
    )
    np.testing.assert_allclose(result["LOGITS"], expected, atol=1e-5)
    assert result["CHANNEL_MEANS"].shape == (B, 112)
    np.testing.assert_allclose(result["CHANNEL_MEANS"][:, 16:], means, atol=1e-5)


def test_replacing_a_layer_with_its_own_activations_through_triton_changes_nothing(triton, images):
    plain = infer(triton, "synth_hue", {"IMAGE": images}, ["LOGITS"])["LOGITS"]
    recorded = infer(
        triton,
        "synth_hue",
        {"IMAGE": images, "ACTIVATION_LAYER": column([1] * B)},
        ["ACTIVATIONS"],
    )["ACTIVATIONS"]
    layers = column([1, -1] * (B // 2))
    replaced = infer(
        triton,
        "synth_hue",
        {"IMAGE": images, "REPLACE_LAYER": layers, "REPLACE_ACTIVATION": recorded},
        ["LOGITS"],
    )["LOGITS"]
    assert np.array_equal(replaced, plain)
    zeros = infer(
        triton,
        "synth_hue",
        {"IMAGE": images, "REPLACE_LAYER": layers, "REPLACE_ACTIVATION": 0 * recorded},
        ["LOGITS"],
    )["LOGITS"]
    assert not np.allclose(zeros[0], plain[0], atol=1e-4) and np.array_equal(zeros[1], plain[1])
    with pytest.raises(triton_grpc.InferenceServerException) as refused:
        infer(
            triton,
            "synth_hue",
            {"IMAGE": images, "REPLACE_LAYER": layers, "REPLACE_ACTIVATION": recorded[:, :10]},
            ["LOGITS"],
        )
    assert "REPLACE_ACTIVATION has 10 values per sample; layer 'features.1' needs 8192" in str(
        refused.value
    )


def test_a_direction_gradient_through_triton_is_torchs_per_pixel_value(triton, images):
    """A channel's one-hot direction: INPUT_GRADIENT is d (spatial mean of the channel) /
    d pixel value, computed here by autograd on the pure-torch CNN."""
    layer, channel = 2, 5
    one_hot = np.zeros((B, 64), np.float32)
    one_hot[:, channel] = 1.0
    served = infer(
        triton,
        "synth_hue",
        {
            "IMAGE": images,
            "GRADIENT_CLASS": column([-1] * B),
            "GRADIENT_LAYER": column([layer] * B),
            "GRADIENT_DIRECTION": one_hot,
        },
        ["INPUT_GRADIENT"],
    )["INPUT_GRADIENT"]
    network = load_classifier(WEIGHTS)
    pixels = torch.from_numpy(images.astype(np.float32)).requires_grad_(True)
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    activation = network.features(((pixels / 255.0 - mean) / std).permute(0, 3, 1, 2))
    (expected,) = torch.autograd.grad(activation[:, channel].mean(dim=(1, 2)).sum(), [pixels])
    assert served.shape == (B, 64, 64, 3)
    assert np.abs(expected.numpy()).max() > 0
    np.testing.assert_allclose(served, expected.numpy(), rtol=1e-4, atol=1e-8)


def test_a_partial_intervention_is_refused_naming_the_missing_inputs(triton, images):
    with pytest.raises(triton_grpc.InferenceServerException) as refused:
        infer(
            triton,
            "synth_hue",
            {"IMAGE": images, "INTERVENE_LAYER": column([0] * B)},
            ["LOGITS"],
        )
    assert "without INTERVENE_CHANNEL, INTERVENE_STRENGTH, INTERVENE_BASELINE" in str(refused.value)


def test_a_residual_network_not_ours_is_served_open(triton, tmp_path):
    folder = open_resnet.write_model(tmp_path / "repository")
    batch = np.random.default_rng(2).normal(size=(4, *open_resnet.INPUT_DIMS)).astype(np.float32)
    with torch.inference_mode():
        expected = open_resnet.network(folder)(torch.from_numpy(batch)).numpy()
    with open_resnet.served(triton, folder) as name:
        config = triton.get_model_config(name, as_json=True)["config"]
        result = infer(
            triton,
            name,
            {"INPUT": batch, "GRADIENT_CLASS": column([0, 1, 2, 0])},
            ["LOGITS", "CHANNEL_MEANS", "CHANNEL_GRADIENTS"],
        )
        plain = infer(triton, name, {"INPUT": batch}, ["LOGITS"])["LOGITS"]
    total = sum(open_resnet.LAYERS.values())
    assert config["parameters"]["propscope.layers"]["string_value"]
    assert result["CHANNEL_MEANS"].shape == result["CHANNEL_GRADIENTS"].shape == (4, total)
    assert np.array_equal(plain, expected)
    np.testing.assert_allclose(result["LOGITS"], expected, atol=1e-5)


def test_a_request_naming_no_outputs_gets_those_its_inputs_allow(triton, images):
    """Triton asks the model for every output then: LOGITS stays the plain one, the
    outputs whose input was not sent are left out instead of refused."""
    with torch.inference_mode():
        expected = load_classifier(WEIGHTS)(normalise_uint8_hwc(images)).numpy()
    result = triton.infer("synth_hue", [tensor("IMAGE", images)])
    names = [output.name for output in result.get_response().outputs]
    assert sorted(names) == ["CHANNEL_MEANS", "LOGITS"]
    assert np.array_equal(result.as_numpy("LOGITS"), expected)


def test_a_repaired_version_serves_beside_the_original(triton, tmp_path):
    """Version 2 = version 1's folder plus propscope_ablation.json; version_policy all
    serves both, and only version 2 sets the channel."""
    folder = open_resnet.write_model(tmp_path / "repository", name="tiny_resnet_repaired")
    shutil.copytree(folder / "1", folder / "2")
    ablation = {"channels": [{"layer": "stage1", "channel": 3, "value": 0.5}], "source": "test"}
    (folder / "2" / ABLATION_FILE).write_text(json.dumps(ablation))
    batch = np.random.default_rng(3).normal(size=(2, *open_resnet.INPUT_DIMS)).astype(np.float32)
    network = open_resnet.network(folder)
    with torch.inference_mode():
        original = network(torch.from_numpy(batch)).numpy()

        def ablate(module, args, output):
            output = output.clone()
            output[:, 3] = 0.5
            return output

        network.stage1.register_forward_hook(ablate)
        repaired = network(torch.from_numpy(batch)).numpy()
    with open_resnet.served(triton, folder) as name:
        first = infer(triton, name, {"INPUT": batch}, ["LOGITS"], version="1")["LOGITS"]
        second = infer(triton, name, {"INPUT": batch}, ["LOGITS", "CHANNEL_MEANS"], version="2")
    assert np.array_equal(first, original)
    np.testing.assert_allclose(second["LOGITS"], repaired, atol=1e-5)
    assert np.all(second["CHANNEL_MEANS"][:, 8 + 3] == np.float32(0.5))
    assert not np.allclose(original, repaired, atol=1e-4)
