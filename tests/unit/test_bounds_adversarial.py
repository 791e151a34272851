"""Bound propagation (bounds.py) against the constructs most likely to break it: every
option of the supported layers, branch arithmetic, in-place operations, reused modules,
extreme radii; each bound checked against a float64 attack (random points, vertices,
signed-gradient ascent) in the same box, and every unsupported construct refused by
name."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from propscope_server.open_contract import BOUND_CROWN, BOUND_IBP, BOUND_UNSUPPORTED
from propscope_server.triton_models.classifiers.bounds import BoundedNetwork, _maxpool_backward
from propscope_server.triton_models.classifiers.open_model import Layer, OpenModel

# The bounds are float32 without outward rounding; the attack runs in float64.
SLACK = 1e-4


def randomised(network: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights; batch norm with negative scales and shifted statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in network.state_dict().items():
            if name.endswith("running_var"):
                value.copy_(0.5 + torch.rand(value.shape, generator=generator))
            elif name.endswith(("running_mean", "bias")):
                value.copy_(0.3 * torch.randn(value.shape, generator=generator))
            elif name.endswith("weight") and value.ndim == 1:
                value.copy_(torch.randn(value.shape, generator=generator))
            elif value.is_floating_point() and value.ndim > 1:
                value.copy_(torch.randn(value.shape, generator=generator) / value[0].numel() ** 0.5)
    return network.eval()


def worst_margins(
    network: nn.Module, lower: torch.Tensor, upper: torch.Tensor, target: int
) -> torch.Tensor:
    """The largest f_c - f_y an attack finds in [lower, upper] (float64, [K])."""
    generator = torch.Generator().manual_seed(1)
    shape = (128, *lower.shape)
    width = upper - lower
    uniform = lower + width * torch.rand(shape, generator=generator, dtype=torch.float64)
    vertices = torch.where(torch.rand(shape, generator=generator) < 0.5, lower, upper)
    with torch.no_grad():
        scores = network(torch.cat([uniform, vertices]))
        best = (scores - scores[:, target : target + 1]).amax(0)
    for c in range(best.shape[0]):
        if c == target:
            continue
        point = uniform[:4].clone().requires_grad_(True)
        for _ in range(10):
            scores = network(point)
            (gradient,) = torch.autograd.grad((scores[:, c] - scores[:, target]).sum(), point)
            with torch.no_grad():
                point = torch.clamp(point + 0.25 * width * gradient.sign(), lower, upper)
            point.requires_grad_(True)
        with torch.no_grad():
            scores = network(point)
            best[c] = torch.maximum(best[c], (scores[:, c] - scores[:, target]).max())
    return best


def bounds(
    bounded: BoundedNetwork,
    lower: torch.Tensor,
    upper: torch.Tensor,
    centre: torch.Tensor,
    target: int,
    method: int,
) -> torch.Tensor:
    margin, _ = bounded.margins(lower, upper, centre, [target], [method], [-1], [0], [0])
    return margin[0]


def seq(*modules: nn.Module) -> nn.Sequential:
    return nn.Sequential(*modules)


class Branches(nn.Module):
    """Two bounded branches combined by `combine`."""

    def __init__(self, combine) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 25, 3)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.combine(torch.relu(self.a(x)), torch.relu(self.b(x))).flatten(1))


class InPlaceResidual(nn.Module):
    """out += x, then in-place ReLUs (module and functional), then a ReLU twice."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.inplace = inplace
        self.head = nn.Linear(75, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out += x
        out = F.relu(self.relu(out), inplace=self.inplace)
        return self.head(torch.relu(torch.relu(out)).flatten(1))


class Reused(nn.Module):
    """One convolution called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(75, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(torch.relu(self.conv(x)))).view(-1, 75))


class Means(nn.Module):
    """Means over other dims, keepdim, flatten from dim 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).mean(dim=1, keepdim=True).flatten(2)
        return self.head(y.view(y.size(0), 5, 5).mean(1))


SOUND = {
    "conv stride dilation groups, no biases": (
        seq(
            nn.Conv2d(4, 6, 3, stride=2, dilation=2, groups=2, padding=2, bias=False),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(150, 3, bias=False),
        ),
        (4, 9, 9),
    ),
    **{
        f"conv {mode} padding": (
            seq(
                nn.Conv2d(3, 4, 3, padding=1, padding_mode=mode),
                nn.ReLU(),
                nn.Flatten(),
                nn.Linear(4 * 36, 3),
            ),
            (3, 6, 6),
        )
        for mode in ("reflect", "replicate", "circular")
    },
    "batch norm 2d, negative scales, a Dropout2d module": (
        seq(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Dropout2d(0.5),
            nn.Flatten(),
            nn.Linear(64, 3),
        ),
        (3, 6, 6),
    ),
    "batch norm 1d": (
        seq(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)),
        (3, 2, 2),
    ),
    "max pool padding ceil mode": (
        seq(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(64, 3),
        ),
        (3, 7, 7),
    ),
    "max pool dilation, overlapping windows": (
        seq(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=1, padding=1),
            nn.MaxPool2d(2, stride=1, dilation=2),
            nn.Flatten(),
            nn.Linear(100, 3),
        ),
        (3, 7, 7),
    ),
    "avg pool padding, count_include_pad False, ceil mode": (
        seq(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            nn.Flatten(),
            nn.Linear(64, 3),
        ),
        (3, 7, 7),
    ),
    "avg pool negative divisor_override": (
        seq(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.AvgPool2d(2, divisor_override=-3),
            nn.Flatten(),
            nn.Linear(36, 3),
        ),
        (3, 6, 6),
    ),
    "adaptive avg pool 7 -> 3": (
        seq(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(3),
            nn.Flatten(),
            nn.Linear(36, 3),
        ),
        (3, 7, 7),
    ),
    "x - y of two branches": (Branches(lambda x, y: x - y), (3, 5, 5)),
    "torch.sub(y, x) then negative mul and div": (
        Branches(lambda x, y: torch.sub(y, x) * -2.0 / -0.5 - 1.0),
        (3, 5, 5),
    ),
    "constant minus a branch, division by a negative": (
        Branches(lambda x, y: (1.0 - x) / -3.0 + y),
        (3, 5, 5),
    ),
    "residual in-place add and ReLUs, ReLU twice": (InPlaceResidual(), (3, 5, 5)),
    "a module called twice": (Reused(), (3, 5, 5)),
    "in-place methods: add_, mul_, relu_": (
        Branches(lambda x, y: x.clone().add_(y).mul_(-0.5).relu_() + F.relu_(y - 0.1)),
        (3, 5, 5),
    ),
    "means over other dims, keepdim, flatten(2)": (Means(), (3, 5, 5)),
    "negation, sums over other dims, dropouts in eval": (
        Branches(
            lambda x, y: (
                -F.dropout(x, 0.3, False)
                + F.dropout2d(y, 0.5, False).sum(dim=1, keepdim=True)
                - torch.sum(F.alpha_dropout(y, 0.2), 2, keepdim=True)
            )
        ),
        (3, 5, 5),
    ),
    "functional pools": (
        Branches(
            lambda x, y: (
                F.max_pool2d(x, 3, 1, 1)
                + F.avg_pool2d(y, 3, stride=1, padding=1, divisor_override=-2)
                - F.adaptive_avg_pool2d(x, 5)
            )
        ),
        (3, 5, 5),
    ),
    "permute and transpose keeping the batch first": (
        Branches(lambda x, y: x.permute(0, 1, 3, 2) - torch.transpose(y, -1, 2).contiguous()),
        (3, 5, 5),
    ),
}


@pytest.mark.parametrize("name", list(SOUND))
def test_no_attack_exceeds_the_bound(name):
    network, shape = SOUND[name]
    network = randomised(network)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, *shape, generator=generator)
    held = torch.rand(1, *shape, generator=generator) < 0.3
    radius = 0.5 * torch.rand(1, *shape, generator=generator) * ~held
    bounded = BoundedNetwork(network, x)
    bounded.check(-1)
    reference = copy.deepcopy(network).double()
    if isinstance(reference, InPlaceResidual):
        reference = randomised(InPlaceResidual(inplace=False)).double()  # autograd-safe twin
    with torch.no_grad():
        target = int(reference(x.double()).argmax())
    lower, upper = x - radius, x + radius
    worst = worst_margins(reference, lower[0].double(), upper[0].double(), target)
    ibp = bounds(bounded, lower, upper, x, target, BOUND_IBP).double()
    crown = bounds(bounded, lower, upper, x, target, BOUND_CROWN).double()
    assert (crown <= ibp + SLACK).all()
    assert (worst <= crown + SLACK * (1 + worst.abs())).all(), (worst, crown)


class Batch(nn.Module):
    """x - x.mean(0): with 3 channels the trace's batch of 3 keeps its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(75, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x - x.mean(0)).flatten(1))


class Moves(nn.Module):
    """A reordering of [B, 3, 5, 5] that the trace's batch of 3 lets through."""

    def __init__(self, reorder) -> None:
        super().__init__()
        self.head = nn.Linear(75, 3)
        self.reorder = reorder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.reorder(x).flatten(1))


REFUSED = {
    "max pool return_indices": (
        seq(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2, return_indices=True)),
        "layer '1' (torch.nn.MaxPool2d) with return_indices=True",
    ),
    "product of two branches": (Branches(lambda x, y: x * y), "function 'mul'"),
    "a square": (Branches(lambda x, y: x * x), "function 'mul'"),
    "division by a branch": (Branches(lambda x, y: x / (y + 1)), "function 'truediv'"),
    "concatenation": (Branches(lambda x, y: torch.cat([x[:, :2], y[:, :2]], 1)), "'getitem'"),
    "permute moving the batch": (
        Moves(lambda x: x.permute(1, 0, 2, 3)),
        "permute(1, 0, 2, 3) at node 'permute': it moves the batch dimension",
    ),
    "transpose moving the batch": (
        Moves(lambda x: torch.transpose(x, 1, -4)),
        "transpose(1, -4) at node 'transpose': it moves the batch dimension",
    ),
    "functional max pool returning indices": (
        Moves(lambda x: F.max_pool2d(x, 1, return_indices=True)[0]),
        "function 'max_pool2d_with_indices'",
    ),
    "adaptive max pool": (
        seq(nn.Conv2d(3, 4, 3), nn.AdaptiveMaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)),
        "layer '1' (torch.nn.AdaptiveMaxPool2d)",
    ),
    "batch norm without running statistics": (
        seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten()),
        "layer '1' (torch.nn.BatchNorm2d) without running statistics",
    ),
    "float64 weights": (
        seq(nn.Flatten(), nn.Linear(75, 3)).double(),
        "torch.float64 weights ('1.weight')",
    ),
    "a mean over the batch": (Batch(), "depend on the other samples of its batch"),
    "an in-place edit another node reads": (
        Moves(lambda x: (lambda h: h - h.add_(1.0))(x * 1.0)),
        "the traced graph's scores differ from the network's",
    ),
    "a dropout in training": (
        Moves(lambda x: F.dropout(x, 0.5, True)),
        "function 'dropout'",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_an_unsupported_construct_is_refused_by_name(name):
    network, named = REFUSED[name]
    bounded = BoundedNetwork(network.eval(), torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match=f"^{BOUND_UNSUPPORTED}") as refused:
        bounded.check(-1)
    assert named in str(refused.value)


def test_a_box_too_wide_for_float32_bounds_nothing_rather_than_nan():
    """inf - inf is NaN; a -inf lower bound in a padded max pool window must not pick
    the padding."""
    network = randomised(
        seq(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Flatten(),
            nn.Linear(36, 3),
        )
    )
    x = torch.randn(1, 3, 6, 6)
    bounded = BoundedNetwork(network, x)
    radius = torch.full_like(x, 3e38)
    for method in (BOUND_IBP, BOUND_CROWN):
        margin = bounds(bounded, x - radius, x + radius, x, 0, method)
        assert margin[0] == 0 and not margin.isnan().any()
        assert (margin[1:] == math.inf).all()


def test_bounds_of_a_refused_network_raise_its_refusal():
    bounded = BoundedNetwork(seq(nn.Flatten(), nn.Softmax(1)), torch.zeros(1, 3, 5, 5))
    x = torch.zeros(1, 3, 5, 5)
    with pytest.raises(ValueError, match="layer '1' \\(torch.nn.Softmax\\)"):
        bounds(bounded, x, x, x, 0, BOUND_IBP)


class PixelsHwc(nn.Module):
    """An own model taking uint8 [B, H, W, 3] and normalising it itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.25
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_an_own_uint8_models_box_is_clipped_to_pixel_values_and_sound():
    """The own-model adapter's box: the pixels +- r clipped to [0, 255] in the input's
    own layout (HWC here), then the model's own normalisation."""
    network = randomised(PixelsHwc())
    layers = (Layer("conv", 4),)
    model = OpenModel(network, layers, torch.zeros(1, 6, 6, 3, dtype=torch.uint8), name="own")
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randint(0, 256, (1, 6, 6, 3), generator=generator, dtype=torch.uint8)
    pixels[0, :3] = 0  # clipping matters: half the image black, the rest anywhere
    radius = np.full((1, 6 * 6 * 3), 40.0, np.float32)
    with torch.no_grad():
        target = int(network(pixels.float()).argmax())
    request = {
        "BOUND_RADIUS": radius,
        **{
            name: np.array([[value]], np.int32)
            for name, value in (
                ("BOUND_CLASS", target), ("BOUND_METHOD", BOUND_CROWN), ("BOUND_LAYER", -1),
                ("BOUND_SAMPLES", 0), ("BOUND_SEED", 0),
            )
        },
    }  # fmt: skip
    bound = model(pixels, request, ["BOUND_MARGIN"])["BOUND_MARGIN"][0]
    values = pixels[0].double()
    lower, upper = (values - 40).clamp(0, 255), (values + 40).clamp(0, 255)
    worst = worst_margins(copy.deepcopy(network).double(), lower, upper, target)
    assert (worst <= torch.from_numpy(bound).double() + SLACK * (1 + worst.abs())).all()
    unclipped, _ = model.bounded.margins(
        pixels.float() - 40, pixels.float() + 40, pixels.float(), [target], [BOUND_CROWN],
        [-1], [0], [0],
    )  # fmt: skip
    assert (torch.from_numpy(bound) <= unclipped[0] + SLACK).all()
    assert (torch.from_numpy(bound) < unclipped[0] - 1e-3).any()  # the clip tightened it


class Forked(nn.Module):
    """A stem read by a convolution and by the residual add; a leaf ReLU module."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(100, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.conv(x)
        out += x
        return self.head(self.relu(out).flatten(1))


@pytest.mark.parametrize(
    ("network", "layers", "nodes"),
    [
        (Forked(), ["stem", "stem.0", "stem.1", "conv", "relu"], ["stem_1", "stem_0", "stem_1", "conv", "relu"]),
        (Reused(), ["conv"], ["conv_1"]),  # the module's last call, as its forward hook sees it
    ],
)  # fmt: skip
def test_a_hybrid_layer_maps_to_its_modules_output_and_encloses_its_samples(network, layers, nodes):
    network = randomised(network)
    x = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(4))
    bounded = BoundedNetwork(network, x, layers)
    assert bounded.layer_nodes == nodes
    radius = torch.full_like(x, 0.3)
    for layer in range(len(layers)):
        for method in (BOUND_IBP, BOUND_CROWN):
            bound, sampled = bounded.margins(
                x - radius, x + radius, x, [0], [method], [layer], [64], [0]
            )
            assert (sampled <= bound + SLACK).all()


def test_a_network_in_train_mode_is_bounded_as_the_eval_network_it_serves():
    network = seq(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
        nn.Linear(36, 3),
    )  # fmt: skip
    network = randomised(network).train()
    x = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(5))
    bounded = BoundedNetwork(network, x)
    assert not network.training and bounded.refusal == ""
    radius = torch.full_like(x, 0.2)
    with torch.no_grad():
        target = int(network(x).argmax())
    worst = worst_margins(copy.deepcopy(network).double(), (x - radius)[0].double(), (x + radius)[0].double(), target)  # fmt: skip
    crown = bounds(bounded, x - radius, x + radius, x, target, BOUND_CROWN).double()
    assert (worst <= crown + SLACK * (1 + worst.abs())).all()


def test_an_input_of_another_size_than_the_load_trace_is_bounded_soundly():
    """A model with -1 dims gets images of any size: its bound trace is redone per size
    (the load-time trace's reshapes and CROWN's adjoints hold the dry input's shapes)."""
    network = randomised(
        seq(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 3),
        )
    )
    model = OpenModel(network, (Layer("1", 4),), torch.zeros(1, 3, 8, 8), name="sized")
    x = torch.randn(1, 3, 10, 7, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        target = int(network(x).argmax())
    request = {
        "BOUND_RADIUS": np.full((1, 3 * 10 * 7), 0.2, np.float32),
        **{
            name: np.array([[value]], np.int32)
            for name, value in (
                ("BOUND_CLASS", target), ("BOUND_METHOD", BOUND_CROWN), ("BOUND_LAYER", -1),
                ("BOUND_SAMPLES", 0), ("BOUND_SEED", 0),
            )
        },
    }  # fmt: skip
    bound = torch.from_numpy(model(x, request, ["BOUND_MARGIN"])["BOUND_MARGIN"][0]).double()
    worst = worst_margins(copy.deepcopy(network).double(), (x - 0.2)[0].double(), (x + 0.2)[0].double(), target)  # fmt: skip
    assert (worst <= bound + SLACK * (1 + worst.abs())).all()


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, stride=1, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.MaxPool2d(2, stride=1, dilation=2),
        nn.MaxPool2d(2),
    ],
)
def test_the_max_pool_relaxation_holds_at_every_point_of_the_box(pool):
    """CROWN's max pool step alone: a . maxpool(x) <= a_in . x + bias for every x in
    [l, u] (random points and vertices), with windows overlapping and padded, and
    some inputs dominating their windows (the exact case)."""
    generator = torch.Generator().manual_seed(7)
    lower = torch.randn(2, 3, 6, 6, generator=generator)
    upper = lower + torch.rand(2, 3, 6, 6, generator=generator) * (
        torch.rand(2, 3, 6, 6, generator=generator) < 0.7
    )
    lower[:, :, ::3, ::3] += 4.0  # dominating inputs
    upper[:, :, ::3, ::3] += 4.0
    output = pool(lower)
    a = torch.randn(2, *output.shape[1:], generator=generator)
    a_in, bias = _maxpool_backward(a, lower, upper, pool)
    shape = (256, *lower.shape)
    width = upper - lower
    points = torch.cat(
        [
            lower + width * torch.rand(shape, generator=generator),
            torch.where(torch.rand(shape, generator=generator) < 0.5, lower, upper),
        ]
    )
    exact = (a * pool(points.flatten(0, 1)).view(512, *a.shape)).flatten(2).sum(2)
    linear = (a_in * points).flatten(2).sum(2) + bias
    assert (exact <= linear + SLACK).all()
