"""Where an edit applies: the automatic object/background split, caller-given masks and
boxes, and the blend that confines an edited path to a region.

Pure numpy/Pillow/scipy (no torch), so that the gateway and the procedural editor share
one implementation: the editor splits the image itself, the gateway confines a path to a
caller's region and reports when the automatic split cannot be trusted.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin
from scipy import ndimage

from propscope_server.errors import PropscopeError

# A pixel belongs to the object when it differs from the border's median colour by more.
OBJECT_THRESHOLD = 24
# Above this share of the image the "object" is most likely the background.
MAX_OBJECT_FRACTION = 0.5
# An object touching this many of the four borders is most likely the background.
MAX_BORDERS_TOUCHED = 3
# Above this share of border pixels unlike the border's median colour, the background is
# not one colour (a photograph's) and "unlike the border" does not mean "the object".
MAX_BORDER_SPREAD = 0.1
# Masks larger than this are refused before they are decoded (a decompression bomb).
MAX_MASK_PIXELS = 64 * 1024 * 1024
MASK_FORMATS = ("PNG", "JPEG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNREADABLE_MASK_FIX = (
    "; give a PNG (alpha channel, or grey level: 0 keeps the original, 255 takes the edit)"
)


def border_colour(image: np.ndarray) -> np.ndarray:
    """The median colour of the image's outermost pixels: the background's colour."""
    return np.median(_border(image), axis=0)


def _border(image: np.ndarray) -> np.ndarray:
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def _differs(image: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return np.abs(image.astype(np.int16) - colour).max(axis=-1) > OBJECT_THRESHOLD


def object_mask(image: np.ndarray) -> np.ndarray:
    """The largest connected region that differs from the border colour.

    Exact on the synthetic world (plain background); on photographs it is a rough
    foreground estimate at best: `estimate_object_mask` says when not to trust it.
    """
    differs = _differs(image, border_colour(image))
    labels, count = ndimage.label(differs)
    if count == 0:
        return differs
    sizes = ndimage.sum_labels(differs, labels, index=np.arange(1, count + 1))
    return labels == (int(np.argmax(sizes)) + 1)


@dataclass(frozen=True)
class MaskEstimate:
    """The automatic object mask and, when it cannot be trusted, why (with the numbers)."""

    mask: np.ndarray  # bool [H, W]
    reasons: tuple[str, ...]

    @property
    def reliable(self) -> bool:
        return not self.reasons

    @property
    def warning(self) -> str | None:
        """One sentence for a result's warnings, or None when the split is reliable."""
        if not self.reasons:
            return None
        return (
            "the automatic object/background split is unreliable on this image: "
            + "; ".join(self.reasons)
            + "; give the region as a mask or a box (Property.region) instead"
        )


def estimate_object_mask(image: np.ndarray) -> MaskEstimate:
    """`object_mask` with the reasons it may be wrong on this image.

    Calibrated so that every image of the synthetic world is reliable (plain background,
    one object well inside the frame) and photographs are flagged.
    """
    mask = object_mask(image)
    height, width = image.shape[:2]
    reasons = []
    if not mask.any():
        reasons.append(
            f"no pixel differs from the border colour by more than {OBJECT_THRESHOLD} levels"
        )
    else:
        fraction = float(mask.mean())
        if fraction > MAX_OBJECT_FRACTION:
            reasons.append(
                f"the 'object' covers {fraction:.0%} of the image "
                f"(more than {MAX_OBJECT_FRACTION:.0%})"
            )
        touched = sum(bool(edge.any()) for edge in (mask[0], mask[-1], mask[:, 0], mask[:, -1]))
        if touched >= MAX_BORDERS_TOUCHED:
            reasons.append(f"the 'object' touches {touched} of the 4 image borders")
    border = _border(image)
    spread = float(_differs(border, np.median(border, axis=0)).mean())
    if spread > MAX_BORDER_SPREAD:
        reasons.append(
            f"the background is not one colour: {spread:.0%} of the border pixels differ from "
            f"their median by more than {OBJECT_THRESHOLD} levels (at most "
            f"{MAX_BORDER_SPREAD:.0%} expected)"
        )
    return MaskEstimate(mask, tuple(reasons))


def object_mask_reliability(image: np.ndarray) -> str | None:
    """None when the automatic split is reliable on `image`, else a warning saying why."""
    return estimate_object_mask(image).warning


def decode_mask(
    data: bytes, height: int, width: int, max_pixels: int = MAX_MASK_PIXELS
) -> np.ndarray:
    """A caller's mask image as float32 [height, width] in [0, 1].

    PNG or JPEG of any size: its alpha channel when it has one, else its grey level,
    scaled bilinearly to the image. Raises ValueError saying what is wrong and how to
    fix it; images over `max_pixels` are refused before decoding.
    """
    if not data:
        raise ValueError("the mask is empty; give a PNG or JPEG image")
    try:
        with caller_image(data, MASK_FORMATS) as image:
            size = image.size
            values = _mask_values(image) if size[0] * size[1] <= max_pixels else None
    except UnreadableImage as error:
        raise ValueError(
            f"the mask is not a readable PNG or JPEG image ({error}){UNREADABLE_MASK_FIX}"
        ) from None
    if values is None:
        raise ValueError(
            f"the mask is {size[0]}x{size[1]} pixels, more than the {max_pixels} allowed; "
            "give a smaller mask (it is scaled to the image)"
        )
    if not values.any():
        raise ValueError(
            "the mask is all zero, so the edit would change nothing; "
            "mark the region to edit with non-zero alpha or grey level"
        )
    if values.shape != (height, width):
        scaled = Image.fromarray(values).resize((width, height), Image.BILINEAR)
        values = np.clip(np.asarray(scaled, dtype=np.float32), 0.0, 1.0)
    return values


class UnreadableImage(ValueError):
    """A caller's bytes are no intact PNG or JPEG; the message says why, in our words."""


@contextmanager
def caller_image(
    data: bytes, formats: tuple[str, ...] | None = None
) -> Iterator[ImageFile.ImageFile]:
    """A caller's image opened lazily (headers only) for the block, which may decode it.
    Whatever Pillow raises on damaged data, opening or decoding, comes out as
    UnreadableImage; errors the block raises itself pass through, as does MemoryError
    (the gateway's trouble, not the image's). A PNG or JPEG over Pillow's own size
    threshold (about 179 Mpx) is opened too, by its format's parser, so that the
    caller's pixel limit refuses it naming its size, not Pillow's threshold."""
    with warnings.catch_warnings():
        # Pillow warns about damaged files (the caller hears of it, not the operator) and
        # about sizes over its threshold. Only Pillow's: the filter is process-wide.
        warnings.filterwarnings("ignore", module="PIL")
        try:
            try:
                image = Image.open(io.BytesIO(data), formats=formats)
            except Image.DecompressionBombError:
                png = data.startswith(PNG_SIGNATURE)
                parser = PngImagePlugin.PngImageFile if png else JpegImagePlugin.JpegImageFile
                image = parser(io.BytesIO(data))
            with image:
                yield image
        except Image.UnidentifiedImageError:  # its text names the BytesIO, not the problem
            raise UnreadableImage("no PNG or JPEG signature, or a damaged header") from None
        except (MemoryError, PropscopeError):
            raise
        # Pillow reports damaged data with whatever its parser trips over (SyntaxError,
        # struct.error, IndexError, AssertionError, ...): every other exception is the data's.
        except Exception as error:
            raise UnreadableImage(str(error) or "inconsistent data") from None


def _mask_values(image: Image.Image) -> np.ndarray:
    """Alpha if the image has any, else grey level, as float32 in [0, 1]."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey PNG
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    channel = image.convert("RGBA").getchannel("A") if has_alpha else image.convert("L")
    return np.asarray(channel, dtype=np.float32) / 255.0


def box_mask(
    left: float, top: float, right: float, bottom: float, pixels: bool, height: int, width: int
) -> np.ndarray:
    """A rectangle [left, right) x [top, bottom) as float32 [height, width] of 0 and 1.

    Fractions of the width and height in [0, 1], or pixels when `pixels`; edges are
    rounded to the nearest pixel. Raises ValueError naming the fix.
    """
    edges = {"left": left, "top": top, "right": right, "bottom": bottom}
    for name, value in edges.items():
        if not math.isfinite(value):
            raise ValueError(f"box {name} must be a finite number; got {value}")
    if pixels:
        for name, value, size, side in (
            ("left", left, width, "width"),
            ("right", right, width, "width"),
            ("top", top, height, "height"),
            ("bottom", bottom, height, "height"),
        ):
            if not 0 <= value <= size:
                raise ValueError(
                    f"box {name} is {value:g} px, outside the image's {side} of {size} px; "
                    f"give pixels in [0, {size}]"
                )
    else:
        for name, value in edges.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(
                    f"box {name} is {value:g}, not a fraction in [0, 1]; give fractions of "
                    "the image's width and height, or set pixels to give pixels"
                )
    if not left < right:
        raise ValueError(f"box left ({left:g}) must be less than right ({right:g})")
    if not top < bottom:
        raise ValueError(f"box top ({top:g}) must be less than bottom ({bottom:g})")
    x_scale, y_scale = (1, 1) if pixels else (width, height)
    x0, x1 = (int(np.rint(value * x_scale)) for value in (left, right))
    y0, y1 = (int(np.rint(value * y_scale)) for value in (top, bottom))
    if x0 >= x1 or y0 >= y1:
        raise ValueError(
            f"the box covers no whole pixel of the {width}x{height} image once rounded "
            f"(columns {x0}..{x1}, rows {y0}..{y1}); make it at least one pixel wide and high"
        )
    mask = np.zeros((height, width), np.float32)
    mask[y0:y1, x0:x1] = 1.0
    return mask


def composite(path: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The edited images confined to `mask`: original where it is 0, edit where it is 1,
    a blend between (rounded half to even). `path` is [..., H, W, 3] uint8."""
    height, width = original.shape[:2]
    if path.shape[-3:] != original.shape or mask.shape != (height, width):
        raise ValueError(
            f"path {path.shape}, original {original.shape} and mask {mask.shape} "
            "must share the image's height and width"
        )
    weight = np.clip(mask.astype(np.float64), 0.0, 1.0)[..., None]
    base = original.astype(np.float64)
    blended = np.rint(base + weight * (path.astype(np.float64) - base))
    return np.clip(blended, 0, 255).astype(np.uint8)


def unchanged(path: np.ndarray, original: np.ndarray) -> bool:
    """Whether every edited image equals the original: an edit with no effect (a hue
    rotation of a grey image), whose score would be 0 by construction, not by finding."""
    return bool((path == original).all())
