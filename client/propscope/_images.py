"""Turning the caller's image argument into the encoded bytes the contract wants."""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "FOLDER_IMAGE_SUFFIXES",
    "AlphaDroppedWarning",
    "ImageLike",
    "encode_image",
    "encode_mask",
    "folder_images",
    "natural_key",
]

ImageLike = bytes | bytearray | memoryview | str | os.PathLike | np.ndarray | Image.Image
"""Encoded PNG/JPEG bytes, a path to an image file, an RGB uint8 HxWx3 array or a PIL image."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# The files a provided-path folder contributes; other files in it are left out.
FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class AlphaDroppedWarning(UserWarning):
    """An image with transparent pixels is explained without its alpha channel: the model sees
    the colour stored under each transparent pixel (often black), not what a viewer shows."""


class _EncodedImage(bytes):
    """Bytes ``encode_image`` made and checked: sent again as they are, so that an image sent
    with several calls (the CLI's ``--model`` each) is decoded and warned about once."""


def encode_image(image: ImageLike) -> bytes:
    """The PNG or JPEG bytes to send for ``image``.

    PNG and JPEG bytes (given directly or read from a file) are sent unchanged; other formats
    Pillow can read (WebP, BMP, TIFF...) are converted to RGB PNG. Arrays must be uint8 HxWx3 RGB
    and PIL images are converted to RGB; both are encoded as PNG. The service reads RGB only: an
    alpha channel is dropped, not blended, and an image with transparent pixels warns
    (``AlphaDroppedWarning``) so that its pixels are flattened onto the background meant.
    Bytes this function returned are returned as they are, neither decoded nor warned about again.
    Raises ``OSError`` when a file cannot be read, ``ValueError`` when the data is no image or
    the array has the wrong shape or dtype, and ``TypeError`` for other argument types.
    """
    if isinstance(image, _EncodedImage):
        return image
    if isinstance(image, np.ndarray):
        return _EncodedImage(_png_from_array(image))
    if isinstance(image, Image.Image):
        what, transparent = "the PIL image", _has_transparent_pixels(image)
        encoded = _png_from_pil(image)
    elif isinstance(image, bytes | bytearray | memoryview | str | os.PathLike):
        if isinstance(image, str | os.PathLike):
            data, what = Path(image).read_bytes(), str(image)
        else:
            data, what = bytes(image), "image bytes"
        encoded = _ensure_png_or_jpeg(data, what)
        transparent = not data.startswith(_JPEG_MAGIC) and _decodes_transparent(data)
    else:
        raise TypeError(
            "image must be encoded bytes, a path, a uint8 HxWx3 numpy array or a PIL image, "
            f"not {type(image).__name__}"
        )
    if transparent:
        warnings.warn(
            f"{what} has transparent pixels; the alpha channel is dropped, not blended: the "
            "model sees the colour stored under each transparent pixel (often black). Flatten "
            "the image onto the background you mean first",
            AlphaDroppedWarning,
            stacklevel=2,
        )
    return _EncodedImage(encoded)


def _decodes_transparent(data: bytes) -> bool:
    """Whether ``data`` decodes to an image with transparent pixels; False when Pillow cannot
    decode it (PNG bytes are sent as they are: the service names what is wrong with them)."""
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            return _has_transparent_pixels(decoded)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _has_transparent_pixels(image: Image.Image) -> bool:
    """A pixel that is not fully opaque (the alpha decoded only when the header has one)."""
    if not _has_alpha(image):
        return False
    return image.convert("RGBA").getchannel("A").getextrema()[0] < 255


def _has_alpha(image: Image.Image) -> bool:
    """An alpha band or a transparent colour (palette or single-colour transparency)."""
    return "A" in image.getbands() or "transparency" in image.info


def _ensure_png_or_jpeg(
    data: bytes, what: str, convert: Callable[[Image.Image], bytes] | None = None
) -> bytes:
    if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
        return data
    if not data:
        raise ValueError(f"{what} is empty")
    try:
        with Image.open(io.BytesIO(data)) as decoded:
            return (convert or _png_from_pil)(decoded)
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


def encode_mask(mask: ImageLike) -> bytes:
    """The PNG or JPEG bytes to send for a region mask.

    PNG and JPEG bytes (given directly or read from a file) are sent unchanged; other formats
    Pillow can read are converted to PNG keeping their alpha channel (the service reads the
    alpha channel when there is one, else the grey level). Arrays must be uint8 or bool HxW
    (bool: True takes the edit); PIL images keep their alpha channel, else become grey. Raises
    like ``encode_image``.
    """
    if isinstance(mask, bytes | bytearray | memoryview):
        return _ensure_png_or_jpeg(bytes(mask), "mask bytes", _png_from_mask)
    if isinstance(mask, str | os.PathLike):
        path = Path(mask)
        return _ensure_png_or_jpeg(path.read_bytes(), f"mask {str(path)!r}", _png_from_mask)
    if isinstance(mask, np.ndarray):
        if mask.dtype == np.bool_:
            mask = mask.astype(np.uint8) * 255
        if mask.dtype != np.uint8 or mask.ndim != 2 or 0 in mask.shape:
            raise ValueError(
                f"mask array must be a non-empty uint8 or bool HxW array, "
                f"got {mask.dtype} {mask.shape}"
            )
        return _png_from_mask(Image.fromarray(np.ascontiguousarray(mask), mode="L"))
    if isinstance(mask, Image.Image):
        return _png_from_mask(mask)
    raise TypeError(
        "mask must be encoded bytes, a path, a uint8 or bool HxW numpy array or a PIL image, "
        f"not {type(mask).__name__}"
    )


def _png_from_mask(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGBA" if _has_alpha(image) else "L").save(buffer, format="PNG")
    return buffer.getvalue()


def natural_key(name: str) -> tuple[tuple[int, str], ...]:
    """Sort key that orders ``x_2.png`` before ``x_10.png``: digit runs compare as numbers,
    other text case-insensitively (the Node client sorts with the same rule)."""
    return tuple(
        (1, part) if not part.isdigit() else (0, f"{int(part):0>20}")
        for part in re.split(r"(\d+)", name.lower())
        if part
    )


def folder_images(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (``FOLDER_IMAGE_SUFFIXES``, hidden files left
    out) in natural order: a provided path's x_1..x_N. ``ValueError`` when there is none."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a folder")
    found = [
        file
        for file in path.iterdir()
        if file.is_file()
        and not file.name.startswith(".")
        and file.suffix.lower() in FOLDER_IMAGE_SUFFIXES
    ]
    if not found:
        raise ValueError(
            f"folder {str(path)!r} holds no image ({', '.join(FOLDER_IMAGE_SUFFIXES)})"
        )
    return sorted(found, key=lambda file: (natural_key(file.name), file.name))
