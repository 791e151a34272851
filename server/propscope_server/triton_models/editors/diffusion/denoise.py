"""One batched, guided denoising loop for every diffusion editor.

A path is S seeds x N strengths = n items. Items of one seed start from the same
latents, so at the first denoising step a UNet branch whose conditioning is the
same for the whole path (the unconditional branch, the image branch, a fixed
instruction) gives the same output for all of them: it is computed once per
seed and only the guidance that combines the branches differs per item. Later
steps run every item, in chunks that bound the UNet batch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from propscope_server.editor_contract import Checkpoint


@dataclass(frozen=True)
class Branch:
    """One conditioning of the UNet. Tensors have a leading dimension of 1 (the
    same for the whole path) or n (one per item)."""

    text: torch.Tensor  # [1 | n, tokens, width]
    image: torch.Tensor | None = None  # [1 | n, c, h, w], concatenated to the latents

    @property
    def shared(self) -> bool:
        return self.text.shape[0] == 1 and (self.image is None or self.image.shape[0] == 1)

    def take(self, items: torch.Tensor) -> Branch:
        """This branch's conditioning for `items`, one row each."""

        def rows(tensor: torch.Tensor) -> torch.Tensor:
            return (
                tensor.expand(len(items), *tensor.shape[1:])
                if tensor.shape[0] == 1
                else tensor[items]
            )

        return Branch(rows(self.text), None if self.image is None else rows(self.image))


# combine(branch outputs for the items, step index, item indices) -> noise prediction
Combine = Callable[[list[torch.Tensor], int, torch.Tensor], torch.Tensor]
# step_options(step index, t, item indices) -> extra keyword arguments of scheduler.step
StepOptions = Callable[[int, torch.Tensor, torch.Tensor], dict]


@dataclass
class DenoiseJob:
    initial: torch.Tensor  # [S, c, h, w]: the starting latents of each seed
    seed_of_item: torch.Tensor  # [n] long: which seed each item belongs to
    scheduler: object  # set up for `timesteps`; copied per chunk
    timesteps: torch.Tensor
    branches: list[Branch]
    combine: Combine
    step_options: StepOptions | None = None


def denoise(
    unet: torch.nn.Module, job: DenoiseJob, max_unet_batch: int, checkpoint: Checkpoint
) -> torch.Tensor:
    """The final latents of every item, [n, c, h, w]."""
    first_step = _shared_first_step(unet, job, max_unet_batch, checkpoint)
    chunk = max(1, max_unet_batch // len(job.branches))
    items = torch.arange(len(job.seed_of_item))
    finished = []
    for start in range(0, len(items), chunk):
        finished.append(
            _denoise_items(
                unet, job, items[start : start + chunk], first_step, max_unet_batch, checkpoint
            )
        )
    return torch.cat(finished)


def _shared_first_step(
    unet: torch.nn.Module, job: DenoiseJob, max_unet_batch: int, checkpoint: Checkpoint
) -> dict[int, torch.Tensor]:
    """UNet output at the first step for each path-wide branch, one row per seed."""
    scheduler = copy.deepcopy(job.scheduler)
    t = job.timesteps[0]
    scaled = scheduler.scale_model_input(job.initial, t)
    seeds = torch.arange(len(job.initial))
    shared = [b for b, branch in enumerate(job.branches) if branch.shared]
    if not shared:
        return {}
    checkpoint()
    outputs = _unet(unet, scaled, t, [job.branches[b].take(seeds) for b in shared], max_unet_batch)
    return dict(zip(shared, outputs, strict=True))


def _denoise_items(
    unet: torch.nn.Module,
    job: DenoiseJob,
    items: torch.Tensor,
    first_step: dict[int, torch.Tensor],
    max_unet_batch: int,
    checkpoint: Checkpoint,
) -> torch.Tensor:
    scheduler = copy.deepcopy(job.scheduler)
    seeds = job.seed_of_item[items]
    latents = job.initial[seeds]
    branches = [branch.take(items) for branch in job.branches]
    for step, t in enumerate(job.timesteps):
        checkpoint()
        scaled = scheduler.scale_model_input(latents, t)
        reuse = first_step if step == 0 else {}
        todo = [b for b in range(len(branches)) if b not in reuse]
        computed = dict(
            zip(
                todo,
                _unet(unet, scaled, t, [branches[b] for b in todo], max_unet_batch),
                strict=True,
            )
        )
        outputs = [reuse[b][seeds] if b in reuse else computed[b] for b in range(len(branches))]
        noise = job.combine(outputs, step, items)
        options = job.step_options(step, t, items) if job.step_options else {}
        latents = scheduler.step(noise, t, latents, **options).prev_sample
    return latents


def _unet(
    unet: torch.nn.Module,
    scaled: torch.Tensor,
    t: torch.Tensor,
    branches: list[Branch],
    max_unet_batch: int,
) -> list[torch.Tensor]:
    """Each branch's noise prediction for `scaled`, all branches in one batch
    (split when it exceeds max_unet_batch)."""
    if not branches:
        return []
    latents = torch.cat([scaled] * len(branches))
    if branches[0].image is not None:
        latents = torch.cat([latents, torch.cat([b.image for b in branches])], dim=1)
    text = torch.cat([b.text for b in branches])
    predictions = torch.cat(
        [
            unet(
                latents[i : i + max_unet_batch],
                t,
                encoder_hidden_states=text[i : i + max_unet_batch],
            ).sample
            for i in range(0, len(latents), max_unet_batch)
        ]
    )
    return list(predictions.chunk(len(branches)))
