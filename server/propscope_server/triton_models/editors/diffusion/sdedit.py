"""SDEdit (img2img): noise the image to a fixed depth and denoise it towards a
prompt embedding that moves from the source prompt to the target prompt with the
edit strength (torch.lerp of the two encodings)."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.utils.torch_utils import randn_tensor

from propscope_server.editor_contract import InvalidParameters
from propscope_server.triton_models.editors.diffusion.base import DiffusionEditor, PathInputs
from propscope_server.triton_models.editors.diffusion.denoise import Branch, DenoiseJob
from propscope_server.triton_models.editors.diffusion.pipelines import floats, generator, scheduler


class SDEditEditor(DiffusionEditor):
    pipeline_class = StableDiffusionImg2ImgPipeline

    def prepare(self, path: PathInputs) -> DenoiseJob:
        parameters = path.parameters
        pipe, runtime = self.pipeline, self.runtime
        noise_strength, guidance = floats(parameters, "noise_strength", "guidance_scale")
        steps = scheduler(parameters["scheduler"], pipe.scheduler.config)
        total = int(parameters["num_inference_steps"])
        steps.set_timesteps(total, device=runtime.device)
        start = total - min(int(total * noise_strength), total)
        timesteps = steps.timesteps[start * steps.order :]
        if len(timesteps) == 0:
            raise InvalidParameters("noise_strength x num_inference_steps must be at least 1")
        if hasattr(steps, "set_begin_index"):
            steps.set_begin_index(start * steps.order)
        negative = parameters["negative_prompt"] or None
        prompts, negatives = pipe.encode_prompt(
            [parameters["source_prompt"], parameters["target_prompt"]],
            runtime.device,
            1,
            True,
            negative_prompt=[negative, negative] if negative else None,
        )
        source, target = prompts.chunk(2)
        weights = path.strengths.to(runtime.dtype)[:, None, None]
        moving = torch.lerp(
            source.expand(len(weights), -1, -1), target.expand(len(weights), -1, -1), weights
        )
        encoded = pipe.vae.encode(path.pixels).latent_dist
        initial = []
        for seed in path.seeds:  # as the img2img pipeline draws them: latent sample, then noise
            drawn = generator(seed)
            clean = encoded.sample(drawn) * pipe.vae.config.scaling_factor
            noise = randn_tensor(
                clean.shape, generator=drawn, device=runtime.device, dtype=runtime.dtype
            )
            initial.append(steps.add_noise(clean, noise, timesteps[:1]))

        def combine(outputs: list[torch.Tensor], step: int) -> torch.Tensor:
            unconditional, conditional = outputs
            return unconditional + guidance * (conditional - unconditional)

        return DenoiseJob(
            initial=torch.cat(initial),
            seed_of_item=path.seed_of_item,
            scheduler=steps,
            timesteps=timesteps,
            branches=[Branch(negatives[:1]), Branch(moving)],
            combine=combine,
            checkpoint=path.checkpoint,
        )
