"""Procedural interventions: exact, cheap edits that work on any image.

Each edit is a function of the strength s in [0, 1] (s = 0 is the original):
hue rotation, brightness shift, saturation scaling, Gaussian blur, optionally
restricted to the object or the background; alpha-blending a colorful patch
(the paper's skin-lesion sticker intervention, strength = alpha); and scaling
the object about its centre (its size).

The object is `regions.object_mask`: exact on a plain background, unreliable on
photographs (the gateway says so; a caller's own region is the reliable way there).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from propscope_server.regions import border_colour, object_mask
from propscope_server.synthetic.world import colorful_patch


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """Float HSV (all channels in [0, 1]); float, so an unchanged image round-trips exactly."""
    r, g, b = np.moveaxis(rgb, -1, 0)
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        value == r,
        ((g - b) / safe) % 6.0,
        np.where(value == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    hue = np.where(chroma > 0, hue / 6.0, 0.0)
    saturation = np.where(value > 0, chroma / np.where(value > 0, value, 1.0), 0.0)
    return np.stack([hue, saturation, value], axis=-1)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    hue, saturation, value = np.moveaxis(hsv, -1, 0)
    sector = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    p = value * (1.0 - saturation)
    q = value * (1.0 - fraction * saturation)
    t = value * (1.0 - (1.0 - fraction) * saturation)
    sector = sector.astype(np.int64) % 6
    choices = [
        (value, t, p),
        (q, value, p),
        (p, value, t),
        (p, q, value),
        (t, p, value),
        (value, p, q),
    ]
    channels = [np.choose(sector, [c[i] for c in choices]) for i in range(3)]
    return np.stack(channels, axis=-1)


def _edit_hsv(
    image: np.ndarray, hue_turns: float = 0.0, saturation_factor: float = 1.0
) -> np.ndarray:
    hsv = _rgb_to_hsv(image.astype(np.float64) / 255.0)
    hsv[..., 0] = (hsv[..., 0] + hue_turns) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation_factor, 0.0, 1.0)
    return np.clip(np.round(_hsv_to_rgb(hsv) * 255.0), 0, 255).astype(np.uint8)


def _rotate_hue(image: np.ndarray, degrees: float) -> np.ndarray:
    return _edit_hsv(image, hue_turns=degrees / 360.0)


def _scale_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    return _edit_hsv(image, saturation_factor=factor)


def _shift_brightness(image: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(image.astype(np.float32) + delta * 255.0, 0, 255).round().astype(np.uint8)


def _blur(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _blend_patch(image: np.ndarray, alpha: float, box: tuple[int, int, int]) -> np.ndarray:
    x, y, side = box
    height, width = image.shape[:2]
    side = max(1, min(side, width - x, height - y))
    out = image.astype(np.float32)
    region = out[y : y + side, x : x + side]
    out[y : y + side, x : x + side] = (1 - alpha) * region + alpha * colorful_patch(side)
    return out.round().astype(np.uint8)


def _scale_object(
    image: np.ndarray, factor: float, mask: np.ndarray, background: np.ndarray
) -> np.ndarray:
    """The object (`mask`) resized by `factor` about its centroid, nearest-neighbour so
    that factor 1 is the identity; where it no longer covers, `background` shows."""
    if not mask.any():
        return image.copy()
    centre_y, centre_x = np.argwhere(mask).mean(axis=0) + 0.5
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]].astype(np.float64) + 0.5
    source = [centre_y + (ys - centre_y) / factor - 0.5, centre_x + (xs - centre_x) / factor - 0.5]
    scaled_mask = ndimage.map_coordinates(mask.astype(np.uint8), source, order=0) > 0
    scaled = np.stack(
        [ndimage.map_coordinates(image[..., c], source, order=0) for c in range(3)], axis=-1
    )
    out = background.copy()
    out[scaled_mask] = scaled[scaled_mask]
    return out


def _fill_background(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """`image` with the `hole` pixels painted from the nearest pixels outside it, then
    smoothed within the hole: on a plain background exactly its colour, on a textured
    one a blurred continuation of the surroundings rather than a flat blob."""
    if hole.all():
        out = image.copy()
        out[hole] = np.round(border_colour(image)).astype(np.uint8)
        return out
    nearest = ndimage.distance_transform_edt(hole, return_distances=False, return_indices=True)
    filled = image[nearest[0], nearest[1]].astype(np.float64)
    # Smooth over hole pixels only (normalised convolution), so that a constant fill stays
    # exactly constant; the blur grows with the hole so that streaks fade.
    sigma = max(1.0, 0.05 * float(np.sqrt(hole.sum())))
    weight = ndimage.gaussian_filter(hole.astype(np.float64), sigma)
    for channel in range(3):
        blurred = ndimage.gaussian_filter(filled[..., channel] * hole, sigma)
        filled[..., channel] = np.where(hole, blurred / np.maximum(weight, 1e-12), 0.0)
    out = image.copy()
    out[hole] = np.clip(np.rint(filled[hole]), 0, 255).astype(np.uint8)
    return out


def _length(value: str, size: int) -> int:
    """A patch parameter in pixels: below 1 a fraction of `size`, otherwise pixels."""
    number = float(value)
    return int(np.rint(number * size if number < 1 else number))


def _patch_box(image: np.ndarray, parameters: Mapping[str, str], seed: int) -> tuple[int, int, int]:
    height, width = image.shape[:2]
    side = _length(parameters["patch_size"], min(height, width))
    side = min(max(2, side), height, width)
    if parameters["position"] == "random":
        rng = np.random.default_rng(seed)
        return int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)), side
    return (
        min(_length(parameters["patch_x"], width), width - side),
        min(_length(parameters["patch_y"], height), height - side),
        side,
    )


# What amount means at strength 1 when the request leaves it empty.
DEFAULT_AMOUNT = {"hue": 180.0, "brightness": 0.3, "saturation": -1.0, "blur": 3.0, "scale": 0.4}
# Scale factors below this would make the object vanish.
MIN_SCALE = 0.05

EDITS = {
    "hue": lambda image, s, amount: _rotate_hue(image, s * amount),
    "brightness": lambda image, s, amount: _shift_brightness(image, s * amount),
    "saturation": lambda image, s, amount: _scale_saturation(image, max(0.0, 1.0 + s * amount)),
    "blur": lambda image, s, amount: _blur(image, s * amount),
}


def edit_path(
    image: np.ndarray, strengths: np.ndarray, parameters: Mapping[str, str], seed: int
) -> np.ndarray:
    """The path [N, H, W, 3] uint8 for one image, one edit per strength.

    `parameters` must already be resolved against the editor's schema.
    """
    operation = parameters["operation"]
    if operation == "blend":
        box = _patch_box(image, parameters, seed)
        return np.stack([_blend_patch(image, float(s), box) for s in strengths])
    amount = float(parameters["amount"]) if parameters["amount"] else DEFAULT_AMOUNT[operation]
    if operation == "scale":
        factors = [max(MIN_SCALE, 1.0 + float(s) * amount) for s in strengths]
        mask = object_mask(image)
        background = _fill_background(image, mask)
        return np.stack([_scale_object(image, factor, mask, background) for factor in factors])

    edit = EDITS[operation]
    mask = None
    if parameters["region"] != "all":
        mask = object_mask(image)
        if parameters["region"] == "background":
            mask = ~mask
    frames = []
    for strength in strengths:
        edited = edit(image, float(strength), amount)
        frames.append(edited if mask is None else np.where(mask[..., None], edited, image))
    return np.stack(frames).astype(np.uint8)
