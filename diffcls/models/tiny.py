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
    prediction_type: str = "epsilon"  # the scheduler config's; "v_prediction" as in SD 2.x 768-v; "flow": SD3's scheduler
    shift: float = 3.0  # "flow" only: the FlowMatchEulerDiscreteScheduler's shift (SD3's value)


def flow_scheduler_config(num_train_timesteps: int = 1000, shift: float = 3.0) -> dict:
    """SD3's scheduler config (FlowMatchEulerDiscreteScheduler; SD3 and SD3.5 ship shift 3.0)."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": num_train_timesteps, "shift": shift}


def scheduler_config(cfg: TinyConfig) -> dict:
    if cfg.prediction_type == "flow":
        return flow_scheduler_config(cfg.num_train_timesteps, cfg.shift)
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
    from diffcls.models.noising import noise_from_scheduler_config
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
    alphas, prediction_type, sigmas = noise_from_scheduler_config(scheduler_config(cfg), "tiny model")
    model = SDModel(
        tokenizer=build_tokenizer(words, cfg.max_length),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        alphas_cumprod=alphas,
        source=f"<tiny seed={seed}>",
        prediction_type=prediction_type,
        sigmas=sigmas,
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
    if sched_cfg is None and model.prediction_type == "flow":
        raise ValueError("a flow model's scheduler config (its shift) cannot be inferred; pass sched_cfg")
    cfg = sched_cfg or scheduler_config(
        TinyConfig(num_train_timesteps=model.num_train_timesteps, prediction_type=model.prediction_type)
    )
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "scheduler": ["diffusers", cfg.get("_class_name", "DDPMScheduler")],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            },
            indent=2,
        )
    )
    return out


def tiny_sd3(seed: int = 0, *, with_t5: bool = True, sample_size: int = 8, t5_length: int = 256, shift: float = 3.0,
             widths: tuple[int, int] = (16, 16)):
    """A deterministic tiny SD3 from configs (random weights; CLIP-L/G widths 16, joint width 32),
    for tests. Its T5 slot has a byte-level CLIP-style tokenizer (no T5 vocabulary is available
    offline); the T5EncoderModel only sees ids. `widths`: other CLIP-L / CLIP-G widths summing to
    32 (a single-file checkpoint tells its encoders apart by width)."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from diffcls.models.noising import noise_from_scheduler_config
    from diffcls.models.packed import MultiTokenizer
    from diffcls.models.sd3 import SD3Model
    from diffcls.models.tokenizer import build_tokenizer

    def clip(width: int):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=1024, hidden_size=width, projection_dim=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513))

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        te1, te2 = clip(widths[0]), clip(widths[1])
        te3 = T5EncoderModel(T5Config(vocab_size=1024, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2)) if with_t5 else None
        transformer = SD3Transformer2DModel(
            sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=2 * sample_size)
        vae = sd_vae((32, 64), 4, sample_size * 2)
        vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE values
        with torch.no_grad():  # adaLN-Zero and the VAE's init give near-constant outputs: spread them
            for p in [*transformer.parameters(), *vae.parameters()]:
                p.add_(torch.randn_like(p) * 0.02)
    finally:
        torch.random.set_rng_state(state)
    parts = {"tokenizer": build_tokenizer([], 77), "tokenizer_2": build_tokenizer([], 77)}
    lengths = {"tokenizer": 77, "tokenizer_2": 77}
    if with_t5:
        parts["tokenizer_3"], lengths["tokenizer_3"] = build_tokenizer([], t5_length), t5_length
    alphas, _, sigmas = noise_from_scheduler_config(flow_scheduler_config(1000, shift), "tiny SD3")
    model = SD3Model(MultiTokenizer(parts, lengths), te1, te2, te3, transformer, vae, alphas, sigmas,
                     source=f"<tiny sd3 seed={seed}>", t5_length=t5_length)
    return model.eval()


def tiny_sdxl(seed: int = 0, *, sample_size: int = 8, widths: tuple[int, int] = (16, 16)):
    """A deterministic tiny SDXL from configs (random weights), laid out like SDXL base: CLIP-L
    width 16 + CLIP-G width 16 (projection 16) -> cross-attention 32, `text_time` additions.
    `widths`: other CLIP-L / CLIP-G widths (a single-file checkpoint tells its encoders apart by width)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffcls.models.noising import noise_from_scheduler_config
    from diffcls.models.packed import MultiTokenizer
    from diffcls.models.sdxl import SDXLModel
    from diffcls.models.tokenizer import build_tokenizer

    def clip_config(width: int):
        return CLIPTextConfig(vocab_size=1024, hidden_size=width, projection_dim=width, intermediate_size=2 * width, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        te1, te2 = CLIPTextModel(clip_config(widths[0])), CLIPTextModelWithProjection(clip_config(widths[1]))
        unet = UNet2DConditionModel(
            sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=sum(widths), attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=widths[1] + 6 * 8,
            norm_num_groups=32)
        vae = sd_vae((32, 64), 4, sample_size * 2)
        vae.register_to_config(scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE values
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    finally:
        torch.random.set_rng_state(state)
    sched = {**scheduler_config(TinyConfig()), "_class_name": "EulerDiscreteScheduler"}
    alphas, prediction_type, _ = noise_from_scheduler_config(sched, "tiny SDXL")
    parts = {"tokenizer": build_tokenizer([], 77), "tokenizer_2": build_tokenizer([], 77)}
    model = SDXLModel(MultiTokenizer(parts, {"tokenizer": 77, "tokenizer_2": 77}), te1, te2, unet, vae, alphas,
                      source=f"<tiny sdxl seed={seed}>", prediction_type=prediction_type)
    return model.eval()


def flux_scheduler_config(num_train_timesteps: int = 1000) -> dict:
    """FLUX.1-dev's scheduler config: FlowMatchEulerDiscreteScheduler with dynamic shifting."""
    return {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": num_train_timesteps, "shift": 3.0,
            "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def tiny_flux(seed: int = 0, *, guidance: bool = True, t5_length: int = 16):
    """A deterministic tiny Flux from configs (random weights): CLIP width 16 (pooled 16), T5 width
    32 = the joint width, a 1+1-layer FluxTransformer2DModel, a 2x VAE with Flux's 16 latent
    channels, shift and scale. `guidance`: FLUX.1-dev's guidance embedding (schnell: none). Its T5
    slot has a byte-level CLIP-style tokenizer (no T5 vocabulary offline), as `tiny_sd3`. Its
    default image size is the pipeline's 128 latent pixels (256 px here): pass a small one."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from diffcls.models.flux import FluxModel
    from diffcls.models.packed import MultiTokenizer
    from diffcls.models.tokenizer import build_tokenizer

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=1024, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513))
        t5 = T5EncoderModel(T5Config(vocab_size=1024, d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
        vae = sd_vae((32, 64), 16, 16)
        vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)  # Flux's VAE values
        with torch.no_grad():  # adaLN-Zero and the VAE's init give near-constant outputs: spread them
            for p in [*transformer.parameters(), *vae.parameters()]:
                p.add_(torch.randn_like(p) * 0.02)
    finally:
        torch.random.set_rng_state(state)
    parts = {"tokenizer": build_tokenizer([], 77), "tokenizer_2": build_tokenizer([], t5_length)}
    model = FluxModel(MultiTokenizer(parts, {"tokenizer": 77, "tokenizer_2": t5_length}), clip, t5, transformer, vae,
                      flux_scheduler_config(), source=f"<tiny flux seed={seed}>")
    return model.eval()
