"""Build tiny, randomly initialised diffusion pipelines offline, for tests, CI and
the CPU stack: the shapes of diffusers' own test "dummy components" (a 2-level
UNet, a 2-level VAE, a 5-layer 32-wide CLIP text encoder) and a CLIP tokenizer
made from a byte-level vocabulary, since no hub is reachable.

    python -m propscope_server.triton_models.editors.diffusion.tiny_pipelines OUT_DIR

writes OUT_DIR/tiny-ip2p (InstructPix2Pix: UNet with 8 input channels) and
OUT_DIR/tiny-sd (Stable Diffusion: 4 input channels, used by sdedit and ledits).
Deterministic: the same seed gives the same weights. Their edits are noise-like;
they exercise the machinery, not the semantics.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKEN_WIDTH = 32
COMPLETE_MARKER = "propscope_tiny.json"


def _tokenizer() -> CLIPTokenizer:
    """Every byte as a token, alone and as a word end: any text tokenizes, no merges."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TOKEN_WIDTH,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
    )
    return CLIPTextModel(config)


def _unet(in_channels: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TOKEN_WIDTH,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )


def _components(unet_in_channels: int, seed: int) -> dict:
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    return dict(
        unet=_unet(unet_in_channels),
        vae=_vae(),
        text_encoder=_text_encoder(tokenizer),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write both tiny pipelines (idempotent: a complete folder is kept as it is)."""
    targets = {
        "tiny-ip2p": (StableDiffusionInstructPix2PixPipeline, 8),
        "tiny-sd": (StableDiffusionImg2ImgPipeline, 4),
    }
    written = {}
    for name, (pipeline_class, in_channels) in targets.items():
        folder = out_dir / name
        marker = folder / COMPLETE_MARKER
        if not marker.exists():
            pipeline = pipeline_class(**_components(in_channels, seed))
            pipeline.save_pretrained(folder)
            marker.write_text(json.dumps({"seed": seed, "pipeline": pipeline_class.__name__}))
        written[name] = folder
    return written


def main(out_dir: Path, seed: int = 0) -> None:
    for name, folder in build(out_dir, seed).items():
        print(f"{name}: {folder}")


if __name__ == "__main__":
    typer.run(main)
