"""Attribution maps as files people open: a heat-map overlay PNG and a JSON file that holds the
map exactly (float32, base64) with the plan and figures that produced it, and reading a map
back (that JSON, or a NumPy ``.npy`` file, e.g. one saved from Captum) to score it.

The overlay needs matplotlib (its colormaps): the ``review`` extra.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from propscope._attribution import Attribution, float32_lists

__all__ = [
    "MAP_FORMAT",
    "attribution_json",
    "overlay_png",
    "read_map",
    "write_attribution",
]

# The "format" key of the JSON file, bumped if its layout ever changes.
MAP_FORMAT = "propscope.attribution/1"
DEFAULT_COLORMAP = "jet"
DEFAULT_ALPHA = 0.5


def overlay_png(
    image: bytes,
    values: npt.ArrayLike,
    *,
    alpha: float = DEFAULT_ALPHA,
    colormap: str = DEFAULT_COLORMAP,
    box: Sequence[float] | None = None,
    max_side: int | None = None,
) -> bytes:
    """The image with the map blended over it: ``alpha`` of the colormap's colour of each
    pixel's value, scaled from the map's minimum (0) to its maximum (1); a constant map shows
    the colormap's low end. ``box`` (left, top, right, bottom fractions) is outlined in white.
    A map of another size than the image is resized to it (bilinear); ``max_side`` shrinks the
    result to a thumbnail (before the box is drawn, so that its outline stays visible)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colors = _colormap(colormap)
    with Image.open(io.BytesIO(image)) as decoded:
        rgb = decoded.convert("RGB")
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"the map must be HxW, got shape {array.shape}")
    if array.shape != (rgb.height, rgb.width):
        array = np.asarray(
            Image.fromarray(array, mode="F").resize((rgb.width, rgb.height), Image.BILINEAR)
        )
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    heat = colors(scaled)[..., :3] * 255.0
    blended = (1 - alpha) * np.asarray(rgb, dtype=np.float32) + alpha * heat
    result = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")
    if max_side is not None:
        result.thumbnail((max_side, max_side))
    if box is not None:
        left, top, right, bottom = box
        width, height = result.size
        outline = (
            left * width,
            top * height,
            max(left * width, right * width - 1),
            max(top * height, bottom * height - 1),
        )
        ImageDraw.Draw(result).rectangle(outline, outline=(255, 255, 255), width=2)
    buffer = io.BytesIO()
    result.save(buffer, format="PNG")
    return buffer.getvalue()


def _colormap(name: str) -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            f"the heat-map overlay needs matplotlib: pip install 'propscope[review]' ({error})"
        ) from None
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {name!r}") from None


def attribution_json(attribution: Attribution, **extra: Any) -> dict[str, Any]:
    """The JSON object of the map file: ``format``, ``extra`` (e.g. image, model), the map as
    base64 of its float32 little-endian bytes (row-major), the grid as nested lists, and the
    plan and figures (``Attribution.plan_dict()``)."""
    values = np.ascontiguousarray(attribution.map, dtype="<f4")
    result: dict[str, Any] = {"format": MAP_FORMAT, **extra}
    result["map"] = {
        "height": int(values.shape[0]),
        "width": int(values.shape[1]),
        "dtype": "float32",
        "byte_order": "little",
        "base64": base64.b64encode(values.tobytes()).decode("ascii"),
    }
    result["grid"] = float32_lists(attribution.grid)
    if attribution.channel_grid is not None:
        result["channel_grid"] = float32_lists(attribution.channel_grid)
    result.update(attribution.plan_dict())
    return result


def write_attribution(
    attribution: Attribution,
    image: bytes,
    out_dir: Path,
    stem: str,
    *,
    alpha: float = DEFAULT_ALPHA,
    colormap: str = DEFAULT_COLORMAP,
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Writes ``out_dir/<stem>.<method>.png`` (the overlay) and ``.json`` (``attribution_json``
    with ``extra``); the two paths."""
    png = overlay_png(image, attribution.map, alpha=alpha, colormap=colormap)
    out_dir.mkdir(parents=True, exist_ok=True)
    png_path = out_dir / f"{stem}.{attribution.method}.png"
    json_path = png_path.with_suffix(".json")
    document = attribution_json(attribution, **{**(extra or {}), "overlay": png_path.name})
    png_path.write_bytes(png)
    json_path.write_text(json.dumps(document, allow_nan=False) + "\n", encoding="utf-8")
    return png_path, json_path


def read_map(path: Path) -> tuple[npt.NDArray[np.float32], dict[str, Any]]:
    """The map of a ``.npy`` file (a 2-D array) or of a JSON file ``write_attribution`` wrote
    (or any JSON object whose ``map`` is a nested list of rows), and the JSON's other keys
    (empty for ``.npy``). ``ValueError`` names what is wrong, ``OSError`` when unreadable."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{path}: not a NumPy array file ({error})") from None
        return _two_d(array, path), {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: neither a .npy file nor JSON ({error})") from None
    if not isinstance(document, dict) or "map" not in document:
        raise ValueError(f"{path}: a JSON map file needs a 'map' key")
    stored = document.pop("map")
    if isinstance(stored, dict):
        try:
            raw = base64.b64decode(stored["base64"], validate=True)
            height, width = int(stored["height"]), int(stored["width"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: 'map' needs height, width and base64 ({error})") from None
        if len(raw) != 4 * height * width:
            raise ValueError(
                f"{path}: the map's base64 holds {len(raw)} bytes, not 4 x {height} x {width}"
            )
        array = np.frombuffer(raw, dtype="<f4").reshape(height, width)
    else:
        try:
            array = np.array(stored, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{path}: 'map' is not a list of equal-length rows ({error})"
            ) from None
    return _two_d(array, path), document


def _two_d(array: np.ndarray, path: Path) -> npt.NDArray[np.float32]:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{path}: the map must be a non-empty HxW array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{path}: the map must hold numbers, got {array.dtype}")
    return array.astype(np.float32)
