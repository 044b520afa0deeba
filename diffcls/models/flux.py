"""Flux (`FluxPipeline` directories: FLUX.1-dev, FLUX.1-schnell) as classifiers.

Flux is a rectified-flow model (`models.noising`: x_t = (1 - σ) x0 + σ eps, target eps - x0)
whose transformer (`FluxTransformer2DModel`) is conditioned as diffusers' FluxPipeline
conditions it:

- text: T5's last hidden states (`encoder_hidden_states`, `t5_length` tokens: the T5
  tokenizer's `model_max_length`, at most 512, the pipeline's default `max_sequence_length`)
  and CLIP's pooled output (`pooled_projections`, `CLIPTextModel.pooler_output`); `txt_ids`
  zeros, one row of 3 per text token. The prompt encoder's output is the T5 rows with one
  more row holding the pooled vector zero-padded to the T5 width (`models.packed`), so one
  cached tensor per prompt conditions it as every other family.
- latents: the VAE's `(mean - shift_factor) * scaling_factor` (16 channels). The scorer noises
  them in that (C, h, w) layout; the denoiser wrapper packs each 2x2 patch into one token,
  `(B, (h/2)(w/2), 4C)`, with `img_ids` (0, row, column) of the patch grid, and unpacks the
  prediction. Packing only reorders elements, so the mean squared error over the unpacked
  latent is the packed one's.
- timestep: the pipeline feeds σ * 1000 / 1000 (the transformer multiplies by 1000 again);
  the wrapper receives σ * 1000 from the scorer and divides it by 1000 likewise.
- guidance: FLUX.1-dev is guidance-distilled (`guidance_embeds` in the transformer config): it
  is fed a fixed guidance of 3.5, the pipeline's default `guidance_scale`; schnell has no
  guidance input and gets none.
- sigmas: Flux's scheduler config sets `use_dynamic_shifting`: the pipeline shifts the sigmas
  by μ, linear in the image's token count (`noising.dynamic_shift_mu`: 0.5 at 256 tokens,
  1.15 at 4096, i.e. 1024 px). The classifier's timestep grid is over the sigmas at the μ of
  the classified image size (`noise_tables(image_size)`), so a 512 px image is scored with the
  shift the pipeline would use at 512 px; an engine directory holds those of its image size.

Other Flux pipelines (Fill, Kontext, Redux, Control/Depth/Canny: extra image conditioning) are
refused; so is a transformer whose input is not 4 x the VAE's latent channels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffcls.errors import DiffclsError
from diffcls.models import spec as specs
from diffcls.models.packed import MultiTokenizer, PackedModel, component_loader, save_parts

KIND = "flux"
PIPELINE_CLASS = "FluxPipeline"
TRANSFORMER_CLASS = "FluxTransformer2DModel"
REQUIRED_DIRS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "transformer", "vae", "scheduler")
T5_MAX_LENGTH = 512  # the FluxPipeline's default (and largest) max_sequence_length
GUIDANCE = 3.5  # the FluxPipeline's default guidance_scale, fed to a guidance-distilled transformer
DEFAULT_SAMPLE_SIZE = 128  # the FluxPipeline's default_sample_size: 128 latent pixels, 1024 px
SUPPORTED = "Flux text-to-image (FluxPipeline: FLUX.1-dev, FLUX.1-schnell)"
# Flux pipelines conditioned on more than text, refused (loading.REFUSED_PIPELINES)
REFUSED = {
    "FluxFillPipeline": "a Flux Fill model (inpainting: the transformer also takes the masked image's latents)",
    "FluxKontextPipeline": "a Flux Kontext model (image editing: conditioned on a reference image's tokens)",
    "FluxPriorReduxPipeline": "a Flux Redux image-variation prior (it makes image embeddings, it does not denoise)",
    "FluxControlPipeline": "a Flux Control model (Depth/Canny: the transformer also takes a control image's latents)",
}


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): each 2x2 patch one token, its features (channel,
    row in patch, column in patch), tokens row-major over the patch grid (Flux's layout)."""
    B, C, h, w = x.shape
    return x.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents` for an (h, w) latent."""
    B, _, F = tokens.shape
    return tokens.reshape(B, h // 2, w // 2, F // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, F // 4, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """((h/2)(w/2), 3) position ids of the packed tokens: (0, patch row, patch column)."""
    rows = torch.arange(h // 2, dtype=torch.float32)[:, None].expand(h // 2, w // 2)
    cols = torch.arange(w // 2, dtype=torch.float32)[None, :].expand(h // 2, w // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


class FluxTextEncoderWrapper(torch.nn.Module):
    """(B, 77 + T5 length) ids -> (B, T5 length + 1, D): T5's last hidden states, and last CLIP's
    pooled output zero-padded to D (the module docstring)."""

    def __init__(self, model: "FluxModel"):
        super().__init__()
        self.clip, self.t5 = model.text_encoder, model.text_encoder_2
        self.l1, self.width = model.tokenizer.lengths["tokenizer"], model.joint_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pooled = self.clip(input_ids[:, : self.l1], output_hidden_states=False, return_dict=True).pooler_output
        t5 = self.t5(input_ids[:, self.l1 :], return_dict=False)[0]
        pooled = torch.nn.functional.pad(pooled, (0, self.width - pooled.shape[-1])).to(t5.dtype)
        return torch.cat([t5, pooled[:, None]], dim=1)


class FluxWrapper(torch.nn.Module):
    """The Flux transformer as the denoiser: (latent (B, C, h, w), σ * 1000 per sample, packed
    embeddings) -> the velocity in the latent's layout (packing, ids, guidance: the module docstring)."""

    def __init__(self, transformer, pooled_dim: int, guidance: float | None):
        super().__init__()
        self.transformer, self.pooled_dim, self.guidance = transformer, pooled_dim, guidance

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        text, pooled = encoder_hidden_states[:, :-1], encoder_hidden_states[:, -1, : self.pooled_dim]
        h, w = int(sample.shape[2]), int(sample.shape[3])
        txt_ids = torch.zeros(text.shape[1], 3, dtype=sample.dtype, device=sample.device)
        img_ids = image_ids(h, w).to(device=sample.device, dtype=sample.dtype)
        timestep = timestep.to(sample.dtype)
        guidance = None if self.guidance is None else torch.ones_like(timestep) * self.guidance
        out = self.transformer(hidden_states=pack_latents(sample), encoder_hidden_states=text, pooled_projections=pooled,
                               timestep=timestep / 1000, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        return unpack_latents(out, h, w)


@dataclass
class FluxModel(PackedModel):
    tokenizer: MultiTokenizer  # CLIP's ("tokenizer") and T5's ("tokenizer_2")
    text_encoder: torch.nn.Module  # CLIPTextModel: its pooled output
    text_encoder_2: torch.nn.Module  # T5EncoderModel: its last hidden states
    transformer: torch.nn.Module  # FluxTransformer2DModel
    vae: torch.nn.Module  # AutoencoderKL, 16 latent channels
    scheduler_config: dict  # FlowMatchEulerDiscreteScheduler, use_dynamic_shifting
    alphas_cumprod: torch.Tensor = None  # at the default image size (noise_tables: any size); from the config
    sigmas: torch.Tensor = None
    source: str = "<memory>"
    prediction_type: str = "flow"
    kind: str = KIND
    _fingerprint: str | None = field(default=None, repr=False)
    _fingerprint_record: tuple | None = field(default=None, repr=False)

    module_names = ("text_encoder", "text_encoder_2", "transformer", "vae")
    denoiser_name = "transformer"

    def __post_init__(self):
        if self.alphas_cumprod is None or self.sigmas is None:
            self.alphas_cumprod, self.sigmas = self.noise_tables(self.default_image_size)

    @property
    def joint_dim(self) -> int:
        return int(self.transformer.config.joint_attention_dim)

    @property
    def hidden_size(self) -> int:
        return self.joint_dim

    @property
    def t5_length(self) -> int:
        return self.tokenizer.lengths["tokenizer_2"]

    @property
    def latent_channels(self) -> int:  # the transformer's input is 2x2 patches of the latent
        return int(self.transformer.config.in_channels) // 4

    @property
    def default_image_size(self) -> int:
        return DEFAULT_SAMPLE_SIZE * self.vae_scale_factor  # the pipeline's default size

    @property
    def guidance(self) -> float | None:
        """The guidance fed to a guidance-distilled transformer (FLUX.1-dev), None without one (schnell)."""
        return GUIDANCE if self.transformer.config.guidance_embeds else None

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        if image_size % (2 * f):
            raise DiffclsError(f"--image-size {image_size} is not a multiple of {2 * f} (the VAE's factor {f} times Flux's 2x2 "
                               f"latent patches); pick e.g. {self.default_image_size}")
        return (self.latent_channels, image_size // f, image_size // f)

    def noise_tables(self, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alphas_cumprod, sigmas) for images of `image_size` px: the sigmas shifted by the μ
        the pipeline uses for that many image tokens (the module docstring)."""
        from diffcls.models.noising import noise_from_scheduler_config

        _, h, w = self.latent_shape(image_size)
        alphas, _, sigmas = noise_from_scheduler_config(self.scheduler_config, "the Flux scheduler config", (h // 2) * (w // 2))
        return alphas, sigmas

    def fingerprint_extra(self) -> str:
        """What the tables at one size do not show: the whole dynamic-shift config and the guidance."""
        keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift", "time_shift_type", "use_dynamic_shifting")
        return json.dumps({"scheduler": {k: self.scheduler_config.get(k) for k in keys}, "guidance": self.guidance}, sort_keys=True)

    def component_specs(self, image_size: int) -> dict[str, specs.ComponentSpec]:
        return specs.packed_component_specs(ids_length=self.max_length, emb_length=self.t5_length + 1, hidden_size=self.joint_dim,
                                            image_size=image_size, latent_shape=self.latent_shape(image_size))

    def text_encoder_wrapper(self) -> torch.nn.Module:
        return FluxTextEncoderWrapper(self)

    def denoiser_wrapper(self) -> torch.nn.Module:
        return FluxWrapper(self.transformer, int(self.transformer.config.pooled_projection_dim), self.guidance)


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def is_flux_directory(path) -> bool:
    """model_index.json names FluxPipeline, or (no index) transformer/ holds a Flux transformer."""
    path = Path(path)
    if not path.is_dir():
        return False
    name = _read_json(path / "model_index.json").get("_class_name")
    if name is not None:
        return name == PIPELINE_CLASS
    return _read_json(path / "transformer" / "config.json").get("_class_name") == TRANSFORMER_CLASS


def check_flux_configs(path: Path) -> tuple[dict, dict]:
    """(transformer config, scheduler config) of a Flux directory, refused in one line where it is
    a variant diffcls cannot score; read before any weight is loaded."""
    tcfg, vcfg = _read_json(path / "transformer" / "config.json"), _read_json(path / "vae" / "config.json")
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_file)
    if tcfg.get("_class_name") not in (None, TRANSFORMER_CLASS):
        raise DiffclsError(f"{path / 'transformer'} holds a {tcfg.get('_class_name')}, not a {TRANSFORMER_CLASS}; supported: {SUPPORTED}")
    channels, latent = int(tcfg.get("in_channels", 64)), int(vcfg.get("latent_channels", 16))
    if channels != 4 * latent:
        raise DiffclsError(f"{path / 'transformer'}: in_channels {channels} is not 4 x the VAE's {latent} latent channels (a Fill, "
                           f"Depth or Canny transformer takes extra image channels); supported: {SUPPORTED}")
    if sched.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise DiffclsError(f"{sched_file}: a Flux model is scored with its FlowMatchEulerDiscreteScheduler config, "
                           f"not {sched.get('_class_name') or 'an unreadable file'}; restore the model's scheduler/ folder")
    if int(tcfg.get("joint_attention_dim", 4096)) < int(tcfg.get("pooled_projection_dim", 768)):
        raise DiffclsError(f"{path / 'transformer'}: pooled_projection_dim is wider than joint_attention_dim; supported: {SUPPORTED}")
    return tcfg, sched


def load_flux_directory(path) -> FluxModel:
    """A `FluxPipeline` directory, local files only."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    path = Path(path)
    load = component_loader(path, PIPELINE_CLASS, REQUIRED_DIRS)
    _, sched = check_flux_configs(path)
    modules = {"text_encoder": load("text_encoder", CLIPTextModel.from_pretrained),
               "text_encoder_2": load("text_encoder_2", T5EncoderModel.from_pretrained),
               "transformer": load("transformer", FluxTransformer2DModel.from_pretrained), "vae": load("vae", AutoencoderKL.from_pretrained)}
    return _flux_model(path, load, sched, modules, path)


def _flux_model(root: Path, load, sched: dict, modules: dict, source) -> FluxModel:
    """The FluxModel of loaded `modules`, with the tokenizers of directory `root` (`load`: its
    component loader) as the pipeline uses them: CLIP at its tokenizer's length, T5 at
    max_sequence_length 512 (or less where its tokenizer says so)."""
    from transformers import AutoTokenizer

    parts = {"tokenizer": load("tokenizer", AutoTokenizer.from_pretrained), "tokenizer_2": load("tokenizer_2", AutoTokenizer.from_pretrained)}
    lengths = {"tokenizer": int(min(parts["tokenizer"].model_max_length, 77)),
               "tokenizer_2": int(min(parts["tokenizer_2"].model_max_length, T5_MAX_LENGTH))}
    model = FluxModel(tokenizer=MultiTokenizer(parts, lengths), **modules, scheduler_config=sched, source=str(source))
    return model.eval()


# --- single-file checkpoints (`loading`: --model FILE --config DIR) ------------------------------
# BFL's own files (flux1-dev.safetensors) hold the transformer alone, its tensor names bare or
# under `model.diffusion_model.`; ComfyUI's all-in-one files also carry these parts, under these prefixes
FILE_PARTS = {"vae": ("vae.", "first_stage_model."), "text_encoder": ("text_encoders.clip_l.",), "text_encoder_2": ("text_encoders.t5xxl.",)}
# what diffusers' model-type inference calls the files diffcls scores (Fill and Depth take image latents too)
FILE_KINDS = {"flux-dev": "FLUX.1 [dev]", "flux-schnell": "FLUX.1 [schnell]"}
CONFIG_REPOS = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell"}
FLUX1_WIDTH = 3072  # FLUX.1's transformer width: diffusers' conversion splits a single block's fused `linear1` at it


def file_parts(keys) -> dict[str, list[str]]:
    """{component: its tensor names} of a Flux single file: the transformer, and each part of
    `FILE_PARTS` the file carries."""
    out: dict[str, list[str]] = {"transformer": []}
    for k in keys:
        out.setdefault(next((n for n, prefixes in FILE_PARTS.items() if k.startswith(prefixes)), "transformer"), []).append(k)
    return out


def config_hint(kind: str) -> str:
    """How to get the --config directory of a `kind` file: everything but the transformer's weights."""
    repo = CONFIG_REPOS.get(kind, CONFIG_REPOS["flux-dev"])
    single = "flux1-dev" if repo.endswith("dev") else "flux1-schnell"
    return (f"--config {repo} (its configs, tokenizers, text encoders and VAE: hf download {repo} "
            f"--exclude 'transformer/*.safetensors' --exclude '{single}.safetensors' --exclude 'ae.safetensors')")


def transformer_from_checkpoint(tensors: dict, root: Path, source: Path):
    """The FluxTransformer2DModel of a BFL-layout transformer's `tensors` (from file `source`),
    converted by diffusers' own `convert_flux_transformer_checkpoint_to_diffusers` and shaped by
    `root`'s transformer config; a file that config does not describe is refused in one line.

    That conversion splits each single block's fused `linear1` (q, k, v and MLP rows) at FLUX.1's
    width; a transformer of another width (the tiny test models) has those rows padded to FLUX.1's
    split for it and cut back after, so that one conversion serves every width."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = FluxTransformer2DModel.load_config(str(root / "transformer"), local_files_only=True)
    width = int(cfg.get("num_attention_heads", 24)) * int(cfg.get("attention_head_dim", 128))
    sizes, full = (width,) * 3 + (4 * width,), (FLUX1_WIDTH,) * 3 + (4 * FLUX1_WIDTH,)
    with torch.device("meta"):  # the tensors the config implies, none allocated
        want = {k: tuple(v.shape) for k, v in FluxTransformer2DModel.from_config(cfg).state_dict().items()}

    def refuse(what: str) -> DiffclsError:
        return DiffclsError(f"the transformer in {source} does not match {root / 'transformer' / 'config.json'} ({what}); "
                            "pass the --config of the Flux model the file was saved from")

    fused = [k for k in tensors if k.endswith((".linear1.weight", ".linear1.bias"))] if width != FLUX1_WIDTH else []
    if fused and width > FLUX1_WIDTH:
        raise refuse(f"its width {width} is wider than FLUX.1's {FLUX1_WIDTH}, which diffusers' conversion assumes")
    for k in fused:  # each piece padded with zero rows to FLUX.1's
        if len(tensors[k]) != sum(sizes):
            raise refuse(f"{k} has {len(tensors[k])} rows, the config's width {width} makes {sum(sizes)}")
        pieces = torch.split(tensors[k], sizes, dim=0)
        tensors[k] = torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.dim() - 1) + (0, n - len(p))) for p, n in zip(pieces, full)])
    try:
        converted = convert_flux_transformer_checkpoint_to_diffusers(tensors)
    except KeyError as e:
        raise refuse(f"it lacks {e}") from None
    if fused:
        cut = {"attn.to_q.": width, "attn.to_k.": width, "attn.to_v.": width, "proj_mlp.": 4 * width}
        for k, v in converted.items():
            n = next((n for p, n in cut.items() if k.startswith("single_transformer_blocks.") and k.split(".", 2)[2].startswith(p)), None)
            converted[k] = v[:n].clone() if n is not None else v
    odd = sorted(set(want) ^ set(converted)) or [k for k in want if tuple(converted[k].shape) != want[k]]
    if odd:
        raise refuse(f"{len(odd)} tensors differ in name or shape, e.g. {odd[0]}")
    return FluxTransformer2DModel.from_single_file(converted, config=str(root), subfolder="transformer", local_files_only=True)


def load_flux_file(path: Path, root: Path, kind: str = "flux-dev") -> FluxModel:
    """A Flux single-file checkpoint: its transformer, and the VAE and text encoders it carries
    (`FILE_PARTS`), read by diffusers' single-file conversions; the configs, tokenizers, scheduler
    and the parts the file lacks (a transformer-only file: all of them) from the Flux directory `root`.
    `kind`: what diffusers' inference calls the file ("flux-dev", "flux-schnell"), for messages."""
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sf
    from transformers import CLIPTextModel, T5EncoderModel

    load = component_loader(root, PIPELINE_CLASS, REQUIRED_DIRS)
    _, sched = check_flux_configs(root)
    checkpoint = sf.load_single_file_checkpoint(str(path), local_files_only=True)
    parts, local = file_parts(checkpoint), {"config": str(root), "local_files_only": True}
    readers = {"vae": (lambda: AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **local), AutoencoderKL),
               "text_encoder": (lambda: sf.create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder", **local),
                                CLIPTextModel),
               "text_encoder_2": (lambda: sf.create_diffusers_t5_model_from_checkpoint(T5EncoderModel, checkpoint, subfolder="text_encoder_2",
                                                                                       **local), T5EncoderModel)}
    modules = {"transformer": transformer_from_checkpoint({k: checkpoint[k] for k in parts["transformer"]}, root, path)}
    for name, (read, cls) in readers.items():
        if name in parts:
            modules[name] = read()
            continue
        if not any(f.suffix in (".safetensors", ".bin") for f in (root / name).iterdir()):
            raise DiffclsError(f"{path} holds no {name} and the --config directory's {root / name} has no weights; "
                               f"pass a Flux --config directory with them, e.g. {config_hint(kind)}")
        modules[name] = load(name, cls.from_pretrained)
    return _flux_model(root, load, sched, modules, path)


def save_flux_directory(model: FluxModel, out_dir) -> Path:
    """The layout `FluxPipeline.save_pretrained` writes (safetensors weights)."""
    index = {"_class_name": PIPELINE_CLASS, "scheduler": ["diffusers", model.scheduler_config["_class_name"]],
             "transformer": ["diffusers", TRANSFORMER_CLASS], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer": ["transformers", type(model.tokenizer.parts["tokenizer"]).__name__],
             "tokenizer_2": ["transformers", type(model.tokenizer.parts["tokenizer_2"]).__name__],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    return save_parts(model, Path(out_dir), model.scheduler_config, index)
