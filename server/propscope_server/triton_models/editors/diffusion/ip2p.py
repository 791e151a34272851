"""InstructPix2Pix: the edit strength sweeps the text guidance scale (the paper's
path: 1.01 -> 12.5, image guidance 2.5), every item from the seed's noise."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from diffusers.utils.torch_utils import randn_tensor

from propscope_server.triton_models.editors.diffusion.base import (
    DiffusionEditor,
    PathInputs,
    per_item,
)
from propscope_server.triton_models.editors.diffusion.denoise import Branch, DenoiseJob
from propscope_server.triton_models.editors.diffusion.pipelines import floats, generator, scheduler


class InstructPix2PixEditor(DiffusionEditor):
    pipeline_class = StableDiffusionInstructPix2PixPipeline

    def prepare(self, path: PathInputs) -> DenoiseJob:
        parameters = path.parameters
        pipe, runtime = self.pipeline, self.runtime
        low, high, image_guidance = floats(
            parameters, "min_text_guidance", "max_text_guidance", "image_guidance"
        )
        steps = scheduler(parameters["scheduler"], pipe.scheduler.config)
        steps.set_timesteps(int(parameters["num_inference_steps"]), device=runtime.device)
        embeddings = pipe._encode_prompt(
            parameters["instruction"],
            runtime.device,
            1,
            True,
            negative_prompt=parameters["negative_prompt"] or None,
        )
        text, uncond, _ = embeddings.chunk(3)
        image = pipe.vae.encode(path.pixels).latent_dist.mode()
        initial = (
            torch.cat(
                [
                    randn_tensor(
                        image.shape,
                        generator=generator(seed),
                        device=runtime.device,
                        dtype=runtime.dtype,
                    )
                    for seed in path.seeds
                ]
            )
            * steps.init_noise_sigma
        )
        text_guidance = per_item(low + path.strengths * (high - low), runtime)

        def combine(outputs: list[torch.Tensor], step: int) -> torch.Tensor:
            with_text, with_image, unconditional = outputs
            return (
                unconditional
                + text_guidance * (with_text - with_image)
                + image_guidance * (with_image - unconditional)
            )

        return DenoiseJob(
            initial=initial,
            seed_of_item=path.seed_of_item,
            scheduler=steps,
            timesteps=steps.timesteps,
            branches=[
                Branch(text, image),
                Branch(uncond, image),
                Branch(uncond, torch.zeros_like(image)),
            ],
            combine=combine,
            checkpoint=path.checkpoint,
        )
