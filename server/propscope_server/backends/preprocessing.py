"""Turn path images (RGB uint8 HWC) into what a deployed classifier takes, and
its outputs into probabilities. Pure numpy and Pillow."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.special import softmax

from propscope_server.config import PreprocessingConfig
from propscope_server.errors import FailedPrecondition


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


def resize(images: np.ndarray, height: int | None, width: int | None) -> np.ndarray:
    if (height is None or images.shape[1] == height) and (
        width is None or images.shape[2] == width
    ):
        return images
    size = (width or images.shape[2], height or images.shape[1])
    return np.stack(
        [
            np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
            for image in images
        ]
    )


def to_model_input(
    images: np.ndarray, layout: InputLayout, preprocessing: PreprocessingConfig
) -> np.ndarray:
    """images: [B, H, W, 3] uint8 -> the model's input tensor with batch dimension."""
    images = resize(images, layout.height, layout.width)
    if layout.datatype == "UINT8":
        batch = images
    else:
        batch = images.astype(np.float32) / 255.0
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
