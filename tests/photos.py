"""Photo-like test images, made here so that tests and docs need no downloads.

What matters about a photograph for the automatic object/background split: the
background is not one colour (a sky gradient, textured ground, clouds, other things),
the border is not uniform, and the object of interest is one thing among several. The
scenes are deterministic functions of (height, width, seed).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image


class Photo(NamedTuple):
    image: np.ndarray  # uint8 [H, W, 3]
    object: np.ndarray  # bool [H, W]: the coloured ball, the "object" a caller means


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Noise in [-1, 1] varying over about 1/cells of the image (bicubic upsampling)."""
    coarse = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def photo_scene(height: int, width: int, seed: int = 0) -> Photo:
    """A landscape: sky gradient with clouds and a sun, textured ground with a horizon,
    a tree, a grey rock and a shaded red ball (the object)."""
    rng = np.random.default_rng([seed, height, width])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    v, u = (ys + 0.5) / height, (xs + 0.5) / width
    short = min(height, width)

    horizon = 0.55 + 0.04 * np.sin(2 * np.pi * (u * rng.uniform(0.7, 1.5) + rng.uniform()))
    sky_t = np.clip(v / horizon, 0.0, 1.0)[..., None]
    sky = (1 - sky_t) * np.array([40, 90, 190]) + sky_t * np.array([185, 210, 235])
    clouds = np.clip(_smooth_noise(rng, height, width, 6) * 2.5 - 0.8, 0.0, 1.0)[..., None]
    sky = (1 - clouds) * sky + clouds * np.array([245, 245, 248])
    ground_t = np.clip((v - horizon) / (1 - horizon), 0.0, 1.0)[..., None]
    ground = (1 - ground_t) * np.array([110, 140, 60]) + ground_t * np.array([90, 70, 40])
    ground = ground + 30 * _smooth_noise(rng, height, width, 24)[..., None]
    image = np.where((v < horizon)[..., None], sky, ground)

    sun = (u - 0.82) ** 2 * width**2 + (v - 0.15) ** 2 * height**2 <= (0.07 * short) ** 2
    image[sun] = [250, 225, 90]
    trunk = (np.abs(u - 0.15) * width < 0.02 * short) & (v > 0.35) & (v < 0.7)
    image[trunk] = [80, 55, 35]
    crown = ((u - 0.15) * width) ** 2 + ((v - 0.33) * height) ** 2 * 1.4 <= (0.14 * short) ** 2
    crown &= _smooth_noise(rng, height, width, 40) > -0.6
    image[crown] = np.array([35, 90, 40]) + 25 * _smooth_noise(rng, height, width, 30)[crown, None]
    rock = ((u - 0.72) * width / 1.6) ** 2 + ((v - 0.78) * height) ** 2 <= (0.08 * short) ** 2
    image[rock] = np.array([125, 125, 120]) + 20 * _smooth_noise(rng, height, width, 50)[rock, None]

    cx, cy, radius = 0.45 * width, 0.74 * height, 0.13 * short
    dx, dy = (xs + 0.5 - cx) / radius, (ys + 0.5 - cy) / radius
    ball = dx**2 + dy**2 <= 1.0
    light = np.clip(1.0 - 0.5 * ((dx + 0.4) ** 2 + (dy + 0.4) ** 2), 0.3, 1.0)
    image[ball] = np.array([215, 40, 35]) * light[ball, None] + 30 * (light[ball, None] > 0.95)

    image = image + rng.normal(0.0, 4.0, image.shape)  # sensor noise
    return Photo(np.clip(np.round(image), 0, 255).astype(np.uint8), ball)


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """The image of `photo_scene`: uint8 [height, width, 3]."""
    return photo_scene(height, width, seed).image
