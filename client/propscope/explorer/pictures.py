"""The pictures the page shows, as ``data:`` URIs: heat-map overlays of maps on the uploaded
image, and PNGs the gateway sent (path images, crops, MACO pictures) passed through.

The heat map uses the classic piecewise-linear jet colours (the CLI's default colormap) so that
the explorer needs no matplotlib.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = ["heat_overlay", "png_uri", "rgb_of"]


def png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def rgb_of(image: bytes) -> Image.Image:
    """The image as RGB; ``ValueError`` when it is not an image PIL can read."""
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            return decoded.convert("RGB")
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"not a PNG or JPEG image PIL can read ({error})") from None


def _jet(scaled: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """[0, 1] -> RGB in [0, 1]: blue, cyan, yellow, red."""
    four = 4.0 * scaled[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(four - centres), 0.0, 1.0)


def heat_overlay(
    image: Image.Image, values: npt.ArrayLike, *, alpha: float = 0.5, max_side: int = 256
) -> str:
    """``values`` (HxW, any size: resized bilinearly) scaled from its minimum to its maximum
    and blended over ``image``, shrunk to ``max_side``; a constant map shows the low end."""
    base = image.copy()
    base.thumbnail((max_side, max_side))
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"a map must be HxW, got shape {array.shape}")
    resized = Image.fromarray(array, mode="F").resize(base.size, Image.BILINEAR)
    array = np.asarray(resized, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    blended = (1 - alpha) * np.asarray(base, dtype=np.float32) + alpha * 255.0 * _jet(scaled)
    result = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")
    buffer = io.BytesIO()
    result.save(buffer, format="PNG")
    return png_uri(buffer.getvalue())
