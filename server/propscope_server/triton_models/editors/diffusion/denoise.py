"""One batched, guided denoising loop for every diffusion editor.

A job is one request's paths: S seeds x N strengths = n items. Items of one seed
start from the same latents, so at the first denoising step a UNet branch whose
conditioning is the same for the whole path (the unconditional branch, the image
branch, a fixed instruction) gives the same output for all of them: it runs once
per seed, and only the guidance that combines the branches differs per item.

Jobs that share their timesteps and latent shape (requests that Triton's dynamic
batcher handed over together) step in lockstep: every step is one UNet pass over
all their rows, split only to bound the UNet batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from propscope_server.editor_contract import (
    Checkpoint,
    EditCancelled,
    ReportProgress,
    unreported,
)


@dataclass(frozen=True)
class Branch:
    """One conditioning of the UNet. Tensors have a leading dimension of 1 (the
    same for the whole path) or n (one per item)."""

    text: torch.Tensor  # [1 | n, tokens, width]
    image: torch.Tensor | None = None  # [1 | n, c, h, w], concatenated to the latents

    @property
    def shared(self) -> bool:
        return self.text.shape[0] == 1 and (self.image is None or self.image.shape[0] == 1)

    def rows(self, count: int) -> Branch:
        """A path-wide branch repeated for `count` rows (a per-item one as it is)."""

        def expand(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.expand(count, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor

        return Branch(expand(self.text), None if self.image is None else expand(self.image))


# combine(one output per branch, each [n, c, h, w]; step index) -> noise prediction [n, c, h, w]
Combine = Callable[[list[torch.Tensor], int], torch.Tensor]
# step_options(step index, t) -> extra keyword arguments of scheduler.step for the job's items
StepOptions = Callable[[int, torch.Tensor], dict]


@dataclass
class DenoiseJob:
    initial: torch.Tensor  # [S, c, h, w]: the starting latents of each seed
    seed_of_item: torch.Tensor  # [n] long: which seed each item belongs to
    scheduler: object  # set up for `timesteps`; this job's own instance
    timesteps: torch.Tensor
    branches: list[Branch]
    combine: Combine
    checkpoint: Checkpoint
    step_options: StepOptions | None = None
    # Told after each denoising step; decoding the latents is the last unit of work.
    progress: ReportProgress = unreported


@dataclass
class _Segment:
    """The rows one branch of one job needs from a UNet pass."""

    latents: torch.Tensor
    conditioning: Branch
    gather: torch.Tensor | None  # per-seed rows -> items


def denoise(
    unet: torch.nn.Module, jobs: list[DenoiseJob], max_unet_batch: int
) -> list[torch.Tensor | Exception]:
    """Each job's final latents [n, c, h, w], or what stopped it: EditCancelled for a
    job whose caller gave up (the others go on), or the error of its lockstep group."""
    results: list[torch.Tensor | Exception | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    for index, job in enumerate(jobs):
        key = (tuple(job.timesteps.tolist()), tuple(job.initial.shape[1:]))
        groups.setdefault(key, []).append(index)
    for members in groups.values():
        try:
            finished = _lockstep(unet, [jobs[i] for i in members], max_unet_batch)
        except Exception as error:  # noqa: BLE001 - fails this group's requests only
            finished = [error] * len(members)
        for index, latents in zip(members, finished, strict=True):
            results[index] = latents
    assert all(result is not None for result in results)
    return results


def _lockstep(
    unet: torch.nn.Module, jobs: list[DenoiseJob], max_unet_batch: int
) -> list[torch.Tensor | EditCancelled | None]:
    latents = [job.initial[job.seed_of_item] for job in jobs]
    active = set(range(len(jobs)))
    results: list[torch.Tensor | EditCancelled | None] = [None] * len(jobs)
    for step, t in enumerate(jobs[0].timesteps):
        for j in sorted(active):
            try:
                jobs[j].checkpoint()
            except EditCancelled as cancelled:
                results[j] = cancelled
                active.discard(j)
        if not active:
            break
        wanted = {
            j: _segments(jobs[j], jobs[j].scheduler.scale_model_input(latents[j], t), step)
            for j in sorted(active)
        }
        outputs = _unet(
            unet, [s for segments in wanted.values() for s in segments], t, max_unet_batch
        )
        for j, segments in wanted.items():
            job, mine, outputs = jobs[j], outputs[: len(segments)], outputs[len(segments) :]
            branches = [
                output if segment.gather is None else output[segment.gather]
                for segment, output in zip(segments, mine, strict=True)
            ]
            noise = job.combine(branches, step)
            options = job.step_options(step, t) if job.step_options else {}
            latents[j] = job.scheduler.step(noise, t, latents[j], **options).prev_sample
            job.progress(step + 1, len(job.timesteps) + 1)
    for j in active:
        results[j] = latents[j]
    return results


def _segments(job: DenoiseJob, scaled: torch.Tensor, step: int) -> list[_Segment]:
    """One per branch, in branch order. At the first step a path-wide branch needs
    one row per seed; otherwise a branch needs one per item."""
    first_items = _first_item_of_each_seed(job.seed_of_item) if step == 0 else None
    segments = []
    for branch in job.branches:
        if first_items is not None and branch.shared:
            rows = branch.rows(len(first_items))
            segments.append(_Segment(scaled[first_items], rows, job.seed_of_item))
        else:
            segments.append(_Segment(scaled, branch.rows(len(scaled)), None))
    return segments


def _first_item_of_each_seed(seed_of_item: torch.Tensor) -> torch.Tensor:
    seeds = int(seed_of_item.max()) + 1
    return torch.stack([torch.nonzero(seed_of_item == s)[0, 0] for s in range(seeds)])


def _unet(
    unet: torch.nn.Module, segments: list[_Segment], t: torch.Tensor, max_unet_batch: int
) -> list[torch.Tensor]:
    """Every segment's noise prediction from one UNet pass over all their rows,
    split into forward calls of at most max_unet_batch rows."""
    latents = torch.cat([s.latents for s in segments])
    if segments[0].conditioning.image is not None:
        latents = torch.cat([latents, torch.cat([s.conditioning.image for s in segments])], dim=1)
    text = torch.cat([s.conditioning.text for s in segments])
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
    return list(predictions.split([len(s.latents) for s in segments]))
