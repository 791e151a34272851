"""Perturbation operators on pixels; expected values are worked out by hand from
Xplique's perturbations.py formulas (TensorFlow is not installable here)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from propscope_server.scoring.perturbation import KINDS, gaussian_blur, perturb


def _image(height=4, width=6):
    rng = np.random.default_rng(5)
    return rng.uniform(0, 255, (height, width, 3)).astype(np.float32)


def test_inpainting_blends_toward_the_baseline_by_the_mask():
    image = _image()
    baseline = np.full_like(image, 120.0)
    masks = np.stack([np.ones((4, 6, 1)), np.zeros((4, 6, 1)), np.full((4, 6, 1), 0.25)])
    out = perturb(image, masks, "inpainting", baseline)
    assert out.shape == (3, 4, 6, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], image)  # 1 keeps the pixel
    np.testing.assert_allclose(out[1], baseline)  # 0 replaces it
    np.testing.assert_allclose(out[2], 0.25 * image + 0.75 * 120.0, rtol=1e-6)


def test_blur_is_inpainting_toward_the_blurred_image():
    image = _image(16, 20)
    blurred = gaussian_blur(image, 2.0)
    mask = np.zeros((1, 16, 20, 1), dtype=np.float32)
    mask[:, :, :10] = 1.0
    out = perturb(image, mask, "blur", blurred)[0]
    np.testing.assert_allclose(out[:, :10], image[:, :10])
    np.testing.assert_allclose(out[:, 10:], blurred[:, 10:])


def test_gaussian_blur_works_per_channel_and_keeps_the_mean():
    image = np.zeros((21, 21, 3), dtype=np.float32)
    image[10, 10, 1] = 255.0
    blurred = gaussian_blur(image, 1.5)
    assert blurred.dtype == np.float32
    np.testing.assert_array_equal(blurred[..., 0], 0.0)  # channels do not mix
    assert blurred[..., 1].sum() == pytest.approx(255.0, rel=1e-4)
    np.testing.assert_allclose(
        blurred[..., 1], ndimage.gaussian_filter(image[..., 1], 1.5), atol=1e-4
    )


def test_amplitude_scales_the_deviation_from_the_baseline():
    # Xplique's amplitude x * (m - 0.5) * sigma, around the baseline, clipped to pixels.
    image = np.full((2, 2, 3), 200.0, dtype=np.float32)
    baseline = np.full_like(image, 100.0)
    masks = np.array([1.0, 0.5, 0.0]).reshape(3, 1, 1, 1) * np.ones((3, 2, 2, 1))
    out = perturb(image, masks, "amplitude", baseline)
    np.testing.assert_allclose(out[:, 0, 0, 0], [150.0, 100.0, 50.0])
    strong = perturb(image, masks, "amplitude", baseline, amplitude_sigma=4.0)
    np.testing.assert_allclose(strong[:, 0, 0, 0], [255.0, 100.0, 0.0])  # 300 and -100 clipped


def test_amplitude_with_a_zero_baseline_is_xplique_amplitude():
    image = _image()
    masks = np.random.default_rng(1).random((3, 4, 6, 1)).astype(np.float32)
    out = perturb(image, masks, "amplitude", np.zeros_like(image), amplitude_sigma=1.0)
    np.testing.assert_allclose(out, np.clip(image[None] * (masks - 0.5), 0, 255), rtol=1e-6)


def test_per_channel_masks_act_on_their_channel():
    image = _image()
    masks = np.zeros((1, 4, 6, 3), dtype=np.float32)
    masks[..., 2] = 1.0
    out = perturb(image, masks, "inpainting", np.zeros_like(image))[0]
    np.testing.assert_array_equal(out[..., :2], 0.0)
    np.testing.assert_allclose(out[..., 2], image[..., 2])


def test_perturb_rejects_bad_inputs():
    image = _image()
    with pytest.raises(ValueError, match="perturbation must be one of"):
        perturb(image, np.ones((1, 4, 6, 1)), "noise", image)
    with pytest.raises(ValueError, match="masks must have shape"):
        perturb(image, np.ones((1, 5, 6, 1)), "inpainting", image)
    with pytest.raises(ValueError, match="baseline must have the image's shape"):
        perturb(image, np.ones((1, 4, 6, 1)), "inpainting", image[:2])
    assert set(KINDS) == {"inpainting", "blur", "amplitude"}
