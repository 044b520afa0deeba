"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline` directories) as classifiers.

SD3 is a rectified-flow model (`models.noising`: x_t = (1 - σ) x0 + σ eps, target eps - x0, the
scheduler's sigmas with its `shift`) with an MMDiT denoiser (`SD3Transformer2DModel`) conditioned
on three text encoders, exactly as diffusers' pipeline computes it:

- CLIP-L and CLIP-G (`CLIPTextModelWithProjection`): the penultimate hidden states of each,
  concatenated on the feature axis and zero-padded to the joint width; their projected pooled
  outputs concatenated, the `pooled_projections`;
- T5-XXL (`text_encoder_3`), appended on the sequence axis. T5 is optional as in diffusers: a
  directory without `text_encoder_3/` gets zeros of its shape (`t5_length` tokens, 256 as the
  pipeline's default `max_sequence_length`), and so does a model loaded with T5 skipped
  (`--no-t5`: `load_sd3_directory(path, t5=False)`, `without_t5`), which is another model: its
  fingerprint, hence its cached embeddings and the results files it writes, differ.

The prompt encoder's output is the sequence of text embeddings with one more row holding the
pooled projection (zero-padded to the joint width); the denoiser splits that row off again
(`models.packed`).

VAE latents are `(mean - shift_factor) * scaling_factor`, SD3's VAE config having both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffcls.errors import DiffclsError
from diffcls.models import spec as specs
from diffcls.models.packed import MultiTokenizer, PackedModel, component_loader, save_parts

KIND = "sd3"
PIPELINE_CLASS = "StableDiffusion3Pipeline"
REQUIRED_DIRS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "vae", "scheduler")
T5_LENGTH = 256  # the SD3 pipeline's default max_sequence_length


class SD3TextEncoderWrapper(torch.nn.Module):
    """(B, L1 + L2 [+ L3]) ids -> (B, L1 + T5 length + 1, D): the SD3 prompt embeddings, and last
    the pooled projection padded to D (the module docstring)."""

    def __init__(self, model: "SD3Model"):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = model.text_encoder, model.text_encoder_2, model.text_encoder_3
        self.l1, self.l2 = model.clip_lengths
        self.t5_length, self.width = model.t5_length, model.joint_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids_l, ids_g = input_ids[:, : self.l1], input_ids[:, self.l1 : self.l1 + self.l2]
        out_l = self.clip_l(ids_l, output_hidden_states=True, return_dict=True)
        out_g = self.clip_g(ids_g, output_hidden_states=True, return_dict=True)
        clip = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
        B = input_ids.shape[0]
        if self.t5 is not None:
            t5 = self.t5(input_ids[:, self.l1 + self.l2 :], return_dict=False)[0].to(clip.dtype)
        else:  # as diffusers without text_encoder_3: zeros of T5's shape
            t5 = clip.new_zeros((B, self.t5_length, self.width))
        pooled = torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1)
        pooled = torch.nn.functional.pad(pooled, (0, self.width - pooled.shape[-1]))
        return torch.cat([clip, t5, pooled[:, None].to(clip.dtype)], dim=1)


class SD3Wrapper(torch.nn.Module):
    """The MMDiT as the denoiser: (sample, σ * 1000 per sample, packed embeddings) -> velocity."""

    def __init__(self, transformer, pooled_dim: int):
        super().__init__()
        self.transformer, self.pooled_dim = transformer, pooled_dim

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        text, pooled = encoder_hidden_states[:, :-1], encoder_hidden_states[:, -1, : self.pooled_dim]
        return self.transformer(hidden_states=sample, encoder_hidden_states=text, pooled_projections=pooled,
                                timestep=timestep, return_dict=False)[0]


@dataclass
class SD3Model(PackedModel):
    tokenizer: MultiTokenizer
    text_encoder: torch.nn.Module  # CLIPTextModelWithProjection (CLIP-L)
    text_encoder_2: torch.nn.Module  # CLIPTextModelWithProjection (CLIP-G)
    text_encoder_3: torch.nn.Module | None  # T5EncoderModel, or None (zeros, as diffusers)
    transformer: torch.nn.Module  # SD3Transformer2DModel
    vae: torch.nn.Module
    alphas_cumprod: torch.Tensor  # the flow path's ᾱ (models.noising.vp_alphas_cumprod)
    sigmas: torch.Tensor  # σ_t ascending
    source: str = "<memory>"
    prediction_type: str = "flow"
    t5_length: int = T5_LENGTH
    kind: str = KIND
    _fingerprint: str | None = field(default=None, repr=False)
    _fingerprint_record: tuple | None = field(default=None, repr=False)

    module_names = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")
    denoiser_name = "transformer"

    @property
    def clip_lengths(self) -> tuple[int, int]:
        return self.tokenizer.lengths["tokenizer"], self.tokenizer.lengths["tokenizer_2"]

    @property
    def joint_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)




    @property
    def hidden_size(self) -> int:
        return self.joint_dim

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f, p = self.vae_scale_factor, int(self.transformer.config.patch_size)
        if image_size % (f * p):
            raise DiffclsError(f"--image-size {image_size} is not a multiple of {f * p} (the VAE's factor {f} times the patch size {p}); pick e.g. {self.default_image_size}")
        h = image_size // f
        return (self.latent_channels, h, h)

    def component_specs(self, image_size: int) -> dict[str, specs.ComponentSpec]:
        L = self.clip_lengths[0] + self.t5_length + 1  # text tokens + the pooled row
        return specs.packed_component_specs(ids_length=self.max_length, emb_length=L, hidden_size=self.joint_dim,
                                            image_size=image_size, latent_shape=self.latent_shape(image_size))

    def text_encoder_wrapper(self) -> torch.nn.Module:
        return SD3TextEncoderWrapper(self)

    def denoiser_wrapper(self) -> torch.nn.Module:
        return SD3Wrapper(self.transformer, int(self.transformer.config.pooled_projection_dim))


def is_sd3_directory(path) -> bool:
    from diffcls.models.dit import read_model_index

    path = Path(path)
    if not path.is_dir():
        return False
    if read_model_index(path).get("_class_name") == PIPELINE_CLASS:
        return True
    from diffcls.models.flux import is_flux_directory  # the same folders, another family

    return (path / "transformer").is_dir() and (path / "text_encoder_2").is_dir() and not is_flux_directory(path)


def load_sd3_directory(path, *, t5: bool = True) -> SD3Model:
    """A `StableDiffusion3Pipeline` directory, local files only; T5 when present and `t5` (False:
    T5 is not even read, and zeros stand in its place, as diffusers' pipeline with
    `text_encoder_3=None`)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    from diffcls.models.noising import noise_from_scheduler_dir

    path = Path(path)
    load = component_loader(path, "StableDiffusion3Pipeline", REQUIRED_DIRS, " (text_encoder_3/, tokenizer_3/: optional)")

    use_t5 = t5 and (path / "text_encoder_3").is_dir() and (path / "tokenizer_3").is_dir()
    parts = {"tokenizer": load("tokenizer", AutoTokenizer.from_pretrained), "tokenizer_2": load("tokenizer_2", AutoTokenizer.from_pretrained)}
    lengths = {k: int(min(t.model_max_length, 77)) for k, t in parts.items()}
    if use_t5:
        parts["tokenizer_3"] = load("tokenizer_3", AutoTokenizer.from_pretrained)
        lengths["tokenizer_3"] = T5_LENGTH
    alphas, prediction_type, sigmas, sched_file = noise_from_scheduler_dir(path)
    if prediction_type != "flow":
        raise DiffclsError(f"{sched_file}: an SD3 model is a flow-matching model; its scheduler must be FlowMatchEulerDiscreteScheduler")
    model = SD3Model(
        tokenizer=MultiTokenizer(parts, lengths),
        text_encoder=load("text_encoder", CLIPTextModelWithProjection.from_pretrained),
        text_encoder_2=load("text_encoder_2", CLIPTextModelWithProjection.from_pretrained),
        text_encoder_3=load("text_encoder_3", T5EncoderModel.from_pretrained) if use_t5 else None,
        transformer=load("transformer", SD3Transformer2DModel.from_pretrained),
        vae=load("vae", AutoencoderKL.from_pretrained),
        alphas_cumprod=alphas, sigmas=sigmas, source=str(path),
    )
    return model.eval()


# an SD3 single file's text encoders, where it carries them (SD3 Medium's `*_incl_clips*` files do)
FILE_ENCODERS = {"text_encoder": "text_encoders.clip_l.", "text_encoder_2": "text_encoders.clip_g.", "text_encoder_3": "text_encoders.t5xxl."}


def single_file_components(root: Path, keys, t5: bool = True) -> dict:
    """The components to hand `StableDiffusion3Pipeline.from_single_file` for a file with tensor
    names `keys`: each text encoder the file lacks, read from the --config directory `root` (which
    must then hold its weights: diffusers alone refuses such a file); `t5` False: no T5 at all."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    out = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    for name, prefix in FILE_ENCODERS.items():
        if name in out or any(k.startswith(prefix) for k in keys) or not (root / name).is_dir():
            continue  # skipped, in the file, or (T5) in neither: the directory's model_index says none
        cls = T5EncoderModel if name == "text_encoder_3" else CLIPTextModelWithProjection
        out[name] = cls.from_pretrained(str(root / name), local_files_only=True)
    return out


def sd3_model(pipe, alphas, prediction_type: str, sigmas, source) -> SD3Model:
    """The SD3Model of a loaded `StableDiffusion3Pipeline` (a single-file checkpoint's), built as
    `load_sd3_directory` builds a directory's: T5 when the pipeline has it (and its tokenizer)."""
    if prediction_type != "flow":
        raise DiffclsError(f"{source}: an SD3 model is a flow-matching model; the --config scheduler must be FlowMatchEulerDiscreteScheduler")
    parts = {"tokenizer": pipe.tokenizer, "tokenizer_2": pipe.tokenizer_2}
    lengths = {k: int(min(t.model_max_length, 77)) for k, t in parts.items()}
    t5 = pipe.text_encoder_3 if getattr(pipe, "tokenizer_3", None) is not None else None
    if t5 is not None:
        parts["tokenizer_3"], lengths["tokenizer_3"] = pipe.tokenizer_3, T5_LENGTH
    model = SD3Model(tokenizer=MultiTokenizer(parts, lengths), text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
                     text_encoder_3=t5, transformer=pipe.transformer, vae=pipe.vae, alphas_cumprod=alphas, sigmas=sigmas,
                     source=str(source))
    return model.eval()


def without_t5(model: SD3Model) -> SD3Model:
    """`model` with T5 dropped (zeros in its place): a new model object sharing the other modules."""
    from dataclasses import replace

    parts = {k: v for k, v in model.tokenizer.parts.items() if k != "tokenizer_3"}
    lengths = {k: v for k, v in model.tokenizer.lengths.items() if k != "tokenizer_3"}
    return replace(model, tokenizer=MultiTokenizer(parts, lengths), text_encoder_3=None,
                   _fingerprint=None, _fingerprint_record=None)


def save_sd3_directory(model: SD3Model, out_dir, sched_cfg: dict) -> Path:
    """The layout `StableDiffusion3Pipeline.save_pretrained` writes (safetensors weights)."""
    index = {"_class_name": PIPELINE_CLASS, "scheduler": ["diffusers", sched_cfg["_class_name"]],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": ["transformers", "T5EncoderModel"] if model.text_encoder_3 is not None else [None, None],
             "tokenizer_3": ["transformers", type(model.tokenizer.parts["tokenizer_3"]).__name__] if "tokenizer_3" in model.tokenizer.parts else [None, None]}
    return save_parts(model, Path(out_dir), sched_cfg, index)
