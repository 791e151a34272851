"""A fixed classifier that sees only the image's bottom-right corner, for
calibrating the permutation test.

Its output is a known function of 8x8 pixels that no object of the synthetic
world reaches, so (a) an edit elsewhere provably cannot move it, and (b) when
only the corner's random texture changes along a path, its prediction curve is
exchangeable: the test's p-values must then be uniform.
"""

from __future__ import annotations

import torch
from torch import nn

CORNER = 8
# Logit of class 1 per unit of the corner's normalised mean: random corner
# texture moves the probability by about 0.2, a plain corner saturates it.
GAIN = 10.0


class CornerProbe(nn.Module):
    """Input: normalised FP32 NCHW. Output: logits [B, 2] = [0, GAIN * corner mean]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[:, :, -CORNER:, -CORNER:].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(corner), GAIN * corner], dim=1)
