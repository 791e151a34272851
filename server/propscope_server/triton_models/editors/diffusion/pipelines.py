"""What the diffusion editors share: a pipeline loaded from a local folder (never
a hub), the schedulers a path may use, and pixels <-> tensors at the model's
working size."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from PIL import Image

from propscope_server.editor_contract import InvalidParameters

# Deterministic schedulers only: a stochastic one (Euler ancestral) would draw
# different noise for each item of a batch and break the path's shared seed.
SCHEDULERS = {
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(config),
    "pndm": lambda config: PNDMScheduler.from_config(config, skip_prk_steps=True),
}


@dataclass(frozen=True)
class Runtime:
    """Where and how an editor runs, from its Triton model config."""

    weights: Path
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    resolution: int = 512  # the longer side of the working size, px
    max_unet_batch: int = 64  # UNet rows per forward pass


def runtime_from_config(parameters: Mapping[str, str], model_dir: Path, device: str) -> Runtime:
    """`weights` is absolute or relative to the model's folder."""
    weights = Path(parameters["weights"])
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[parameters.get("dtype", "fp32")]
    return Runtime(
        weights=weights if weights.is_absolute() else (model_dir / weights).resolve(),
        device=device,
        dtype=dtype,
        resolution=int(parameters.get("resolution", "512")),
        max_unet_batch=int(parameters.get("max_unet_batch", "64")),
    )


def load_pipeline(pipeline_class: type[DiffusionPipeline], runtime: Runtime) -> DiffusionPipeline:
    if not (runtime.weights / "model_index.json").exists():
        raise FileNotFoundError(
            f"no diffusers pipeline at {runtime.weights} (a save_pretrained folder); "
            "`make pipelines` builds the tiny test ones, docs/editors.md says how to place real weights"
        )
    pipeline = pipeline_class.from_pretrained(
        runtime.weights,
        local_files_only=True,
        dtype=runtime.dtype,
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipeline.to(runtime.device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def scheduler(name: str, config: Mapping, offered: Mapping = SCHEDULERS) -> object:
    """The scheduler `name` of those `offered`, configured like the pipeline's own."""
    try:
        return offered[name](config)
    except KeyError:
        raise InvalidParameters(
            f"scheduler must be one of {', '.join(offered)}; got {name!r}"
        ) from None


def working_size(height: int, width: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The longer side scaled to `resolution`, both sides rounded to `multiple`."""
    scale = resolution / max(height, width)
    return tuple(
        max(multiple, round(side * scale / multiple) * multiple) for side in (height, width)
    )


def to_tensor(image: np.ndarray, size: tuple[int, int], runtime: Runtime) -> torch.Tensor:
    """uint8 [H, W, 3] -> [1, 3, h, w] in [-1, 1] at the working size."""
    tensor = (
        torch.from_numpy(np.array(_resized(image, size))).permute(2, 0, 1)[None].float() / 127.5 - 1
    )
    return tensor.to(device=runtime.device, dtype=runtime.dtype)


def decode(
    pipeline: DiffusionPipeline, latents: torch.Tensor, runtime: Runtime, size: tuple[int, int]
) -> np.ndarray:
    """Latents [n, c, h, w] -> uint8 [n, H, W, 3] at the caller's size."""
    vae = pipeline.vae
    pixels = []
    for start in range(0, len(latents), runtime.max_unet_batch):
        decoded = vae.decode(
            latents[start : start + runtime.max_unet_batch] / vae.config.scaling_factor
        ).sample
        scaled = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        pixels.append(scaled.permute(0, 2, 3, 1).cpu().numpy())
    return np.stack([_resized(image, size) for image in np.concatenate(pixels)])


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] at (height, width) `size`, bicubic; unchanged when it already is."""
    if image.shape[:2] == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BICUBIC))


def generator(seed: int) -> torch.Generator:
    """What a caller of a diffusers pipeline passes for a reproducible seed: the
    same noise on every device."""
    return torch.Generator("cpu").manual_seed(seed)


def floats(parameters: Mapping[str, str], *names: str) -> list[float]:
    return [float(parameters[name]) for name in names]
