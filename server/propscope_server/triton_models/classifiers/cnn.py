"""The small CNN of the synthetic world, shared by training, Triton and tests.

One module holds the architecture and the normalisation so that the weights
trained offline and the model served by Triton cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

# Per-channel, applied after scaling to [0, 1]; callers of the fp32 model input
# must use the same constants.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
NUM_CLASSES = 2


def _block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SmallCNN(nn.Module):
    """Circle-vs-square classifier, small enough to train in a minute on two cores.

    Input: normalised FP32 NCHW [B, 3, 64, 64]. Output: logits [B, 2].
    Global average pooling keeps it indifferent to where the object sits, so
    a corner patch can only matter if training made it matter.
    """

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(_block(3, c1), _block(c1, c2), _block(c2, c3))
        self.head = nn.Linear(c3, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        return self.head(features.mean(dim=(2, 3)))


def normalise_uint8_hwc(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] (what the renderer and the wire carry) -> normalised FP32 NCHW.

    Kept in one place so the uint8 and fp32 Triton entries give identical logits.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [B, H, W, 3], got {images.dtype} {images.shape}")
    return normalise_pixels_hwc(torch.from_numpy(np.ascontiguousarray(images)).float())


def normalise_pixels_hwc(pixels: torch.Tensor) -> torch.Tensor:
    """FP32 pixel values [B, H, W, 3] (any in [0, 255], not only integers: the ends of a
    bound box) -> normalised FP32 NCHW, by the same arithmetic as normalise_uint8_hwc."""
    tensor = pixels.permute(0, 3, 1, 2)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((tensor / 255.0 - mean) / std).contiguous()


def load_classifier(path: Path) -> SmallCNN:
    """Load a state_dict saved by the training script; weights_only so a weights
    file can never run code inside the server."""
    model = SmallCNN()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    return model
