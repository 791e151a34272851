"""The sampled margin's attack (bounds.py): on a network whose only adversarial region
is a corner of the box, uniform points miss it and the attack finds it, still below the
verified bound; the same seed gives the same points; a cancelled request stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from propscope_server.open_contract import BOUND_CROWN
from propscope_server.triton_models.classifiers.bounds import BoundedNetwork, Cancelled
from tests.unit.test_bounds import bound_inputs
from tests.unit.test_open_model import (  # noqa: F401 (synthetic_model is a fixture)
    FakeRequest,
    outputs,
    synthetic_model,
)

SHAPE = (3, 4, 4)
ELEMENTS = 48


class CornerOnly(nn.Module):
    """f_1 - f_0 = s - 45 + 20 relu(s - 44), s the sum of the inputs: positive only
    where s > 44.05, a corner of [-1, 1]^48 that uniform points (s of std 4) never
    reach; its gradient leads there from anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.hidden = nn.Linear(ELEMENTS, 2)
        self.relu = nn.ReLU()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.hidden.weight.fill_(1.0)
            self.hidden.bias.copy_(torch.tensor([100.0, -44.0]))
            self.head.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 20.0]]))
            self.head.bias.copy_(torch.tensor([0.0, -145.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.hidden(self.flat(x))))


def rows(bounded: BoundedNetwork, samples: int, seed: int = 0, layer: int = -1, **options):
    centre = torch.zeros(1, *SHAPE)
    return bounded.margins(
        centre - 1, centre + 1, centre, [0], [BOUND_CROWN], [layer], [samples], [seed], **options
    )


def test_the_attack_finds_a_corner_the_uniform_points_miss():
    network = CornerOnly().eval()
    bounded = BoundedNetwork(network, torch.zeros(1, *SHAPE), ("hidden",))
    uniform = 2 * torch.rand(8192, *SHAPE, generator=torch.Generator().manual_seed(1)) - 1
    with torch.no_grad():
        scores = network(uniform)
    assert float((scores[:, 1] - scores[:, 0]).max()) < -20  # uniform points miss it
    bound, sampled = rows(bounded, samples=8)
    assert float(sampled[0, 1]) == pytest.approx(48 - 45 + 20 * 4)  # the corner itself
    assert float(sampled[0, 1]) <= float(bound[0, 1]) + 1e-4
    again_bound, again_sampled = rows(bounded, samples=8)
    assert torch.equal(sampled, again_sampled) and torch.equal(bound, again_bound)
    # A row without samples runs no attack: the centre's margin only.
    _, centre_only = rows(bounded, samples=0)
    assert float(centre_only[0, 1]) == pytest.approx(-45.0)


def test_a_hybrid_box_holds_the_attack_points():
    bounded = BoundedNetwork(CornerOnly().eval(), torch.zeros(1, *SHAPE), ("hidden",))
    hybrid, sampled = rows(bounded, samples=4, layer=0)
    # The layer's box reaches the corner's s = 48, so the hybrid bound covers it.
    assert float(sampled[0, 1]) == pytest.approx(83.0)
    assert float(sampled[0, 1]) <= float(hybrid[0, 1]) + 1e-4


def test_a_cancelled_request_stops_between_batches():
    bounded = BoundedNetwork(CornerOnly().eval(), torch.zeros(1, *SHAPE))
    asked = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(Cancelled):
        rows(bounded, samples=256, cancelled=cancelled)
    assert len(asked) == 3


class CancellableRequest(FakeRequest):
    """A request whose caller cancels after the model has asked `after` times (Triton
    2.51's InferenceRequest.is_cancelled)."""

    def __init__(self, inputs, requested, after: int) -> None:
        super().__init__(inputs, requested)
        self.after, self.asked = after, 0

    def is_cancelled(self) -> bool:
        self.asked += 1
        return self.asked > self.after


def test_the_triton_adapter_stops_a_cancelled_bound_request(synthetic_model):  # noqa: F811
    model = synthetic_model("synth_patch")
    image = np.full((2, 64, 64, 3), 128, np.uint8)
    inputs = {"IMAGE": image, **bound_inputs(2, 64 * 64 * 3, radius=4.0, samples=256)}
    asked = ["LOGITS", "BOUND_MARGIN", "SAMPLED_MARGIN"]
    (response,) = model.execute([CancellableRequest(inputs, asked, after=3)])
    assert response.error == "synth_patch: the bound request was cancelled"
    going = CancellableRequest(inputs, asked, after=10**6)
    served = outputs(model.execute([going])[0])
    assert served["SAMPLED_MARGIN"].shape == (2, 2)
    # Asked per chunk, per sample batch (4 a row) and per attack step (21 a row).
    assert going.asked == 1 + 2 * (4 + 21)
