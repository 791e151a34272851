"""LEDITS++: invert the image once per seed (edit-friendly DDPM inversion, reused
for every step of the path), then denoise with semantic guidance towards the
editing prompt; the edit strength scales the edit guidance.

Masking is LEDITS++'s noise-quantile threshold (`edit_threshold`); its
cross-attention and intersection masks are not applied (diffusers'
`use_cross_attn_mask=False, use_intersect_mask=False`).
"""

from __future__ import annotations

import copy

import torch
from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion

from propscope_server.triton_models.editors.diffusion.base import (
    DiffusionEditor,
    PathInputs,
    per_item,
)
from propscope_server.triton_models.editors.diffusion.denoise import Branch, DenoiseJob
from propscope_server.triton_models.editors.diffusion.pipelines import floats, generator, scheduler

# LEDITS++'s own default. diffusers 0.42's inversion fails with DDIM (it indexes
# alphas_cumprod with a float tensor), so DDIM is not offered.
INVERSION_SCHEDULERS = {
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="sde-dpmsolver++", solver_order=2
    ),
}


class LeditsEditor(DiffusionEditor):
    pipeline_class = LEditsPPPipelineStableDiffusion

    def prepare(self, path: PathInputs) -> DenoiseJob:
        parameters = path.parameters
        pipe, runtime = self.pipeline, self.runtime
        max_guidance, threshold, source_guidance, skip = floats(
            parameters, "max_edit_guidance", "edit_threshold", "source_guidance_scale", "skip"
        )
        warmup = int(parameters["edit_warmup_steps"])
        pipe.scheduler = scheduler(
            parameters["scheduler"], pipe.scheduler.config, INVERSION_SCHEDULERS
        )
        # diffusers' invert() switches the UNet to the plain attention processor; the
        # editor keeps its own (scaled-dot-product attention: less memory on a GPU).
        attention = pipe.unet.attn_processors
        initial, noise_maps = [], []
        try:
            for seed in path.seeds:
                path.checkpoint()
                pipe.invert(
                    image=(path.pixels + 1) / 2,
                    source_prompt=parameters["source_prompt"],
                    source_guidance_scale=source_guidance,
                    num_inversion_steps=int(parameters["num_inversion_steps"]),
                    skip=skip,
                    generator=generator(seed),
                )
                initial.append(pipe.init_latents[:1] * pipe.scheduler.init_noise_sigma)
                noise_maps.append(pipe.zs[:, 0])
        finally:
            pipe.unet.set_attn_processor(attention)
        noise_maps = torch.stack(noise_maps)  # [S, steps, c, h, w]
        timesteps = pipe.inversion_steps
        index_of = {int(t): i for i, t in enumerate(timesteps[-noise_maps.shape[1] :])}
        steps = copy.deepcopy(pipe.scheduler)
        steps.set_timesteps(len(steps.timesteps))
        step_kwargs = pipe.prepare_extra_step_kwargs(pipe.eta)
        concept, unconditional_text, _ = pipe.encode_prompt(
            device=runtime.device,
            num_images_per_prompt=1,
            enable_edit_guidance=True,
            editing_prompt=[parameters["editing_prompt"]],
        )
        direction = -1.0 if parameters["reverse_direction"] == "true" else 1.0
        scales = per_item(path.strengths * max_guidance * direction, runtime)

        def combine(outputs: list[torch.Tensor], step: int) -> torch.Tensor:
            unconditional, edited = outputs
            if step < warmup:
                return unconditional
            guidance = (edited - unconditional) * scales
            magnitude = guidance.abs().sum(dim=1, keepdim=True).expand_as(guidance)
            cut = torch.quantile(magnitude.flatten(start_dim=2).float(), threshold, dim=2).to(
                guidance.dtype
            )
            return unconditional + torch.where(magnitude >= cut[:, :, None, None], guidance, 0)

        def step_options(step: int, t: torch.Tensor) -> dict:
            return {
                **step_kwargs,
                "variance_noise": noise_maps[path.seed_of_item, index_of[int(t)]],
            }

        return DenoiseJob(
            initial=torch.cat(initial),
            seed_of_item=path.seed_of_item,
            scheduler=steps,
            timesteps=timesteps,
            branches=[Branch(unconditional_text), Branch(concept)],
            combine=combine,
            checkpoint=path.checkpoint,
            step_options=step_options,
        )
