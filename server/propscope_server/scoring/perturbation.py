"""Perturbation operators of Sobol attribution, on float32 RGB pixels in [0, 255].

Reference: Xplique's `global_sensitivity_analysis/perturbations.py`. Mask value 1
keeps the pixel; 0 moves it fully to the perturbed state. How ours relate:

- inpainting: x * m + (1 - m) * baseline, as Xplique's `inpainting`, whose baseline
  is fixed at 0 *in the model's input space* (often the dataset mean after
  normalisation). We work on pixels, so the baseline is the caller's choice (black,
  mean colour, blurred image) and must be stated with the result.
- blur: the same blend toward the blurred image. Xplique's `blurring` blurs with
  OpenCV's box filter `cv2.blur(x, (10, 10))`; we blur with a Gaussian
  (`gaussian_blur`, scipy.ndimage, per channel) as the paper describes, and the
  caller passes the blurred image as the baseline.
- amplitude: Xplique's code computes x * (m - 0.5) * sigma (its docstring says
  x + (m - 0.5) * sigma; the code is what runs). That scales the input's contrast
  around 0 of a centred input space by a factor in [-sigma/2, sigma/2]. On pixels we
  scale around the baseline instead: baseline + (x - baseline) * (m - 0.5) * sigma,
  identical to Xplique's when the baseline is that space's 0, and clip to [0, 255]
  so that the result is a valid image (Xplique does not clip).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

KINDS = ("inpainting", "blur", "amplitude")

# Xplique's `amplitude` intensity.
DEFAULT_AMPLITUDE_SIGMA = 1.0
PIXEL_MAX = 255.0


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """[H, W, C] float32 blurred per channel (reflected borders, 4-sigma kernel)."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 3:
        raise ValueError(f"image must have shape [H, W, C], got {list(pixels.shape)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    return ndimage.gaussian_filter(pixels, sigma=(sigma, sigma, 0.0)).astype(np.float32)


def perturb(
    image: np.ndarray,
    masks: np.ndarray,
    kind: str,
    baseline: np.ndarray,
    amplitude_sigma: float = DEFAULT_AMPLITUDE_SIGMA,
) -> np.ndarray:
    """Perturbed images [b, H, W, 3] float32 from masks [b, H, W, 1 | 3] in [0, 1]."""
    if kind not in KINDS:
        raise ValueError(f"perturbation must be one of {', '.join(KINDS)}, got {kind!r}")
    pixels = np.asarray(image, dtype=np.float32)
    reference = np.asarray(baseline, dtype=np.float32)
    weights = np.asarray(masks, dtype=np.float32)
    if reference.shape != pixels.shape:
        raise ValueError(
            f"baseline must have the image's shape {list(pixels.shape)}, got {list(reference.shape)}"
        )
    if weights.ndim != 4 or weights.shape[1:3] != pixels.shape[:2]:
        raise ValueError(
            f"masks must have shape [b, {pixels.shape[0]}, {pixels.shape[1]}, 1 or 3], "
            f"got {list(weights.shape)}"
        )
    if kind == "amplitude":
        scaled = reference + (pixels - reference) * (weights - 0.5) * np.float32(amplitude_sigma)
        return np.clip(scaled, 0.0, PIXEL_MAX).astype(np.float32)
    return (pixels * weights + (1.0 - weights) * reference).astype(np.float32)
