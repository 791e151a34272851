"""The editor contract for diffusion pipelines: one call edits a whole path
(S seeds x N strengths) as one batch, encoding what the path shares once."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import numpy as np
import torch
from diffusers import DiffusionPipeline

from propscope_server.editor_contract import Checkpoint, ModelContext
from propscope_server.triton_models.editors.diffusion.denoise import DenoiseJob, denoise
from propscope_server.triton_models.editors.diffusion.pipelines import (
    Runtime,
    decode,
    load_pipeline,
    runtime_from_config,
    to_tensor,
    working_size,
)


class DiffusionEditor(ABC):
    pipeline_class: type[DiffusionPipeline]
    size_multiple = 64  # the UNet halves the latents; 64 px suits every SD-style model

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.pipeline = load_pipeline(self.pipeline_class, runtime)

    @classmethod
    def from_context(cls, context: ModelContext) -> DiffusionEditor:
        return cls(runtime_from_config(context.parameters, context.model_dir, context.device))

    @torch.inference_mode()
    def __call__(
        self,
        image: np.ndarray,
        strengths: np.ndarray,
        parameters: Mapping[str, str],
        seeds: list[int],
        checkpoint: Checkpoint,
    ) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [S, N, H, W, 3]."""
        size = working_size(*image.shape[:2], self.runtime.resolution, self.size_multiple)
        pixels = to_tensor(image, size, self.runtime)
        seed_of_item = torch.arange(len(seeds)).repeat_interleave(len(strengths))
        per_item = torch.from_numpy(np.tile(strengths.astype(np.float32), len(seeds)))
        job = self.prepare(
            pixels, per_item.to(self.runtime.device), seeds, seed_of_item, parameters
        )
        latents = denoise(self.pipeline.unet, job, self.runtime.max_unet_batch, checkpoint)
        checkpoint()
        edited = decode(self.pipeline, latents, self.runtime, image.shape[:2])
        return edited.reshape(len(seeds), len(strengths), *image.shape)

    @abstractmethod
    def prepare(
        self,
        pixels: torch.Tensor,
        strengths: torch.Tensor,
        seeds: list[int],
        seed_of_item: torch.Tensor,
        parameters: Mapping[str, str],
    ) -> DenoiseJob:
        """Encode what the path shares once; say how each item's guidance is formed."""


def per_item(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """[n] -> [n, 1, 1, 1], to scale latents item by item."""
    return values.to(device=runtime.device, dtype=runtime.dtype)[:, None, None, None]
