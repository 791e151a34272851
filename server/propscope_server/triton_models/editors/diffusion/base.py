"""The editor contract for diffusion pipelines: the paths of a request (S seeds x
N strengths) are one batch, what the path shares is encoded once, and requests
handed over together denoise in lockstep."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers import DiffusionPipeline

from propscope_server.editor_contract import (
    Checkpoint,
    EditRequest,
    ModelContext,
    ReportProgress,
    never_cancelled,
    unreported,
)
from propscope_server.triton_models.editors.diffusion.denoise import DenoiseJob, denoise
from propscope_server.triton_models.editors.diffusion.pipelines import (
    Runtime,
    decode,
    load_pipeline,
    runtime_from_config,
    to_tensor,
    working_size,
)


@dataclass(frozen=True)
class PathInputs:
    """One request, ready for an editor's `prepare`; items are seed-major."""

    pixels: torch.Tensor  # [1, 3, h, w] in [-1, 1], at the working size
    strengths: torch.Tensor  # [n]: each item's strength
    seeds: list[int]  # [S]
    seed_of_item: torch.Tensor  # [n] long
    parameters: Mapping[str, str]
    checkpoint: Checkpoint


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
    def edit_many(self, requests: list[EditRequest]) -> list[np.ndarray | Exception]:
        """A failure (bad parameters, cancellation, an error of the model) fails its
        own request only."""
        results: list[np.ndarray | Exception | None] = [None] * len(requests)
        jobs: dict[int, DenoiseJob] = {}
        for index, request in enumerate(requests):
            try:
                request.checkpoint()
                jobs[index] = self._job(request)
            except Exception as error:  # noqa: BLE001 - reported in that request's response
                results[index] = error
        finished = denoise(self.pipeline.unet, list(jobs.values()), self.runtime.max_unet_batch)
        for index, latents in zip(jobs, finished, strict=True):
            results[index] = (
                latents
                if isinstance(latents, Exception)
                else self._pixels(requests[index], latents)
            )
        assert all(result is not None for result in results)
        return results

    def _pixels(self, request: EditRequest, latents: torch.Tensor) -> np.ndarray | Exception:
        try:
            request.checkpoint()
            edited = decode(self.pipeline, latents, self.runtime, request.image.shape[:2])
        except Exception as error:  # noqa: BLE001 - reported in that request's response
            return error
        return edited.reshape(len(request.seeds), len(request.strengths), *request.image.shape)

    def edit(
        self,
        image: np.ndarray,
        strengths: np.ndarray,
        parameters: Mapping[str, str],
        seeds: list[int],
        checkpoint: Checkpoint = never_cancelled,
        progress: ReportProgress = unreported,
    ) -> np.ndarray:
        """One request: uint8 [H, W, 3] -> uint8 [S, N, H, W, 3]; raises what failed it."""
        request = EditRequest(image, strengths, parameters, seeds, checkpoint, progress)
        (result,) = self.edit_many([request])
        if isinstance(result, Exception):
            raise result
        return result

    def _job(self, request: EditRequest) -> DenoiseJob:
        size = working_size(*request.image.shape[:2], self.runtime.resolution, self.size_multiple)
        seed_of_item = torch.arange(len(request.seeds)).repeat_interleave(len(request.strengths))
        strengths = np.tile(request.strengths.astype(np.float32), len(request.seeds))
        job = self.prepare(
            PathInputs(
                pixels=to_tensor(request.image, size, self.runtime),
                strengths=torch.from_numpy(strengths).to(self.runtime.device),
                seeds=request.seeds,
                seed_of_item=seed_of_item,
                parameters=request.parameters,
                checkpoint=request.checkpoint,
            )
        )
        return replace(job, progress=request.progress)

    @abstractmethod
    def prepare(self, path: PathInputs) -> DenoiseJob:
        """Encode what the path shares once; say how each item's guidance is formed."""


def per_item(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """[n] -> [n, 1, 1, 1], to scale latents item by item."""
    return values.to(device=runtime.device, dtype=runtime.dtype)[:, None, None, None]
