"""Turn path images (RGB uint8 HWC) into what a deployed classifier takes, and
its outputs into probabilities. Pure numpy and Pillow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.special import softmax

from propscope_server.config import PreprocessingConfig
from propscope_server.errors import FailedPrecondition

# Rows of an output that sum to 1 within this are taken for probabilities.
PROBABILITY_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class InputLayout:
    """Where the channels sit and which size the model wants (None = any)."""

    name: str
    datatype: str
    channels_first: bool
    height: int | None
    width: int | None


def input_layout(name: str, datatype: str, dims: list[int], model: str) -> InputLayout:
    """Read the layout from the model's input dims (batch dimension excluded)."""
    if len(dims) != 3 or (dims[0] != 3 and dims[-1] != 3):
        raise FailedPrecondition(
            f"model {model!r}: input {name!r} has shape {dims}; propscope needs an image input "
            "of shape [3, H, W] or [H, W, 3]"
        )
    if datatype not in ("UINT8", "FP32", "FP16"):
        raise FailedPrecondition(
            f"model {model!r}: input {name!r} has datatype {datatype}; supported: UINT8, FP32, FP16"
        )
    channels_first = dims[0] == 3 and dims[-1] != 3
    height, width = (dims[1], dims[2]) if channels_first else (dims[0], dims[1])
    return InputLayout(
        name=name,
        datatype=datatype,
        channels_first=channels_first,
        height=height if height > 0 else None,
        width=width if width > 0 else None,
    )


def resize(
    images: np.ndarray, height: int | None, width: int | None, mode: str = "squash"
) -> np.ndarray:
    """[B, H, W, 3] uint8 to the model's size: squash (aspect ratio not kept), the
    shorter side scaled then the centre cropped, or the longer side scaled then
    padded with black (letterbox)."""
    source_height, source_width = images.shape[1:3]
    height, width = height or source_height, width or source_width
    if (source_height, source_width) == (height, width):
        return images
    return np.stack([_resize_one(image, height, width, mode) for image in images])


def _resize_one(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    picture = Image.fromarray(image)
    if mode == "squash":
        return np.asarray(picture.resize((width, height), Image.Resampling.BILINEAR))
    scale_of = max if mode == "center_crop" else min
    scale = scale_of(height / image.shape[0], width / image.shape[1])
    scaled_width = max(1, round(image.shape[1] * scale))
    scaled_height = max(1, round(image.shape[0] * scale))
    scaled = np.asarray(picture.resize((scaled_width, scaled_height), Image.Resampling.BILINEAR))
    if mode == "center_crop":
        top, left = (scaled_height - height) // 2, (scaled_width - width) // 2
        return scaled[top : top + height, left : left + width]
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    top, left = (height - scaled_height) // 2, (width - scaled_width) // 2
    canvas[top : top + scaled_height, left : left + scaled_width] = scaled
    return canvas


def to_model_input(
    images: np.ndarray, layout: InputLayout, preprocessing: PreprocessingConfig
) -> np.ndarray:
    """images: [B, H, W, 3] uint8 -> the model's input tensor with batch dimension."""
    images = resize(images, layout.height, layout.width, preprocessing.resize or "squash")
    return normalise(images, layout, preprocessing)


def normalise(
    pixels: np.ndarray, layout: InputLayout, preprocessing: PreprocessingConfig
) -> np.ndarray:
    """[B, h, w, 3] RGB values in [0, 255] (uint8, or float from a perturbation) already
    at the model's size -> its input tensor: rounded for a UINT8 model, scaled to [0, 1]
    and normalised for a float one."""
    if layout.datatype == "UINT8":
        batch = (
            np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
            if pixels.dtype != np.uint8
            else pixels
        )
    else:
        batch = pixels.astype(np.float32) / 255.0
        if preprocessing.mean is not None:
            batch = batch - np.asarray(preprocessing.mean, dtype=np.float32)
        if preprocessing.std is not None:
            batch = batch / np.asarray(preprocessing.std, dtype=np.float32)
        batch = batch.astype(np.float16 if layout.datatype == "FP16" else np.float32)
    if layout.channels_first:
        batch = batch.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch)


def to_probabilities(outputs: np.ndarray, output_kind: str) -> np.ndarray:
    """[B, C] logits or probabilities -> probabilities (float64)."""
    outputs = np.asarray(outputs, dtype=np.float64).reshape(outputs.shape[0], -1)
    return outputs if output_kind == "probabilities" else softmax(outputs, axis=1)


def looks_like_probabilities(outputs: np.ndarray) -> bool:
    """Rows that are non-negative and sum to 1 +- PROBABILITY_SUM_TOLERANCE."""
    outputs = np.asarray(outputs, dtype=np.float64).reshape(outputs.shape[0], -1)
    return bool(
        outputs.shape[1] > 1
        and np.all(outputs >= 0.0)
        and np.all(np.abs(outputs.sum(axis=1) - 1.0) <= PROBABILITY_SUM_TOLERANCE)
    )


@dataclass(frozen=True)
class ResolvedPreprocessing:
    """The preprocessing to apply, where each field came from, and what the caller
    should know (an FP32 model with no declared normalisation)."""

    config: PreprocessingConfig
    sources: tuple[str, ...]
    warnings: tuple[str, ...]


FIELDS = ("mean", "std", "resize", "output_kind")


def resolve(
    model: str, datatype: str, layers: list[tuple[str, PreprocessingConfig | None]]
) -> ResolvedPreprocessing:
    """Field by field, the first layer that declares a field wins (the request, then
    the model's config.pbtxt, then the gateway's file). output_kind may stay None:
    it is then detected from the outputs."""
    values: dict[str, object] = {}
    sources = []
    for field_name in FIELDS:
        for source, layer in layers:
            value = getattr(layer, field_name) if layer is not None else None
            if value is not None:
                values[field_name] = value
                sources.append(f"{field_name}: {source}")
                break
    if "resize" not in values:
        values["resize"] = "squash"
        sources.append("resize: default (squash)")
    warnings = []
    if datatype != "UINT8" and "mean" not in values and "std" not in values:
        warnings.append(
            f"model {model!r} takes {datatype} input and declares no normalisation: pixels are "
            "scaled to [0, 1] with no mean or std; if it was trained otherwise, declare "
            "propscope.mean and propscope.std in its config.pbtxt or pass model.preprocessing"
        )
    if datatype == "UINT8" and ("mean" in values or "std" in values):
        warnings.append(
            f"model {model!r} takes UINT8 input: the declared mean and std are not applied "
            "(the model normalises its own pixels); the mean is where attribution methods' "
            "input-zero baseline lies"
        )
    return ResolvedPreprocessing(PreprocessingConfig(**values), tuple(sources), tuple(warnings))


def detection_warning(model: str, output_kind: str) -> str:
    return (
        f"model {model!r} declares no output kind; its outputs on the original image were "
        + (
            "non-negative rows summing to 1, so they are used as probabilities"
            if output_kind == "probabilities"
            else "not probabilities (negative or not summing to 1), so softmax is applied"
        )
        + "; declare propscope.output_kind in its config.pbtxt or pass "
        "model.preprocessing.output_kind to be sure"
    )


def resize_values(
    values: np.ndarray, height: int, width: int, resample: str = "bicubic"
) -> np.ndarray:
    """A 2-D float map resized (PIL, float32): bicubic for maps shown over an image,
    bilinear where the image's own resize is mirrored."""
    if values.shape == (height, width):
        return values.astype(np.float32)
    method = Image.Resampling.BICUBIC if resample == "bicubic" else Image.Resampling.BILINEAR
    picture = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    return np.asarray(picture.resize((width, height), method), dtype=np.float32)


def _scaled_box(source: tuple[int, int], target: tuple[int, int], mode: str) -> tuple[int, int]:
    """The (height, width) the source is scaled to by center_crop or letterbox, as
    `_resize_one` does."""
    scale_of = max if mode == "center_crop" else min
    scale = scale_of(target[0] / source[0], target[1] / source[1])
    return max(1, round(source[0] * scale)), max(1, round(source[1] * scale))


def image_region(
    source: tuple[int, int], target: tuple[int, int], mode: str
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the model's input [target] that shows the image
    [source] after `resize`: all of it, but for letterbox, whose padding bars show none."""
    if mode != "letterbox" or tuple(source) == tuple(target):
        return 0, 0, target[0], target[1]
    scaled_height, scaled_width = _scaled_box(source, target, mode)
    top, left = (target[0] - scaled_height) // 2, (target[1] - scaled_width) // 2
    return top, left, scaled_height, scaled_width


def map_to_view(values: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """A map over the image [H, W] -> over the model's input [height, width], with the
    geometry the image itself goes through (`resize`)."""
    if mode == "squash" or values.shape == (height, width):
        return resize_values(values, height, width, "bilinear")
    scaled_height, scaled_width = _scaled_box(values.shape, (height, width), mode)
    scaled = resize_values(values, scaled_height, scaled_width, "bilinear")
    if mode == "center_crop":
        top, left = (scaled_height - height) // 2, (scaled_width - width) // 2
        return scaled[top : top + height, left : left + width]
    canvas = np.zeros((height, width), dtype=np.float32)
    top, left = (height - scaled_height) // 2, (width - scaled_width) // 2
    canvas[top : top + scaled_height, left : left + scaled_width] = scaled
    return canvas


def map_to_image(values: np.ndarray, image_height: int, image_width: int, mode: str) -> np.ndarray:
    """A map over the model's input [h, w] -> over the image [H, W], bicubic: the
    inverse of `resize`'s geometry. Center crop: the image outside what the model sees
    gets 0; letterbox: the padding is dropped."""
    height, width = values.shape
    if mode == "squash" or (height, width) == (image_height, image_width):
        return resize_values(values, image_height, image_width)
    scaled_height, scaled_width = _scaled_box((image_height, image_width), (height, width), mode)
    if mode == "center_crop":
        # The view is the centre of the image scaled to (scaled_height, scaled_width).
        top, left = (scaled_height - height) // 2, (scaled_width - width) // 2
        canvas = np.zeros((scaled_height, scaled_width), dtype=np.float32)
        canvas[top : top + height, left : left + width] = values
        full = resize_values(canvas, image_height, image_width)
        inside = resize_values(
            np.pad(
                np.ones((height, width), np.float32),
                ((top, scaled_height - height - top), (left, scaled_width - width - left)),
            ),
            image_height,
            image_width,
            "bilinear",
        )
        return np.where(inside > 0.5, full, 0.0).astype(np.float32)
    top, left = (height - scaled_height) // 2, (width - scaled_width) // 2
    return resize_values(
        values[top : top + scaled_height, left : left + scaled_width], image_height, image_width
    )
