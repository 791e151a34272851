"""A 64x64 renderer of one object on a plain background, the paper's
Cats-vs-Dogs bias test made self-contained.

The class is the object's shape (0 = circle, 1 = square). Hue, size,
background brightness and a colorful corner patch are nuisance factors that a
biased training split ties to the class. The "conjunction" split ties the class
to two of them together: square iff the object is red AND the patch is present,
so neither cue alone predicts it (the ground truth of interaction indices).
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Literal

import numpy as np

IMAGE_SIZE = 64
CLASS_NAMES = ("circle", "square")
# Where the colorful patch sits: top-left corner, (x, y, side) in pixels.
PATCH_BOX = (3, 3, 14)
PATCH_COLORS = np.array([[255, 0, 0], [255, 220, 0], [0, 200, 0], [0, 80, 255]], dtype=np.uint8)
# Hue ranges (degrees) that the hue-biased split ties to each class.
BIASED_HUES = ((-20.0, 20.0), (160.0, 200.0))
# The conjunction split's class-0 scenes, (red, patch), drawn equally often: red
# without the patch, another hue with it, another hue without it; class 1 is always
# red with it. Red is BIASED_HUES[0]; the other hues span the rest of the circle (a
# margin of 20 degrees either side), so that every hue a rotation passes through is
# seen: with cyan alone, yellow and green objects were called squares patch or not.
CONJUNCTION_NEGATIVES = ((True, False), (False, True), (False, False))
CONJUNCTION_OTHER_HUES = (40.0, 320.0)

Bias = Literal["none", "hue", "patch", "conjunction"]


@dataclass(frozen=True)
class Scene:
    shape: int
    hue_deg: float
    radius_px: float
    background: float
    patch: bool
    center: tuple[float, float]


def colorful_patch(side: int) -> np.ndarray:
    """A 2x2 grid of saturated colors, like the stickers of the ISIC nevi."""
    half = side // 2
    patch = np.empty((side, side, 3), dtype=np.uint8)
    patch[:half, :half] = PATCH_COLORS[0]
    patch[:half, half:] = PATCH_COLORS[1]
    patch[half:, :half] = PATCH_COLORS[2]
    patch[half:, half:] = PATCH_COLORS[3]
    return patch


def hue_to_rgb(hue_deg: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, 0.85, 0.9)
    return np.array([r, g, b], dtype=np.float32)


def render(scene: Scene) -> np.ndarray:
    """Render a scene to uint8 HWC RGB."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5
    cx, cy = scene.center
    if scene.shape == 0:
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= scene.radius_px**2
    else:
        half_side = scene.radius_px * 0.886  # same area as the circle
        inside = (np.abs(xs - cx) <= half_side) & (np.abs(ys - cy) <= half_side)
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), scene.background, dtype=np.float32)
    image[inside] = hue_to_rgb(scene.hue_deg)
    image = np.round(image * 255.0).astype(np.uint8)
    if scene.patch:
        x, y, side = PATCH_BOX
        image[y : y + side, x : x + side] = colorful_patch(side)
    return image


def sample_scene(label: int, bias: Bias, rng: np.random.Generator, shape_agreement: float) -> Scene:
    """Draw a scene for `label`. In a biased split the shortcut (in the
    conjunction split, red AND patch) always matches the label while the shape
    matches it only with probability `shape_agreement`, so the shortcut is the
    only fully predictive cue."""
    shape = label if bias == "none" or rng.random() < shape_agreement else 1 - label
    if bias == "conjunction":
        red, patch = (True, True) if label == 1 else CONJUNCTION_NEGATIVES[rng.integers(3)]
        return _scene(
            shape, rng.uniform(*(BIASED_HUES[0] if red else CONJUNCTION_OTHER_HUES)), patch, rng
        )
    if bias == "hue":
        low, high = BIASED_HUES[label]
        hue = rng.uniform(low, high)
    else:
        hue = rng.uniform(0.0, 360.0)
    patch = bool(label == 1) if bias == "patch" else bool(rng.random() < 0.5)
    return _scene(shape, hue, patch, rng)


def _scene(shape: int, hue: float, patch: bool, rng: np.random.Generator) -> Scene:
    """The scene with the nuisance factors no split biases drawn from `rng`."""
    return Scene(
        shape=shape,
        hue_deg=float(hue % 360.0),
        radius_px=float(rng.uniform(10.0, 15.0)),
        background=float(rng.uniform(0.25, 0.75)),
        patch=patch,
        center=(float(rng.uniform(28.0, 36.0)), float(rng.uniform(28.0, 36.0))),
    )


def make_split(
    bias: Bias, count: int, seed: int, shape_agreement: float = 0.75
) -> tuple[np.ndarray, np.ndarray, list[Scene]]:
    """`count` images with balanced labels: (images [n,64,64,3] uint8, labels [n], scenes)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    rng.shuffle(labels)
    scenes = [sample_scene(int(label), bias, rng, shape_agreement) for label in labels]
    images = np.stack([render(scene) for scene in scenes])
    return images, labels.astype(np.int64), scenes
