"""The example team's network, as a team would keep it: plain torch, nothing of propscope.

own_state_dict's config names it ("own_network:OwnCNN"); the model folder is on
sys.path inside Triton, so this file beside config.pbtxt is importable.
"""

from __future__ import annotations

import torch
from torch import nn


class OwnCNN(nn.Module):
    """Circle-vs-square CNN taking ImageNet-normalised FP32 NCHW [B, 3, 64, 64].

    Output: logits [B, num_classes], or probabilities when `softmax` is set. The
    buffers `input_scale` and `input_shift` map the caller's normalisation onto the
    one the convolutions were trained with; they travel in the state_dict.
    """

    def __init__(
        self,
        channels: tuple[int, int, int] = (16, 32, 64),
        num_classes: int = 2,
        softmax: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = 3
        for width in channels:
            layers.append(
                nn.Sequential(
                    nn.Conv2d(previous, width, kernel_size=3, padding=1),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes)
        self.softmax = softmax
        self.register_buffer("input_scale", torch.ones(1, 3, 1, 1))
        self.register_buffer("input_shift", torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_scale + self.input_shift
        logits = self.head(self.features(x).mean(dim=(2, 3)))
        return logits.softmax(dim=1) if self.softmax else logits
