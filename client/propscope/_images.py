"""Turning the caller's image argument into the encoded bytes the contract wants."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageLike", "encode_image"]

ImageLike = bytes | bytearray | memoryview | str | os.PathLike | np.ndarray | Image.Image
"""Encoded PNG/JPEG bytes, a path to an image file, an RGB uint8 HxWx3 array or a PIL image."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def encode_image(image: ImageLike) -> bytes:
    """The PNG or JPEG bytes to send for ``image``.

    PNG and JPEG bytes (given directly or read from a file) are sent unchanged; other formats
    Pillow can read (WebP, BMP, TIFF...) are converted to RGB PNG. Arrays must be uint8 HxWx3 RGB
    and PIL images are converted to RGB; both are encoded as PNG. Raises ``OSError`` when a file
    cannot be read, ``ValueError`` when the data is no image or the array has the wrong shape or
    dtype, and ``TypeError`` for other argument types.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return _ensure_png_or_jpeg(bytes(image), "image bytes")
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return _ensure_png_or_jpeg(path.read_bytes(), str(path))
    if isinstance(image, np.ndarray):
        return _png_from_array(image)
    if isinstance(image, Image.Image):
        return _png_from_pil(image)
    raise TypeError(
        "image must be encoded bytes, a path, a uint8 HxWx3 numpy array or a PIL image, "
        f"not {type(image).__name__}"
    )


def _ensure_png_or_jpeg(data: bytes, what: str) -> bytes:
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        return data
    if not data:
        raise ValueError(f"{what} is empty")
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            return _png_from_pil(decoded)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{what} is not an image Pillow can read") from error


def _png_from_array(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8, got {array.dtype}")
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array must be HxWx3 RGB, got shape {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array is empty, shape {array.shape}")
    return _png_from_pil(Image.fromarray(np.ascontiguousarray(array)))


def _png_from_pil(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()
