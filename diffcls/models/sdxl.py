"""Stable Diffusion XL (`StableDiffusionXLPipeline` directories: SDXL base 1.0, SDXL-Turbo).

The UNet is conditioned as diffusers' SDXL pipeline conditions it:

- text: the penultimate hidden states of both text encoders (CLIP-L `CLIPTextModel` and
  OpenCLIP-G `CLIPTextModelWithProjection`), concatenated on the feature axis (768 + 1280 = 2048);
- `text_embeds`: the second encoder's projected pooled embedding (1280);
- `time_ids`: (original size, crop top-left, target size) = (S, S, 0, 0, S, S) for input
  resolution S: the image is classified as it is, uncropped, at the size it was resized to.

The prompt encoder's output is the text embeddings plus one row holding the pooled embedding
(zero-padded, `models.packed`); the UNet wrapper splits it off and builds `time_ids` from the
latent's size, so every prompt's conditioning is one cached tensor, as for SD 1.x/2.x.

SDXL-Turbo has this layout and an epsilon UNet: it is scored the same way. The refiner
(`StableDiffusionXLImg2ImgPipeline` with only `text_encoder_2`, trained on the low-noise end of
the schedule with an aesthetic score in `time_ids`) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffcls.errors import DiffclsError
from diffcls.models import spec as specs
from diffcls.models.packed import MultiTokenizer, PackedModel, component_loader, save_parts

KIND = "sdxl"
PIPELINE_CLASS = "StableDiffusionXLPipeline"
REFINER_CLASS = "StableDiffusionXLImg2ImgPipeline"
REQUIRED_DIRS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler")


class SDXLTextEncoderWrapper(torch.nn.Module):
    """(B, L1 + L2) ids -> (B, L1 + 1, 2048): the two penultimate hidden states side by side, and
    last the pooled embedding of the second encoder, zero-padded to the width."""

    def __init__(self, model: "SDXLModel"):
        super().__init__()
        self.clip_l, self.clip_g = model.text_encoder, model.text_encoder_2
        self.l1 = model.tokenizer.lengths["tokenizer"]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out_l = self.clip_l(input_ids[:, : self.l1], output_hidden_states=True, return_dict=True)
        out_g = self.clip_g(input_ids[:, self.l1 :], output_hidden_states=True, return_dict=True)
        text = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        pooled = torch.nn.functional.pad(out_g.text_embeds, (0, text.shape[-1] - out_g.text_embeds.shape[-1]))
        return torch.cat([text, pooled[:, None].to(text.dtype)], dim=1)


class SDXLUNetWrapper(torch.nn.Module):
    """(sample, t, packed embeddings) -> the UNet's prediction, with `text_embeds` from the packed
    row and `time_ids` = (S, S, 0, 0, S, S), S = the latent size times the VAE factor."""

    def __init__(self, unet, pooled_dim: int, vae_scale_factor: int):
        super().__init__()
        self.unet, self.pooled_dim, self.factor = unet, pooled_dim, vae_scale_factor

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        text, pooled = encoder_hidden_states[:, :-1], encoder_hidden_states[:, -1, : self.pooled_dim]
        h, w = int(sample.shape[-2]) * self.factor, int(sample.shape[-1]) * self.factor
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=text.dtype, device=sample.device).expand(sample.shape[0], 6)
        return self.unet(sample, timestep, encoder_hidden_states=text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]


@dataclass
class SDXLModel(PackedModel):
    tokenizer: MultiTokenizer
    text_encoder: torch.nn.Module  # CLIPTextModel (CLIP-L)
    text_encoder_2: torch.nn.Module  # CLIPTextModelWithProjection (OpenCLIP-G)
    unet: torch.nn.Module  # UNet2DConditionModel, addition_embed_type "text_time"
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor
    source: str = "<memory>"
    prediction_type: str = "epsilon"
    sigmas: torch.Tensor | None = None  # a flow scheduler is refused on load: DDPM-type only
    kind: str = KIND
    _fingerprint: str | None = field(default=None, repr=False)
    _fingerprint_record: tuple | None = field(default=None, repr=False)
    module_names = ("text_encoder", "text_encoder_2", "unet", "vae")




    @property
    def hidden_size(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if image_size % f:
            raise DiffclsError(f"--image-size {image_size} is not a multiple of {f} (the VAE's and the UNet's downsampling); pick e.g. {self.default_image_size}")
        h = image_size // self.vae_scale_factor
        return (self.latent_channels, h, h)

    def component_specs(self, image_size: int) -> dict[str, specs.ComponentSpec]:
        return specs.packed_component_specs(ids_length=self.max_length, emb_length=self.tokenizer.lengths["tokenizer"] + 1,
                                            hidden_size=self.hidden_size, image_size=image_size, latent_shape=self.latent_shape(image_size))

    def text_encoder_wrapper(self) -> torch.nn.Module:
        return SDXLTextEncoderWrapper(self)

    def denoiser_wrapper(self) -> torch.nn.Module:
        return SDXLUNetWrapper(self.unet, int(self.text_encoder_2.config.projection_dim), self.vae_scale_factor)


def is_sdxl_directory(path) -> bool:
    from diffcls.models.dit import read_model_index

    path = Path(path)
    return path.is_dir() and (read_model_index(path).get("_class_name") in (PIPELINE_CLASS, REFINER_CLASS)
                              or ((path / "unet").is_dir() and (path / "text_encoder_2").is_dir()))


def load_sdxl_directory(path) -> SDXLModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    from diffcls.models.noising import noise_from_scheduler_dir

    path = Path(path)
    if not (path / "text_encoder").is_dir() and (path / "text_encoder_2").is_dir():
        raise DiffclsError(f"{path} is an SDXL refiner (no text_encoder/): it denoises only the low-noise end and "
                           "conditions on an aesthetic score; classify with the SDXL base model")
    load = component_loader(path, "StableDiffusionXLPipeline", REQUIRED_DIRS, "")

    parts = {"tokenizer": load("tokenizer", AutoTokenizer.from_pretrained), "tokenizer_2": load("tokenizer_2", AutoTokenizer.from_pretrained)}
    alphas, prediction_type, sigmas, sched_file = noise_from_scheduler_dir(path)
    if sigmas is not None:
        raise DiffclsError(f"{sched_file}: an SDXL UNet with a flow-matching scheduler is not supported; use its DDPM-type scheduler config")
    unet = load("unet", UNet2DConditionModel.from_pretrained)
    check_sdxl_unet(unet, path / "unet")
    model = SDXLModel(
        tokenizer=MultiTokenizer(parts, {k: int(min(t.model_max_length, 77)) for k, t in parts.items()}),
        text_encoder=load("text_encoder", CLIPTextModel.from_pretrained),
        text_encoder_2=load("text_encoder_2", CLIPTextModelWithProjection.from_pretrained),
        unet=unet, vae=load("vae", AutoencoderKL.from_pretrained), alphas_cumprod=alphas, source=str(path),
        prediction_type=prediction_type,
    )
    return model.eval()


def check_sdxl_unet(unet, where) -> None:
    if unet.config.addition_embed_type != "text_time":
        raise DiffclsError(f"{where} is not an SDXL UNet (addition_embed_type {unet.config.addition_embed_type!r}, not 'text_time')")


def sdxl_model(pipe, alphas, prediction_type: str, sigmas, source) -> SDXLModel:
    """The SDXLModel of a loaded `StableDiffusionXLPipeline` (a single-file checkpoint's)."""
    if sigmas is not None:
        raise DiffclsError(f"{source}: an SDXL UNet with a flow-matching scheduler is not supported; use its DDPM-type scheduler config")
    check_sdxl_unet(pipe.unet, source)
    parts = {"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2}
    model = SDXLModel(tokenizer=MultiTokenizer(parts, {k: int(min(t.model_max_length, 77)) for k, t in parts.items()}),
                      text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2, unet=pipe.unet, vae=pipe.vae,
                      alphas_cumprod=alphas, source=str(source), prediction_type=prediction_type)
    return model.eval()


def save_sdxl_directory(model: SDXLModel, out_dir, sched_cfg: dict) -> Path:
    """The layout `StableDiffusionXLPipeline.save_pretrained` writes (safetensors weights)."""
    index = {"_class_name": PIPELINE_CLASS, "scheduler": ["diffusers", sched_cfg.get("_class_name", "EulerDiscreteScheduler")],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    return save_parts(model, Path(out_dir), sched_cfg, index)
