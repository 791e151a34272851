"""MACO's pure maths (scoring/maco.py): every adjoint against finite differences, the
crops against a direct resampling, the loop's determinism and that it ascends a known
objective."""

from __future__ import annotations

import numpy as np
import pytest

from propscope_server.scoring import maco


def _directional(function, point: np.ndarray, direction: np.ndarray, step: float = 1e-6) -> float:
    return (function(point + step * direction) - function(point - step * direction)) / (2 * step)


@pytest.mark.parametrize("shape", [(8, 8), (6, 10), (7, 8)])
def test_irfft2_adjoint_is_the_adjoint(shape: tuple[int, int]) -> None:
    """<g, irfft2(Z)> = Re<adjoint(g), Z> for every Z, as real-linear maps."""
    rng = np.random.default_rng(0)
    height, width = shape
    spectrum = rng.normal(size=(3, height, width // 2 + 1)) + 1j * rng.normal(
        size=(3, height, width // 2 + 1)
    )
    gradient = rng.normal(size=(3, height, width))
    left = np.sum(gradient * np.fft.irfft2(spectrum, s=shape, axes=(-2, -1)))
    right = np.sum(np.real(np.conj(maco.irfft2_adjoint(gradient, width)) * spectrum))
    assert left == pytest.approx(right, rel=1e-10)


def test_picture_adjoint_matches_finite_differences() -> None:
    rng = np.random.default_rng(1)
    magnitude = maco.natural_spectrum(8, 10) * rng.uniform(0.5, 1.5, size=(3, 8, 6))
    phase = rng.normal(size=magnitude.shape)
    weights = rng.normal(size=(8, 10, 3))

    def objective(p: np.ndarray) -> float:
        return float(np.sum(weights * maco.picture(magnitude, p)[0]))

    gradient = maco.picture_adjoint(maco.picture(magnitude, phase)[1], weights)
    for _ in range(5):
        direction = rng.normal(size=phase.shape)
        expected = _directional(objective, phase, direction)
        assert np.sum(gradient * direction) == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_crop_adjoint_matches_finite_differences_and_transpose() -> None:
    rng = np.random.default_rng(2)
    boxes = np.array([[0.1, 0.2, 0.5], [-0.1, 0.6, 0.3], [0.3, 0.3, 0.05], [0.0, 0.0, 1.0]])
    crops = maco.Crops.of(boxes, (12, 16), (9, 7))
    image = rng.normal(size=(12, 16, 3))
    weights = rng.normal(size=(4, 9, 7, 3))
    gradient = crops.adjoint(weights)
    direction = rng.normal(size=image.shape)
    expected = _directional(lambda x: float(np.sum(weights * crops.cut(x))), image, direction)
    assert np.sum(gradient * direction) == pytest.approx(expected, rel=1e-8)


def test_crop_of_the_whole_picture_at_its_size_is_the_picture() -> None:
    image = np.random.default_rng(3).normal(size=(10, 10, 3))
    crops = maco.Crops.of(np.array([[0.0, 0.0, 1.0]]), (10, 10), (10, 10))
    np.testing.assert_allclose(crops.cut(image)[0], image, atol=1e-12)


def test_crop_resamples_bilinearly_at_half_pixel_centres() -> None:
    """A 2x upsampling of a ramp: sample j sits at (j + 0.5) / 2 - 0.5, edges clamped."""
    ramp = np.tile(np.arange(4.0)[None, :, None], (4, 1, 3))
    crops = maco.Crops.of(np.array([[0.0, 0.0, 1.0]]), (4, 4), (8, 8))
    row = crops.cut(ramp)[0, 0, :, 0]
    expected = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    np.testing.assert_allclose(row, expected)


def test_natural_spectrum_falls_as_one_over_frequency() -> None:
    spectrum = maco.natural_spectrum(64, 64)
    assert spectrum.shape == (3, 64, 33)
    assert spectrum[0, 0, 4] == pytest.approx(spectrum[0, 0, 8] * 2)
    assert spectrum[0, 3, 4] == pytest.approx(1 / 5)


def test_images_spectrum_is_the_mean_magnitude_in_decorrelated_colours() -> None:
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    spectrum = maco.images_spectrum(images)
    decorrelated = (images / 255.0 - 0.5) @ np.linalg.inv(maco.COLOR_CORRELATION)
    each = np.abs(np.fft.rfft2(decorrelated.transpose(0, 3, 1, 2), axes=(-2, -1)))
    assert spectrum.shape == (3, 8, 5)
    np.testing.assert_allclose(spectrum, each.mean(axis=0))


def test_images_spectrum_keeps_a_coloured_mean() -> None:
    """A red square on grey: the colour channels' DC terms are not zero, so the picture
    can keep a red mean instead of balancing red with cyan."""
    image = np.full((1, 8, 8, 3), 128, dtype=np.uint8)
    image[0, 2:6, 2:6] = (230, 30, 30)
    spectrum = maco.images_spectrum(image)
    assert spectrum[1, 0, 0] > 0.1 * spectrum[1].max()


def test_nadam_ascends_a_quadratic() -> None:
    nadam = maco.Nadam(0.1)
    x = np.array([3.0, -2.0])
    for _ in range(300):
        x = nadam.ascend(x, -2 * x)
    np.testing.assert_allclose(x, 0.0, atol=0.05)


def test_nadam_takes_torch_nadams_steps() -> None:
    """The same trajectory as torch.optim.NAdam descending the negated objective."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    start = rng.normal(size=5)
    target = rng.normal(size=5)
    nadam = maco.Nadam(0.5)
    ours = start.copy()
    theirs = torch.tensor(start, requires_grad=True)
    optimiser = torch.optim.NAdam([theirs], lr=0.5, eps=maco.ADAM_EPSILON)
    for _ in range(20):
        ours = nadam.ascend(ours, -2 * (ours - target) ** 3)
        optimiser.zero_grad()
        torch.sum((theirs - torch.tensor(target)) ** 4 / 2).backward()
        optimiser.step()
    np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-6, atol=1e-9)


def test_uniform_boxes_stay_inside_and_reach_every_corner() -> None:
    rng = np.random.default_rng(0)
    boxes = maco.sample_boxes(rng, 4000, 0.2, maco.PLACEMENT_UNIFORM)
    tops, lefts, sides = boxes.T
    assert np.all((tops >= 0) & (lefts >= 0) & (tops + sides <= 1) & (lefts + sides <= 1))
    assert np.any((tops < 0.05) & (lefts < 0.05))
    assert np.any(((tops + sides) > 0.95) & ((lefts + sides) > 0.95))
    centred = maco.sample_boxes(rng, 4000, 0.2, maco.PLACEMENT_CENTRED)
    centres = centred[:, :2] + centred[:, 2:] / 2
    assert abs(float(np.std(centres)) - maco.CENTRE_STD) < 0.01


def _target_loop(settings: maco.Settings, seed: int) -> tuple[maco.Optimisation, list[float]]:
    """The loop ascending a linear objective of the crops: mean over crops of
    <red - blue>, so a picture that grows red raises it."""
    loop = maco.Optimisation(maco.natural_spectrum(16, 16), (8, 8), settings, seed)
    weights = np.zeros((8, 8, 3))
    weights[..., 0], weights[..., 2] = 1.0, -1.0
    values = []
    for _ in range(settings.steps):
        crops = loop.propose()
        values.append(float(np.mean(np.sum(crops * weights, axis=(1, 2, 3)))))
        loop.update(np.broadcast_to(weights, crops.shape))
    return loop, values


def test_loop_raises_its_objective_and_is_deterministic() -> None:
    settings = maco.Settings(steps=40, crops=4, learning_rate=0.2)
    start = maco.Optimisation(maco.natural_spectrum(16, 16), (8, 8), settings, 7).picture()
    loop, values = _target_loop(settings, seed=7)
    image = loop.picture()

    def redness(x: np.ndarray) -> float:
        return float(x[..., 0].mean() - x[..., 2].mean())

    assert redness(image) > redness(start) + 5
    assert np.mean(values[-5:]) > np.mean(values[:5]) + 500
    again, _ = _target_loop(settings, seed=7)
    np.testing.assert_array_equal(again.picture(), image)
    np.testing.assert_array_equal(again.alpha(), loop.alpha())
    other, _ = _target_loop(settings, seed=8)
    assert not np.array_equal(other.picture(), image)
    assert loop.alpha().max() == pytest.approx(1.0)
    assert image.min() >= 0 and image.max() <= 255


def test_update_needs_a_proposal() -> None:
    loop = maco.Optimisation(maco.natural_spectrum(8, 8), (8, 8), maco.Settings(steps=2), 0)
    with pytest.raises(RuntimeError):
        loop.update(np.zeros((32, 8, 8, 3)))


def test_preparing_the_next_step_early_changes_nothing() -> None:
    """prepare() between propose() and update() (what the gateway does while the model
    works) draws the same boxes and noise as drawing them in propose()."""
    settings = maco.Settings(steps=6, crops=3)
    weights = np.ones((8, 8, 3))
    early = maco.Optimisation(maco.natural_spectrum(16, 16), (8, 8), settings, 5)
    late = maco.Optimisation(maco.natural_spectrum(16, 16), (8, 8), settings, 5)
    for _ in range(settings.steps):
        crops = early.propose()
        early.prepare()
        early.update(np.broadcast_to(weights, crops.shape))
        np.testing.assert_array_equal(late.propose(), crops)
        late.update(np.broadcast_to(weights, crops.shape))
    np.testing.assert_array_equal(early.picture(), late.picture())
