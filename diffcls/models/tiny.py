"""Tiny SD-shaped models built from configs: the same classes as Stable Diffusion, small sizes.

Used by the tests (no weights are downloadable here) and as the starting point of the demo
model. `tiny_model(seed)` is deterministic: same seed, same weights, same fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffcls.models.loading import SDModel


@dataclass
class TinyConfig:
    image_size: int = 16  # pixels; latent is image_size / 2 (two VAE blocks)
    latent_channels: int = 4  # as in SD
    hidden_size: int = 32  # text embedding width D (1024 for SD 2.x)
    max_length: int = 77  # tokens, as in SD
    unet_channels: tuple[int, ...] = (32, 64)  # block_out_channels of the UNet
    vae_channels: tuple[int, ...] = (32, 64)  # block_out_channels of the VAE encoder/decoder
    attention_head_dim: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # SD's schedule
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # the scheduler config's; "v_prediction" as in SD 2.x 768-v


def scheduler_config(cfg: TinyConfig) -> dict:
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "prediction_type": cfg.prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def sd_vae(channels: tuple[int, ...], latent_channels: int, image_size: int):
    """An AutoencoderKL laid out like SD's (one resnet per block): 2**(len(channels)-1) x downsampling."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=min(32, channels[0]),
        sample_size=image_size,
    )


def sd_unet(channels: tuple[int, ...], latent_channels: int, sample_size: int, cross_attention_dim: int, heads: int):
    """A UNet2DConditionModel laid out like SD's: cross-attention in all but the deepest block."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,  # diffusers reads this as the number of heads
        norm_num_groups=min(32, channels[0]),
    )


def build_components(cfg: TinyConfig):
    """(text_encoder, vae, unet) with random weights; seed torch before calling."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1024,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.hidden_size * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=cfg.max_length,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
        )
    )
    vae = sd_vae(cfg.vae_channels, cfg.latent_channels, cfg.image_size)
    unet = sd_unet(cfg.unet_channels, cfg.latent_channels, cfg.image_size // 2 ** (len(cfg.vae_channels) - 1),
                   cfg.hidden_size, cfg.attention_head_dim)
    return text_encoder, vae, unet


def tiny_model(seed: int = 0, cfg: TinyConfig | None = None, words: list[str] = ()) -> SDModel:
    """A deterministic tiny SD model in memory."""
    from diffcls.models.loading import alphas_cumprod_from_scheduler_config
    from diffcls.models.tokenizer import build_tokenizer

    cfg = cfg or TinyConfig()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder, vae, unet = build_components(cfg)
        # the VAE's default init gives near-constant latents; spread them like a trained one
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    finally:
        torch.random.set_rng_state(state)
    model = SDModel(
        tokenizer=build_tokenizer(words, cfg.max_length),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        alphas_cumprod=alphas_cumprod_from_scheduler_config(scheduler_config(cfg)),
        source=f"<tiny seed={seed}>",
        prediction_type=cfg.prediction_type,
    )
    return model.eval()


def save_model(model: SDModel, out_dir: str | Path, sched_cfg: dict | None = None) -> Path:
    """Write `model` as a diffusers directory (safetensors weights) that `load_model` reads."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save_pretrained(str(out / "tokenizer"))
    model.text_encoder.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    model.vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    model.unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    cfg = sched_cfg or scheduler_config(
        TinyConfig(num_train_timesteps=model.num_train_timesteps, prediction_type=model.prediction_type)
    )
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "scheduler": ["diffusers", "DDPMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        )
    )
    return out
