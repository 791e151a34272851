"""Calibration-only editor: an exchangeable null for adaptive paths.

`calibration_probe` sees only the bottom-right 8x8 corner. This editor redraws
that corner, for every strength, i.i.d. from the sample's seed and the strength
alone; the rest of the image is untouched. An original whose corner is drawn by
the same rule (`null_original`, strength 0) is then exchangeable with every image
of its path, at every path length, so the probe's curve is an exchangeable null
however long the gateway makes the path: the honesty suite measures the
adaptive rule's calibration through the real service with it.

Flavours:
- continuous: every corner is fresh uniform noise, so the curve's values are distinct.
- tied: two textures per seed (the second one `TIE_OFFSET` grey levels brighter,
  so that the probe's probability moves by >= 0.1 between them); each image gets
  the second one with probability `minority`. Curves then hold two values, the
  test often cannot reach alpha at N = 10, and the adaptive rule extends them.

The same strength gives the same corner (as a deterministic editor gives the same
image), so a path of 2N steps repeats the N-step path's images.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

# The side of the corner `calibration_probe` reads (probe.CORNER; not imported, so that
# this editor's Triton stub never imports torch).
CORNER = 8
FLAVOURS = ("continuous", "tied")
DEFAULT_MINORITY = 0.1
# Grey levels between the tied flavour's two textures.
TIE_OFFSET = 8
# Strengths are keyed at this resolution: 1/10 and 2/20 (both float32) are the same key.
STRENGTH_RESOLUTION = 2**24
# Stream of the tied flavour's two textures, apart from every strength's stream.
TEXTURE_STREAM = STRENGTH_RESOLUTION + 1


def strength_key(strength: float) -> int:
    return int(round(float(strength) * STRENGTH_RESOLUTION))


def corner_texture(seed: int, strength: float, flavour: str, minority: float) -> np.ndarray:
    """The corner [CORNER, CORNER, 3] uint8 of the image at `strength` (0: the original)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {', '.join(FLAVOURS)}; got {flavour!r}")
    rng = np.random.default_rng([seed, strength_key(strength)])
    if flavour == "continuous":
        return rng.integers(0, 256, (CORNER, CORNER, 3), dtype=np.uint8)
    if not 0.0 <= minority <= 1.0:
        raise ValueError(f"minority must be in [0, 1]; got {minority}")
    base = np.random.default_rng([seed, TEXTURE_STREAM]).integers(
        0, 256 - TIE_OFFSET, (CORNER, CORNER, 3)
    )
    second = rng.random() < minority
    return (base + TIE_OFFSET * second).astype(np.uint8)


def with_corner(image: np.ndarray, corner: np.ndarray) -> np.ndarray:
    edited = image.copy()
    edited[-CORNER:, -CORNER:] = corner
    return edited


def null_original(
    image: np.ndarray, seed: int, flavour: str, minority: float = DEFAULT_MINORITY
) -> np.ndarray:
    """`image` with its corner drawn as the editor draws each path image's: the
    original of an exchangeable path for the request seed `seed` (one sample)."""
    return with_corner(image, corner_texture(seed, 0.0, flavour, minority))


def edit_path(
    image: np.ndarray, strengths: np.ndarray, parameters: Mapping[str, str], seed: int
) -> np.ndarray:
    """The path [N, H, W, 3] uint8: `image` with its corner redrawn per strength."""
    if image.shape[0] < CORNER or image.shape[1] < CORNER:
        raise ValueError(f"the image must be at least {CORNER}x{CORNER} pixels")
    flavour = parameters["flavour"]
    minority = float(parameters["minority"])
    return np.stack(
        [with_corner(image, corner_texture(seed, s, flavour, minority)) for s in strengths]
    )
