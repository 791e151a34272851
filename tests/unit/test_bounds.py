"""Bound propagation (triton_models/classifiers/bounds.py): every bound checked against
the worst margin an attack finds in the same box (random points, the box's vertices and
projected gradient ascent), on small random networks of every supported layer and on the
real SmallCNN and the integration tests' TinyResNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from propscope_server.open_contract import BOUND_CROWN, BOUND_IBP, BOUND_UNSUPPORTED
from propscope_server.triton_models.classifiers.bounds import BoundedNetwork
from propscope_server.triton_models.classifiers.cnn import load_classifier, normalise_uint8_hwc
from propscope_server.triton_models.classifiers.open_model import Layer, OpenModel
from tests.integration import open_resnet
from tests.unit.test_open_model import (  # noqa: F401 (synthetic_model is a fixture)
    ROOT,
    FakeRequest,
    column,
    outputs,
    synthetic_model,
)

# Float32 sums in a different order than the network's: the bound may sit this far
# below the true worst case without being wrong beyond rounding.
ROUNDING = 1e-4


class Convolutional(nn.Module):
    """Input affine by buffers, conv/bn/relu, overlapping padded max pooling, a
    strided conv, average pooling, a reshape by the input's size, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([0.5, 2.0, -1.0]).view(1, 3, 1, 1))
        self.register_buffer("shift", torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2)
        self.average = nn.AvgPool2d(2)
        self.head = nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        x = self.average(nn.functional.relu(self.conv2(x)))
        return self.head(x.view(x.size(0), -1))


class Residual(nn.Module):
    """A residual block (in-place add and ReLU modules), a mean, a dropout, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True))
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.bn(self.conv(x))
        out += x
        out = self.pool(self.relu(out)) - 0.1
        return self.head(self.drop(out.mean(dim=(2, 3))) / 2)


class Linear(nn.Module):
    """No nonlinearity: the bound's worst case is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flat(self.pool(self.conv(x))) * 3.0)


def randomised(network: nn.Module, seed: int) -> nn.Module:
    """Seeded weights, batch-norm statistics away from the identity, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in network.state_dict().items():
            if name.endswith("running_var"):
                value.copy_(0.5 + torch.rand(value.shape, generator=generator))
            elif name.endswith("running_mean") or name.endswith("bias"):
                value.copy_(0.2 * torch.randn(value.shape, generator=generator))
            elif value.is_floating_point() and value.ndim > 1:
                value.copy_(torch.randn(value.shape, generator=generator) / value[0].numel() ** 0.5)
    return network.eval()


def attack(
    network: nn.Module, x: torch.Tensor, radius: torch.Tensor, target: int, seed: int
) -> torch.Tensor:
    """The largest f_c - f_y found in [x - r, x + r] ([K]): random points, random
    vertices, and signed-gradient ascent on each class's margin from a few starts."""
    generator = torch.Generator().manual_seed(seed)
    shape = (256, *x.shape)
    uniform = x + radius * (2 * torch.rand(shape, generator=generator) - 1)
    signs = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    with torch.no_grad():
        scores = network(torch.cat([uniform, x + radius * signs]))
        best = (scores - scores[:, target : target + 1]).amax(0)
    for c in range(best.shape[0]):
        if c == target:
            continue
        point = (uniform[:4] + 0).requires_grad_(True)
        for _ in range(12):
            scores = network(point)
            (gradient,) = torch.autograd.grad((scores[:, c] - scores[:, target]).sum(), point)
            with torch.no_grad():
                point = torch.clamp(point + 0.4 * radius * gradient.sign(), x - radius, x + radius)
            point.requires_grad_(True)
        with torch.no_grad():
            scores = network(point)
            best[c] = max(best[c], (scores[:, c] - scores[:, target]).max())
    return best.detach()


def margins(bounded: BoundedNetwork, x: torch.Tensor, radius: torch.Tensor, method: int, **row):
    """One row's BOUND_MARGIN and SAMPLED_MARGIN ([K] each)."""
    bound, sampled = bounded.margins(
        (x - radius)[None],
        (x + radius)[None],
        x[None],
        [row.get("target", 0)],
        [method],
        [row.get("layer", -1)],
        [row.get("samples", 0)],
        [row.get("seed", 0)],
    )
    return bound[0], sampled[0]


@pytest.mark.parametrize("make", [Convolutional, Residual], ids=["conv", "residual"])
@pytest.mark.parametrize("scale", [0.05, 0.5])
def test_bounds_are_never_below_an_attack(make, scale):
    torch.manual_seed(0)
    network = randomised(make(), seed=1)
    bounded = BoundedNetwork(network, torch.zeros(1, 3, 12, 12))
    assert bounded.refusal == ""
    for trial in range(2):
        generator = torch.Generator().manual_seed(10 + trial)
        x = torch.randn(3, 12, 12, generator=generator)
        radius = scale * torch.rand(3, 12, 12, generator=generator)
        radius[:, :4] = 0.0  # some elements held fixed, as EVA's rows do
        target = trial
        ibp, _ = margins(bounded, x, radius, BOUND_IBP, target=target)
        crown, sampled = margins(bounded, x, radius, BOUND_CROWN, target=target, samples=32)
        found = attack(network, x, radius, target, seed=trial)
        assert (found <= crown + ROUNDING).all() and (found <= ibp + ROUNDING).all()
        assert (crown <= ibp + ROUNDING).all() and (crown < ibp).any()
        assert (sampled <= crown + ROUNDING).all()
        assert crown[target] == ibp[target] == sampled[target] == 0.0


def test_a_linear_networks_crown_bound_is_its_exact_worst_case():
    network = randomised(Linear(), seed=2)
    bounded = BoundedNetwork(network, torch.zeros(1, 3, 8, 8))
    x = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(3))
    radius = torch.full_like(x, 0.2)
    jacobian = torch.autograd.functional.jacobian(lambda v: network(v[None])[0], x)
    with torch.no_grad():
        scores = network(x[None])[0]
    target = 1
    direction = jacobian - jacobian[target]  # d(f_c - f_y)/dx, [K, 3, 8, 8]
    exact = scores - scores[target] + (direction.abs() * radius).flatten(1).sum(1)
    crown, _ = margins(bounded, x, radius, BOUND_CROWN, target=target)
    ibp, _ = margins(bounded, x, radius, BOUND_IBP, target=target)
    torch.testing.assert_close(crown, exact, rtol=1e-5, atol=1e-4)
    # IBP bounds f_c and f_y apart (u_c - l_y): sound, looser on the margin.
    assert (ibp >= exact - ROUNDING).all() and (ibp > exact + 0.01)[[0, 2]].all()


def test_radius_zero_gives_the_margin_at_the_input():
    network = randomised(Residual(), seed=4)
    bounded = BoundedNetwork(network, torch.zeros(1, 3, 12, 12))
    x = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        scores = network(x[None])[0]
    for method in (BOUND_IBP, BOUND_CROWN):
        bound, sampled = margins(bounded, x, torch.zeros_like(x), method, target=2, samples=3)
        torch.testing.assert_close(bound, scores - scores[2], rtol=0, atol=1e-5)
        torch.testing.assert_close(sampled, scores - scores[2], rtol=0, atol=1e-5)


class Unsupported(nn.Module):
    def __init__(self, last: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.squash = last
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.squash(self.body(x)).mean(dim=(2, 3)))


class Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.body(x))


def test_an_unsupported_layer_is_named_and_the_model_still_serves():
    network = Unsupported(nn.Sigmoid()).eval()
    layers = (Layer("body", 4), Layer("squash", 4))
    model = OpenModel(network, layers, torch.zeros(1, 3, 6, 6), name="m")
    with pytest.raises(ValueError) as refused:
        model.bounded.check(-1)
    assert str(refused.value) == (
        f"{BOUND_UNSUPPORTED}layer 'squash' (torch.nn.Sigmoid); supported: Conv2d (any "
        "padding mode), Linear, BatchNorm1d/2d (eval, running statistics), ReLU, MaxPool2d, "
        "AvgPool2d, AdaptiveAvgPool2d (modules or functions), mean, sum, flatten/view/"
        "reshape, permute/transpose (batch first), add/sub/mul/div by constants, negation, "
        "add/sub of two branches, dropout (eval); use a hybrid layer after it or expose the "
        "logits"
    )
    with pytest.raises(ValueError, match="'squash' \\(torch.nn.Sigmoid\\)"):
        model.bounded.check(0)  # before the sigmoid: still through it
    model.bounded.check(1)  # after it: supported
    x = torch.randn(2, 3, 6, 6)
    served = model(x, bound_inputs(2, 3 * 36, layer=1, samples=8), ["BOUND_MARGIN"])
    assert served["BOUND_MARGIN"].shape == (2, 2)
    with pytest.raises(ValueError, match="does not support layer 'squash'"):
        model(x, bound_inputs(2, 3 * 36), ["BOUND_MARGIN"])
    with torch.inference_mode():
        assert np.array_equal(model(x)["scores"], network(x).numpy())
    softmaxed = BoundedNetwork(Softmaxed().eval(), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="^bound propagation does not support layer 'softmax' "):
        softmaxed.check(-1)


def test_a_hybrid_bound_encloses_its_samples():
    network = randomised(Residual(), seed=6)
    layers = ("stem", "pool")
    bounded = BoundedNetwork(network, torch.zeros(1, 3, 12, 12), layers)
    assert bounded.layer_nodes == ["stem_1", "pool"]
    x = torch.randn(3, 12, 12, generator=torch.Generator().manual_seed(7))
    radius = torch.full_like(x, 0.3)
    verified, _ = margins(bounded, x, radius, BOUND_CROWN)
    for layer in range(len(layers)):
        hybrid, sampled = margins(bounded, x, radius, BOUND_CROWN, layer=layer, samples=64, seed=3)
        again, _ = margins(bounded, x, radius, BOUND_CROWN, layer=layer, samples=64, seed=3)
        assert torch.equal(hybrid, again)  # seeded: the same box every time
        assert (sampled <= hybrid + ROUNDING).all()
        # The sampled layer range lies inside the verified one.
        assert (hybrid <= verified + ROUNDING).all()


def bound_inputs(batch: int, size: int, **row) -> dict[str, np.ndarray]:
    return {
        "BOUND_RADIUS": np.full((batch, size), row.get("radius", 0.05), np.float32),
        "BOUND_CLASS": column([row.get("target", 0)] * batch),
        "BOUND_METHOD": column([row.get("method", BOUND_CROWN)] * batch),
        "BOUND_LAYER": column([row.get("layer", -1)] * batch),
        "BOUND_SAMPLES": column([row.get("samples", 0)] * batch),
        "BOUND_SEED": column([0] * batch),
    }


def test_the_small_cnn_is_bounded_soundly():
    network = load_classifier(ROOT / "deploy/triton/weights/patch_biased.pt")
    bounded = BoundedNetwork(network, torch.zeros(1, 3, 64, 64), ["features.2"])
    image = np.random.default_rng(1).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    x = normalise_uint8_hwc(image)[0]
    radius = torch.full_like(x, 2 / 255 / 0.25)  # 2 pixel values
    with torch.no_grad():
        target = int(network(x[None]).argmax())
    crown, _ = margins(bounded, x, radius, BOUND_CROWN, target=target)
    hybrid, sampled = margins(bounded, x, radius, BOUND_CROWN, target=target, layer=0, samples=16)
    found = attack(network, x, radius, target, seed=0)
    assert (found <= crown + ROUNDING).all() and (sampled <= hybrid + ROUNDING).all()


def test_the_tiny_resnet_is_bounded_soundly(tmp_path):
    folder = open_resnet.write_model(tmp_path)
    network = open_resnet.network(folder)
    bounded = BoundedNetwork(network, torch.zeros(1, 3, 32, 32), list(open_resnet.LAYERS))
    assert bounded.refusal == "" and None not in bounded.layer_nodes
    x = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(2))
    radius = torch.full_like(x, 0.02)
    crown, _ = margins(bounded, x, radius, BOUND_CROWN, target=1)
    ibp, _ = margins(bounded, x, radius, BOUND_IBP, target=1)
    found = attack(network, x, radius, 1, seed=1)
    assert (found <= crown + ROUNDING).all() and (crown <= ibp + ROUNDING).all()


def test_the_synthetic_adapter_clips_the_pixel_box(synthetic_model):  # noqa: F811
    """uint8 input: the box is the pixel values +- r clipped to [0, 255]; every
    integer image inside it scores a margin at most the bound."""
    model = synthetic_model("synth_patch")
    rng = np.random.default_rng(2)
    image = rng.choice(np.array([0, 3, 128, 252, 255], np.uint8), (1, 64, 64, 3))
    inputs = {"IMAGE": image, **bound_inputs(1, 64 * 64 * 3, radius=4.0, target=1, samples=8)}
    asked = ["LOGITS", "BOUND_MARGIN", "SAMPLED_MARGIN"]
    served = outputs(model.execute([FakeRequest(inputs, asked)])[0])
    assert list(served) == asked
    network = load_classifier(ROOT / "deploy/triton/weights/patch_biased.pt")
    shifts = rng.integers(-4, 5, (64, 64, 64, 3))
    moved = np.clip(image.astype(np.int64) + shifts, 0, 255).astype(np.uint8)
    with torch.no_grad():
        scores = network(normalise_uint8_hwc(moved)).numpy()
    assert (scores[:, 0] - scores[:, 1] <= served["BOUND_MARGIN"][0, 0] + ROUNDING).all()
    assert served["SAMPLED_MARGIN"][0, 0] <= served["BOUND_MARGIN"][0, 0] + ROUNDING
    at_zero = {**inputs, "BOUND_RADIUS": np.zeros((1, 64 * 64 * 3), np.float32)}
    exact = outputs(model.execute([FakeRequest(at_zero, asked)])[0])
    logits = exact["LOGITS"][0]
    np.testing.assert_allclose(exact["BOUND_MARGIN"][0], logits - logits[1], atol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"BOUND_RADIUS": np.zeros((1, 5), np.float32)},
         "BOUND_RADIUS has 5 values per sample; the image input has 12288"),
        ({"BOUND_RADIUS": np.full((1, 12288), -1.0, np.float32)},
         "BOUND_RADIUS holds negative, NaN or infinite values; give r >= 0"),
        ({"BOUND_CLASS": column([2])}, "BOUND_CLASS[0] is 2; the model outputs 2 classes (0..1)"),
        ({"BOUND_METHOD": column([3])}, "BOUND_METHOD[0] is 3; give 0 = ibp, 1 = crown"),
        ({"BOUND_LAYER": column([3])}, "BOUND_LAYER[0] is 3; layer indices are 0..2"),
        ({"BOUND_LAYER": column([1])}, "BOUND_SAMPLES[0] is 0; give 0..65536, and at least 1"),
        ({"BOUND_SEED": None}, "BOUND_RADIUS, BOUND_CLASS, BOUND_METHOD, BOUND_LAYER, "
         "BOUND_SAMPLES sent without BOUND_SEED"),
        ({"INTERVENE_LAYER": column([0]), "INTERVENE_CHANNEL": column([0]),
          "INTERVENE_STRENGTH": column([1.0], np.float32),
          "INTERVENE_BASELINE": column([0.0], np.float32)},
         "the BOUND inputs come with INTERVENE_LAYER; bounds are of the unedited network"),
    ],
)  # fmt: skip
def test_bad_bound_inputs_are_refused_naming_the_input(synthetic_model, change, message):  # noqa: F811
    model = synthetic_model("synth_patch")
    image = np.zeros((1, 64, 64, 3), np.uint8)
    inputs = {"IMAGE": image, **bound_inputs(1, 12288)}
    inputs = {k: v for k, v in {**inputs, **change}.items() if v is not None}
    (response,) = model.execute([FakeRequest(inputs, ["LOGITS", "BOUND_MARGIN"])])
    assert response.error is not None and message in response.error, response.error
    (alone,) = model.execute([FakeRequest({"IMAGE": image}, ["LOGITS", "SAMPLED_MARGIN"])])
    assert alone.error == (
        "synth_patch: SAMPLED_MARGIN requested without the BOUND inputs; send BOUND_RADIUS, "
        "BOUND_CLASS, BOUND_METHOD, BOUND_LAYER, BOUND_SAMPLES, BOUND_SEED"
    )
