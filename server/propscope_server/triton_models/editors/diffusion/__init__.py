"""Diffusion editors (InstructPix2Pix, SDEdit, LEDITS++) on diffusers pipelines
loaded from local folders; one batched call per path."""
