"""The saliency baselines of the paper's Table 2, through Captum, on the same
torch classifiers that Triton serves.

Each method maps uint8 images and target classes to one attribution map per
image ([B, 64, 64], summed over colour channels). Settings are fixed here so
that every figure in docs/results comes from one place.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from captum.attr import (
    DeepLift,
    IntegratedGradients,
    KernelShap,
    LayerAttribution,
    LayerGradCam,
    Lime,
    Occlusion,
)
from torch import nn

from propscope_dev.stack import DEFAULT_MODEL_REPOSITORY
from propscope_server.triton_models.classifiers.cnn import (
    SmallCNN,
    load_classifier,
    normalise_uint8_hwc,
)

# Captum warns on every call about hooks and input gradients it sets up itself.
warnings.filterwarnings("ignore", category=UserWarning, module="captum")

# LIME and Kernel SHAP perturb 8x8 superpixels: 64 features per 64x64 image.
SUPERPIXEL = 8
SURROGATE_SAMPLES = 200
IG_STEPS = 32
OCCLUSION_WINDOW = 8
OCCLUSION_STRIDE = 4

Method = Callable[[SmallCNN, torch.Tensor, torch.Tensor], torch.Tensor]


def served_classifier(model_name: str, repository: Path = DEFAULT_MODEL_REPOSITORY) -> SmallCNN:
    """The SmallCNN behind a Triton entry, loaded from the weights its config names;
    in-place ReLUs are switched off, which DeepLift's hooks need."""
    config = (repository / model_name / "config.pbtxt").read_text()
    match = re.search(r'key: "weights" value: \{ string_value: "([^"]+)" \}', config)
    if match is None:
        raise ValueError(f"{model_name} has no weights parameter")
    model = load_classifier(repository / model_name / match.group(1))
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return model


def _superpixels(height: int, width: int) -> torch.Tensor:
    rows = torch.arange(height) // SUPERPIXEL
    cols = torch.arange(width) // SUPERPIXEL
    grid = rows[:, None] * ((width + SUPERPIXEL - 1) // SUPERPIXEL) + cols[None, :]
    return grid.expand(3, height, width)[None]


def _grad_cam(model: SmallCNN, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    last_conv = model.features[-1][0]
    cam = LayerGradCam(model, last_conv).attribute(x, target=target, relu_attributions=True)
    return LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")


def _integrated_gradients(model: SmallCNN, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Baseline 0 in normalised space: a mid-grey image.
    return IntegratedGradients(model).attribute(
        x, target=target, n_steps=IG_STEPS, internal_batch_size=256
    )


def _occlusion(model: SmallCNN, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return Occlusion(model).attribute(
        x,
        target=target,
        sliding_window_shapes=(3, OCCLUSION_WINDOW, OCCLUSION_WINDOW),
        strides=(3, OCCLUSION_STRIDE, OCCLUSION_STRIDE),
        perturbations_per_eval=64,
    )


def _deep_lift(model: SmallCNN, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return DeepLift(model).attribute(x, target=target)


def _per_image(explainer: type[Lime] | type[KernelShap]) -> Method:
    """LIME and Kernel SHAP fit one surrogate per image."""

    def method(model: SmallCNN, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = _superpixels(*x.shape[-2:])
        attribution = explainer(model)
        return torch.cat(
            [
                attribution.attribute(
                    x[i : i + 1],
                    target=target[i : i + 1],
                    feature_mask=mask,
                    n_samples=SURROGATE_SAMPLES,
                    perturbations_per_eval=50,
                )
                for i in range(len(x))
            ]
        )

    return method


METHODS: dict[str, Method] = {
    "Grad-CAM": _grad_cam,
    "Integrated Gradients": _integrated_gradients,
    "Occlusion": _occlusion,
    "LIME": _per_image(Lime),
    "Kernel SHAP": _per_image(KernelShap),
    "DeepLift": _deep_lift,
}


def attribution_maps(
    method: str, model: SmallCNN, images: np.ndarray, targets: np.ndarray, batch: int = 32
) -> np.ndarray:
    """[B, H, W] maps of `method` for uint8 [B, H, W, 3] images and their target classes."""
    maps = []
    for start in range(0, len(images), batch):
        x = normalise_uint8_hwc(images[start : start + batch])
        target = torch.as_tensor(targets[start : start + batch], dtype=torch.long)
        attribution = METHODS[method](model, x, target)
        maps.append(attribution.detach().sum(dim=1).numpy())
    return np.concatenate(maps)


def map_change(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The paper's baseline predictor: mean squared difference of the maps, per image."""
    return np.mean((after - before) ** 2, axis=(-2, -1))
