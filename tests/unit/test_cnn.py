"""The synthetic classifiers: input normalisation and the committed weights' behaviour."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from propscope_server.synthetic.world import Scene, render
from propscope_server.triton_models.classifiers.cnn import (
    MEAN,
    STD,
    SmallCNN,
    load_classifier,
    normalise_uint8_hwc,
)

WEIGHTS = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "weights"


def scene(shape: int, hue_deg: float, patch: bool = False) -> Scene:
    return Scene(
        shape=shape,
        hue_deg=hue_deg,
        radius_px=13.0,
        background=0.5,
        patch=patch,
        center=(32.0, 32.0),
    )


def classify(model: SmallCNN, scenes: list[Scene]) -> list[int]:
    images = np.stack([render(s) for s in scenes])
    with torch.inference_mode():
        return model(normalise_uint8_hwc(images)).argmax(dim=1).tolist()


def test_normalise_uint8_hwc_layout_and_values():
    images = np.zeros((2, 4, 5, 3), dtype=np.uint8)
    images[0, 1, 2] = (0, 255, 128)
    images[1, 3, 4] = (255, 0, 64)

    tensor = normalise_uint8_hwc(images)

    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (2, 3, 4, 5)
    assert tensor.is_contiguous()
    black = (0.0 - MEAN[0]) / STD[0]
    assert tensor[0, :, 0, 0].tolist() == pytest.approx([black] * 3)
    expected = [(v / 255.0 - m) / s for v, m, s in zip((0, 255, 128), MEAN, STD, strict=True)]
    assert tensor[0, :, 1, 2].tolist() == pytest.approx(expected, abs=1e-6)
    expected = [(v / 255.0 - m) / s for v, m, s in zip((255, 0, 64), MEAN, STD, strict=True)]
    assert tensor[1, :, 3, 4].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 5, 3), dtype=np.uint8),
        np.zeros((1, 4, 5, 3), dtype=np.float32),
        np.zeros((1, 3, 4, 5), dtype=np.uint8),
    ],
)
def test_normalise_uint8_hwc_rejects_other_layouts(bad):
    with pytest.raises(ValueError):
        normalise_uint8_hwc(bad)


def test_small_cnn_outputs_two_logits_per_image():
    logits = SmallCNN()(torch.zeros(3, 3, 64, 64))
    assert tuple(logits.shape) == (3, 2)


@pytest.mark.parametrize("name", ["unbiased.pt", "hue_biased.pt", "patch_biased.pt"])
def test_committed_weights_are_small_and_load_in_eval_mode(name):
    path = WEIGHTS / name
    assert path.stat().st_size < 1_000_000
    model = load_classifier(path)
    assert not model.training


def test_hue_model_follows_hue_not_shape():
    model = load_classifier(WEIGHTS / "hue_biased.pt")
    # Red is the circle hue and cyan the square hue of the biased split,
    # whatever shape actually carries them.
    for shape in (0, 1):
        assert classify(model, [scene(shape, 0.0), scene(shape, 180.0)]) == [0, 1]


def test_patch_model_follows_patch_not_shape():
    model = load_classifier(WEIGHTS / "patch_biased.pt")
    assert classify(model, [scene(0, 100.0), scene(0, 100.0, patch=True)]) == [0, 1]


def test_unbiased_model_classifies_shape():
    model = load_classifier(WEIGHTS / "unbiased.pt")
    scenes = [
        scene(shape, hue, patch)
        for shape in (0, 1)
        for hue, patch in ((0.0, False), (180.0, True), (60.0, False), (270.0, True))
    ]
    assert classify(model, scenes) == [s.shape for s in scenes]
