"""Load a Stable Diffusion model (diffusers directory or single checkpoint) into an `SDModel`.

Only the parts classification needs are loaded: tokenizer, text encoder, VAE (its encoder is
what runs), UNet and the scheduler config (for ᾱ, `alphas_cumprod`). No safety checker, no
feature extractor, no network: everything comes from local files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffcls.errors import DiffclsError
from diffcls.models import filehash

log = logging.getLogger(__name__)
from diffcls.models import spec as specs
from diffcls.models.latent import LatentDiffusionModel, hash_module
from diffcls.models import wrappers
from diffcls.models.dit import DEFAULT_SCHEDULE as DIT_DEFAULT_SCHEDULE
from diffcls.models.dit import DiTModel, class_labels, is_dit_directory, load_dit_directory, read_model_index
from diffcls.models import flux
from diffcls.models.flux import FluxModel, is_flux_directory, load_flux_directory
from diffcls.models.sd3 import SD3Model, is_sd3_directory, load_sd3_directory
from diffcls.models.sdxl import SDXLModel, is_sdxl_directory, load_sdxl_directory
# the noise table and what the denoiser predicts, from the scheduler config (models.noising)
from diffcls.models.noising import FLOW_DEFAULT_WEIGHTING, is_flow_config, noise_from_scheduler_config, noise_from_scheduler_dir

REQUIRED_DIRS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# "org/name" as the Hugging Face Hub spells model ids
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*")
# single-file checkpoints: the diffusers repos whose configs describe them (diffusers' model types)
SD1_CONFIG_REPOS = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")
SD2_CONFIG_REPOS = ("stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1")
SDXL_CONFIG_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
SD3_CONFIG_REPO = "stabilityai/stable-diffusion-3-medium-diffusers"
# an SDXL (SGM-layout) checkpoint's text encoders: CLIP-L in transformers' layout, CLIP-G in OpenCLIP's
SGM_TEXT_KEYS = ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                 "conditioner.embedders.1.model.positional_embedding")
# an SD3/3.5 checkpoint's MMDiT (the original layout), with or without its `model.diffusion_model.` prefix
MMDIT_KEYS = ("model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
              "joint_blocks.0.context_block.adaLN_modulation.1.bias")
# a Flux checkpoint's transformer (BFL's layout, diffusers' own marker), with or without the prefix
FLUX_KEYS = ("model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.norm.key_norm.scale")
# what a single file is, and what a --config directory is, in messages
FILE_FAMILIES = {"sdxl": ("an SDXL checkpoint", "an SDXL directory"), "sd3": ("an SD3/3.5 checkpoint", "an SD3 directory"),
                 "flux": ("a Flux checkpoint", "a Flux directory"),
                 "stable-diffusion": ("a Stable Diffusion 1.x/2.x checkpoint", "a Stable Diffusion 1.x/2.x directory")}


@dataclass
class SDModel(LatentDiffusionModel):
    """A loaded latent diffusion model, ready to be wrapped into engines."""

    tokenizer: object  # transformers CLIPTokenizer
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    alphas_cumprod: torch.Tensor  # (T,) float32, ᾱ_t of the training noise schedule
    source: str = "<memory>"  # where it was loaded from, for messages and manifests
    prediction_type: str = "epsilon"  # the UNet's target: "epsilon" (noise), "v_prediction" or "flow"
    sigmas: torch.Tensor | None = None  # (T,) float32 σ_t of a flow-matching model (models.noising), else None
    _fingerprint: str | None = field(default=None, repr=False)
    # (directory, its files' sizes and mtimes, library versions): where fingerprint() remembers itself
    _fingerprint_record: tuple | None = field(default=None, repr=False)

    # --- derived facts, read once from the configs -------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def default_image_size(self) -> int:
        """The resolution the UNet was trained at (512 for SD 2.x base)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def max_length(self) -> int:
        return int(self.text_encoder.config.max_position_embeddings)

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.vae_scale_factor:
            raise DiffclsError(
                f"--image-size {image_size} is not a multiple of the VAE's downsampling factor "
                f"{self.vae_scale_factor}; pick e.g. {self.default_image_size}"
            )
        h = image_size // self.vae_scale_factor
        return (self.latent_channels, h, h)

    def fingerprint(self) -> str:
        """sha256 over every component's config and weights (16 hex chars).

        Identifies the model in caches and engine manifests: same weights and configs -> same
        fingerprint, whatever path they were loaded from.
        """
        if self._fingerprint is None:
            self._fingerprint = hash_weights(self)
            if self._fingerprint_record is not None:  # loaded from a directory: remember it
                root, state, versions = self._fingerprint_record
                filehash.remember_fingerprint(root, versions, state, self._fingerprint)
        return self._fingerprint

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "SDModel":
        for m in (self.text_encoder, self.vae, self.unet):
            m.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "SDModel":
        for m in (self.text_encoder, self.vae, self.unet):
            m.eval().requires_grad_(False)
        return self

    # --- the one component description (a `DiTModel` offers the same two) ----------------------
    kind = "stable-diffusion"

    def component_specs(self, image_size: int) -> dict[str, specs.ComponentSpec]:
        return specs.component_specs(
            max_length=self.max_length,
            hidden_size=self.hidden_size,
            image_size=image_size,
            latent_shape=self.latent_shape(image_size),
        )

    def wrap(self, component: str) -> torch.nn.Module:
        return wrappers.sd_module(self, component)


# what `load_model` returns: engines and export take any of them
MODEL_TYPES = (SDModel, DiTModel, SD3Model, SDXLModel, FluxModel)
# diffusers pipelines (model_index.json's _class_name) diffcls classifies with, and what it says of the rest
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": "Stable Diffusion 1.x/2.x",
    "StableDiffusionXLPipeline": "SDXL and SDXL-Turbo",
    "StableDiffusion3Pipeline": "Stable Diffusion 3/3.5",
    "FluxPipeline": "Flux text-to-image (FLUX.1-dev, FLUX.1-schnell)",
    "DiTPipeline": "class-conditional DiT",
}
# families refused with a reason of their own
REFUSED_PIPELINES = {
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner (trained only on the low-noise end of the schedule, conditioned on an aesthetic score); classify with the SDXL base model",
    **flux.REFUSED,
}


def check_pipeline_family(path: Path) -> None:
    """Refuse, in one line naming what is supported, a directory of a pipeline diffcls cannot score."""
    name = read_model_index(path).get("_class_name")
    if name is None or name in SUPPORTED_PIPELINES:
        return
    supported = ", ".join(f"{v} ({k})" for k, v in SUPPORTED_PIPELINES.items())
    what = REFUSED_PIPELINES.get(name, f"a {name} model, which diffcls does not classify with")
    raise DiffclsError(f"{path} is {what}; supported: {supported}")


def hash_weights(model: SDModel) -> str:
    """The fingerprint computed from the loaded configs and tensors (reads every weight)."""
    h = hashlib.sha256()
    for name in ("text_encoder", "vae", "unet"):
        module = getattr(model, name)
        hash_module(h, name, module, _config_json(module))
    h.update(model.alphas_cumprod.detach().cpu().float().numpy().tobytes())
    if model.prediction_type != "epsilon":  # same weights, other target: another model
        h.update(f"prediction_type={model.prediction_type}".encode())
    if model.sigmas is not None:
        h.update(model.sigmas.detach().cpu().float().numpy().tobytes())
    vocab = model.tokenizer.get_vocab()
    h.update(json.dumps(sorted(vocab.items())).encode())
    return h.hexdigest()[:16]


def _library_versions() -> dict:
    """What shapes the fingerprint besides the files: configs are read through these libraries."""
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def cached_fingerprint(model: str | Path | None) -> str | None:
    """The fingerprint of the model directory `model` remembered from an earlier load, if its
    files are unchanged; None if it must be loaded to be fingerprinted (or is a single file)."""
    path = check_model_path(model)
    if not path.is_dir():
        return None
    return filehash.lookup_fingerprint(path, _library_versions())


def _config_json(module) -> str:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return ""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    # bookkeeping that save_pretrained adds or that varies by library version, not the model
    for key in ("transformers_version", "diffusers_version", "architectures", "dtype", "torch_dtype", "name_or_path"):
        d.pop(key, None)
    return json.dumps(d, sort_keys=True, default=str)


def alphas_cumprod_from_scheduler_config(config: dict) -> torch.Tensor:
    """ᾱ from a scheduler config, computed by diffusers' own DDPMScheduler."""
    from diffusers import DDPMScheduler

    known = {k: v for k, v in config.items() if not k.startswith("_")}
    scheduler = DDPMScheduler.from_config(known)
    return scheduler.alphas_cumprod.to(torch.float32).clone()


def default_model_path() -> Path:
    """The bundled demo model (trained on scikit-learn digits), shipped inside the package."""
    return Path(__file__).resolve().parent / "demo"


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a Hugging Face model id (what `hf download` or diffusers left in the
    cache, `$HF_HUB_CACHE`), found by huggingface_hub itself without the network; None if absent."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not cached
        log.debug("%s is not in the local Hugging Face cache: %s", repo_id, e)
        return None


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


# the models that ship inside the package, addressable by name: --model demo / demo-dit / demo-shapes / demo-flow
BUNDLED = {"demo": "demo", "demo-dit": "demo-dit", "demo-shapes": "demo-shapes", "demo-flow": "demo-flow"}


def bundled_model_path(name: str = "demo") -> Path:
    return Path(__file__).resolve().parent / BUNDLED[name]


def resolve_model_path(model: str | Path | None = None) -> Path:
    """A `--model` argument as a local path: None -> the SD demo; a bundled name ("demo",
    "demo-dit", "demo-shapes") that is not a local path -> its directory inside the package; a directory or file
    as given; else a Hugging Face model id ("org/name") resolved in the local cache. Nothing is
    downloaded."""
    if model is None:
        return default_model_path()
    path = Path(model)
    if str(model) in BUNDLED and not path.exists():
        return bundled_model_path(str(model))
    if path.exists():
        return path
    text = str(model)
    if REPO_ID.fullmatch(text):
        snapshot = hub_snapshot(text)
        if snapshot is not None:
            return snapshot
        raise DiffclsError(
            f"--model {text} is not a local path, and the Hugging Face model {text} is not in the local "
            f"cache ({hub_cache_dir()}); download it with: hf download {text}"
        )
    raise DiffclsError(
        f"model path {path} does not exist; pass a diffusers directory, a checkpoint file, a bundled "
        f"model ({', '.join(BUNDLED)}) or a Hugging Face model id (org/name) from the local cache"
    )


def check_model_path(path: str | Path | None = None) -> Path:
    """The model path, if it can be a model (exists; a directory has every component); cheap.

    `path` may be a bundled model's name or a Hugging Face model id; the local path is returned.
    """
    path = resolve_model_path(path)
    if not path.exists():
        if path in [bundled_model_path(n) for n in BUNDLED]:
            raise DiffclsError(
                f"the bundled model is missing at {path}; reinstall diffcls or pass --model DIR"
            )
    if path.is_dir():
        check_pipeline_family(path)
        if is_dit_directory(path) or is_flux_directory(path) or is_sd3_directory(path) or is_sdxl_directory(path):
            return path  # its components are checked when it loads
        missing = [d for d in REQUIRED_DIRS if not (path / d).is_dir()]
        if missing:
            raise DiffclsError(
                f"model directory {path} lacks {', '.join(missing)}/; a diffusers Stable Diffusion "
                f"directory needs {', '.join(d + '/' for d in REQUIRED_DIRS)} (a DiT directory: transformer/, vae/, scheduler/)"
            )
    return path


def load_model(path: str | Path | None = None, *, config: str | Path | None = None, no_t5: bool = False) -> SDModel | DiTModel | SD3Model | SDXLModel | FluxModel:
    """Load from a diffusers directory (Stable Diffusion or DiT), a bundled model's name, a Hugging
    Face model id in the local cache, a single checkpoint file (`config`: the diffusers directory
    or cached model id whose configs describe it; inferred for SD 1.x), or (None) the SD demo
    model. `no_t5`: an SD3 directory without its T5 encoder (`models.sd3`; other models refuse
    it). Never touches the network. Quiet: diffusers' and transformers' advice and progress
    bars are off while it loads (their settings are restored after; DIFFCLS_VERBOSE=1 keeps them)."""
    if no_t5:
        check_no_t5(path)
    with _quiet_libraries():
        return _load_model(path, config, no_t5)


def check_no_t5(model) -> None:
    """Refuse `--no-t5` (one line) for anything but an SD3 model (directory, cached id or object)."""
    if isinstance(model, SD3Model):
        return
    if isinstance(model, MODEL_TYPES):
        what = f"a {model.kind} model"
    else:
        path = check_model_path(model)
        if is_sd3_directory(path) if path.is_dir() else checkpoint_family(path) == "sd3":
            return
        what = "a checkpoint file" if path.is_file() else f"a {_directory_kind(path)} directory"
    name = "the demo model" if model is None else model.source if isinstance(model, MODEL_TYPES) else model
    raise DiffclsError(f"--no-t5 skips SD3's T5 text encoder; {name} is {what}, not an SD3/3.5 model: drop --no-t5")


def _directory_kind(path: Path) -> str:
    return "Flux" if is_flux_directory(path) else "DiT" if is_dit_directory(path) else "SDXL" if is_sdxl_directory(path) else "Stable Diffusion"


@contextlib.contextmanager
def _quiet_libraries():
    """diffusers/transformers logging at error level and their progress bars off, then restored."""
    if os.environ.get("DIFFCLS_VERBOSE"):
        yield
        return
    import diffusers
    import transformers

    dl, tl = diffusers.utils.logging, transformers.utils.logging
    levels = (dl.get_verbosity(), tl.get_verbosity())
    bars = (dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled())
    dl.set_verbosity_error()
    tl.set_verbosity_error()
    dl.disable_progress_bar()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        dl.set_verbosity(levels[0])
        tl.set_verbosity(levels[1])
        for lib, on in zip((dl, tl), bars):
            if on:
                lib.enable_progress_bar()


def _load_model(path, config, no_t5: bool = False) -> SDModel | DiTModel | SD3Model | SDXLModel | FluxModel:
    path = check_model_path(path)
    if path.is_file():
        return _load_single_file(path, config, no_t5)
    if config is not None:
        raise DiffclsError(f"--config is for single-file checkpoints; {path} is a diffusers directory, drop --config")
    if no_t5:  # another model than the directory's full one: its fingerprint is computed, not remembered
        return load_sd3_directory(path, t5=False)
    family = next((load for test, load in FAMILIES if test(path)), None)
    if family is not None:
        # as in _load_directory: the files' state before reading them, and a remembered fingerprint
        state, versions = filehash.directory_state(path), _library_versions()
        model = family(path)
        model._fingerprint = filehash.lookup_fingerprint(path, versions, state)
        model._fingerprint_record = (path, state, versions)
        return model
    return _load_directory(path)


# directory families other than SD 1.x/2.x: (is it one, its loader)
# (Flux before SD3: both have transformer/ and text_encoder_2/)
FAMILIES = ((is_dit_directory, load_dit_directory), (is_flux_directory, load_flux_directory), (is_sd3_directory, load_sd3_directory),
            (is_sdxl_directory, load_sdxl_directory))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_directory(path: Path) -> SDModel:
    """A directory `check_model_path` accepted (load_model checks it first)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    # the files' sizes and mtimes, before reading them: a fingerprint remembered for exactly
    # these files is reused instead of hashing gigabytes of weights again
    state = filehash.directory_state(path)
    versions = _library_versions()
    remembered = filehash.lookup_fingerprint(path, versions, state)

    def load(kind: str, loader):
        try:
            return loader(str(path / kind))
        except Exception as e:  # noqa: BLE001 - any loader failure is a broken component dir
            raise DiffclsError(
                f"cannot load {path / kind}: {_first_line(e)}; re-save that component with diffusers/transformers"
            ) from e

    local = {"local_files_only": True}
    tokenizer = load("tokenizer", lambda p: CLIPTokenizer.from_pretrained(p, **local))
    text_encoder = load("text_encoder", lambda p: CLIPTextModel.from_pretrained(p, **local))
    vae = load("vae", lambda p: AutoencoderKL.from_pretrained(p, **local))
    unet = load("unet", lambda p: UNet2DConditionModel.from_pretrained(p, **local))
    alphas, prediction_type, sigmas, _ = noise_from_scheduler_dir(path)
    model = SDModel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        alphas_cumprod=alphas,
        source=str(path),
        prediction_type=prediction_type,
        sigmas=sigmas,
        _fingerprint=remembered,
        _fingerprint_record=(path, state, versions),
    )
    return model.eval()


class _Shape:
    """Stands in for a tensor where only its shape is read (diffusers' model-type inference)."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a weight file: from the header (safetensors) or a memory map
    (.bin/.ckpt, a `state_dict` inside unwrapped), never reading the tensors' values. Raises
    whatever the readers raise; callers say what the file was meant to be."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else {}
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def checkpoint_shapes(path: Path) -> dict:
    """{key: object with .shape} of a checkpoint, without reading its tensors where possible."""
    try:
        shapes = weight_shapes(path)
    except Exception as e:  # noqa: BLE001 - unreadable file
        raise DiffclsError(f"cannot load checkpoint {path}: {_first_line(e)}; pass a readable .safetensors or .ckpt Stable Diffusion checkpoint") from e
    return {k: _Shape(v) for k, v in shapes.items()}


def checkpoint_family(path: Path, shapes: dict | None = None) -> str:
    """"sdxl" (the SGM layout's two text encoders), "sd3" (an MMDiT), "flux" (a Flux transformer:
    which one, diffusers' inference says) or "stable-diffusion" (the rest: what diffusers' own
    inference then tells apart), from the file's tensor names (`shapes` if read already)."""
    if shapes is None:
        shapes = checkpoint_shapes(path) if path.suffix in CHECKPOINT_SUFFIXES else {}
    marked = (("sdxl", SGM_TEXT_KEYS), ("sd3", MMDIT_KEYS), ("flux", FLUX_KEYS))
    return next((family for family, keys in marked if any(k in shapes for k in keys)), "stable-diffusion")


def single_file_config(path: Path, config: str | Path | None = None) -> Path:
    """The local diffusers directory whose configs (and tokenizer, scheduler) describe checkpoint
    `path`: `config` if given (a directory or a cached model id), else inferred from its tensors.

    SD 1.x files are unambiguous (their configs come from the local Hugging Face cache). SD 2.x
    base (512 px, epsilon) and 768-v (v-prediction) files have the same tensors, so they need
    `config`: guessing would score with the wrong prediction type.
    """
    if config is not None:
        return _config_dir(config)
    shapes = checkpoint_shapes(path)
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    family = checkpoint_family(path, shapes)
    kind = {"sdxl": "xl", "sd3": "sd3"}.get(family) or infer_diffusers_model_type(shapes)
    include = "--include '*.json' --include '*.txt'"
    if kind == "v2":
        a, b = SD2_CONFIG_REPOS
        raise DiffclsError(
            f"{path} is a Stable Diffusion 2.x checkpoint, and 2.x base (512 px, epsilon) and 768-v (v-prediction) "
            f"checkpoints have the same tensors; pass --config {a} or --config {b} (a diffusers directory "
            f"or a cached model id; get the configs with: hf download {a} {include})"
        )
    if str(kind).startswith("xl"):
        raise DiffclsError(
            f"{path} is a single-file SDXL checkpoint; pass --config with the diffusers SDXL directory or cached model id "
            f"whose configs describe it, e.g. --config {SDXL_CONFIG_REPO} (get the configs with: hf download {SDXL_CONFIG_REPO} {include})"
        )
    if family == "sd3":
        raise DiffclsError(
            f"{path} is a single-file SD3/3.5 checkpoint; pass --config with the diffusers SD3 directory or cached model id "
            f"whose configs describe it, e.g. --config {SD3_CONFIG_REPO} (get the configs with: hf download {SD3_CONFIG_REPO} "
            f"{include} --include '*.model')"
        )
    if family == "flux" and kind in flux.FILE_KINDS:
        raise DiffclsError(
            f"{path} is a single-file {flux.FILE_KINDS[kind]} checkpoint; pass --config with the diffusers Flux directory or cached "
            f"model id whose configs describe it (and holds the parts the file lacks), e.g. {flux.config_hint(kind)}"
        )
    if kind != "v1":
        raise DiffclsError(
            f"{path} is not a Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux (FLUX.1 [dev]/[schnell]) checkpoint (diffusers reads it as {kind!r}); "
            "pass a diffusers directory, or --config DIR with the configs of the model it was saved from"
        )
    for repo in SD1_CONFIG_REPOS:
        snapshot = hub_snapshot(repo)
        if snapshot is not None and all((snapshot / d).is_dir() for d in REQUIRED_DIRS):
            return snapshot
    raise DiffclsError(
        f"{path} is a Stable Diffusion 1.x checkpoint, and its configs are not in the local Hugging Face "
        f"cache ({hub_cache_dir()}); download them with: hf download {SD1_CONFIG_REPOS[0]} {include}, "
        "or pass --config DIR"
    )


def _config_dir(config: str | Path) -> Path:
    """The --config of a single file: a diffusers SD 1.x/2.x, SDXL, SD3 or Flux directory (or cached id)."""
    try:
        root = resolve_model_path(config)
    except DiffclsError as e:
        raise DiffclsError(f"--config {config}: {e}") from None
    if not root.is_dir():
        raise DiffclsError(f"--config {config} must be a diffusers model directory (or a cached model id), not a file")
    from diffcls.models import sd3

    required = flux.REQUIRED_DIRS if is_flux_directory(root) else sd3.REQUIRED_DIRS if is_sd3_directory(root) else REQUIRED_DIRS
    missing = [d for d in required if not (root / d).is_dir()]
    if missing:
        raise DiffclsError(
            f"--config {config} ({root}) lacks {', '.join(d + '/' for d in missing)}; it must hold a "
            "diffusers model's configs, e.g. hf download stabilityai/stable-diffusion-2-1-base --include '*.json' --include '*.txt'"
        )
    return root


def file_configs(path: Path, config: str | Path | None = None) -> tuple[Path, str]:
    """(the diffusers directory whose configs describe checkpoint `path`, the file's family):
    `single_file_config`'s directory, refused in one line where it is another family's."""
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise DiffclsError(
            f"{path} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}); pass a diffusers directory or a checkpoint file"
        )
    root = single_file_config(path, config)
    family = checkpoint_family(path)
    configs = ("flux" if is_flux_directory(root) else "sd3" if is_sd3_directory(root) else "sdxl" if is_sdxl_directory(root)
               else "stable-diffusion")
    if family != configs:  # diffusers would fill the parts it cannot find with random weights, or mix families
        raise DiffclsError(f"{path} is {FILE_FAMILIES[family][0]} and --config {config} is {FILE_FAMILIES[configs][1]}; "
                           "pass the configs of the model the file was saved from")
    return root, family


def _load_single_file(path: Path, config: str | Path | None = None, no_t5: bool = False) -> SDModel | SDXLModel | SD3Model | FluxModel:
    """A single checkpoint through diffusers' `from_single_file`, offline: the configs, tokenizers
    and scheduler come from the local directory `single_file_config` names, of the file's family
    (an SDXL file's text encoders are in the SGM layout: CLIP-L as transformers', CLIP-G as
    OpenCLIP's; an SD3 file's under `text_encoders.`, those it lacks read from the directory,
    `models.sd3.single_file_components`; a Flux file's transformer, and what else it carries,
    `models.flux.load_flux_file`).
    `no_t5`: an SD3 file without its T5 encoder, not even read (as `load_sd3_directory`)."""
    root, family = file_configs(path, config)
    try:
        from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

        local = {"config": str(root), "local_files_only": True}
        if family == "flux":
            return flux.load_flux_file(path, root, _flux_file_kind(path))
        if family == "sd3":
            from diffcls.models.sd3 import single_file_components

            parts = single_file_components(root, checkpoint_shapes(path), t5=not no_t5)
            pipe = StableDiffusion3Pipeline.from_single_file(str(path), **local, **parts)
        elif family == "sdxl":
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), **local)
        else:
            pipe = StableDiffusionPipeline.from_single_file(str(path), **local, safety_checker=None, feature_extractor=None,
                                                            requires_safety_checker=False)
    except DiffclsError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DiffclsError(
            f"cannot load checkpoint {path} with the configs in {root}: {_first_line(e)}; check that --config "
            "matches the checkpoint, or convert it to a diffusers directory and pass --model DIR"
        ) from e
    alphas, prediction_type, sigmas = noise_from_scheduler_config(dict(pipe.scheduler.config), path)
    if family == "sd3":
        from diffcls.models.sd3 import sd3_model

        return sd3_model(pipe, alphas, prediction_type, sigmas, path)
    if family == "sdxl":
        from diffcls.models.sdxl import sdxl_model

        return sdxl_model(pipe, alphas, prediction_type, sigmas, path)
    model = SDModel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae, unet=pipe.unet, alphas_cumprod=alphas,
                    source=str(path), prediction_type=prediction_type, sigmas=sigmas)
    return model.eval()


def _flux_file_kind(path: Path) -> str:
    """Which Flux a Flux file is (diffusers' inference), refused in one line unless diffcls scores it."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    kind = infer_diffusers_model_type(checkpoint_shapes(path))
    if kind not in flux.FILE_KINDS:
        raise DiffclsError(f"{path} is a single-file {kind} checkpoint (diffusers' name for it); supported: {flux.SUPPORTED}")
    return kind


def model_defaults(path: str | Path | None, config: str | Path | None = None) -> dict:
    """Optional `diffcls.json` beside a model: default image_size, prompts file, schedule.

    A class-conditional model (a DiT directory, or an engine directory exported from one) also
    gives `labels` (class id -> name) and the DiT protocol's schedule unless diffcls.json has one.
    A flow-matching model (its scheduler config, or the engine directory's copy, is
    FlowMatchEulerDiscreteScheduler) defaults to the logit-normal timestep weighting
    (`models.noising`) unless diffcls.json names one; so does a single checkpoint file whose
    `config` directory's scheduler is (an SD3 file, as its directory would).

    The bundled demo model ships one so that `diffcls classify DIR` needs no other flags.
    Paths inside it are relative to the model directory.
    """
    root = resolve_model_path(path)
    f = root / "diffcls.json"
    labels = class_labels(root) if root.is_dir() else None
    # a class-conditional model: every class is a prompt, scored with the official DiT protocol
    base = {"labels": labels, **DIT_DEFAULT_SCHEDULE} if labels else {}
    if _is_flow_directory(root if root.is_dir() else _config_dir(config) if config is not None else root):
        base["weighting"] = FLOW_DEFAULT_WEIGHTING
    if not root.is_dir() or not f.exists():
        return base
    try:
        d = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffclsError(f"cannot read {f} ({e}); fix or delete it") from None
    if "prompts" in d:
        d["prompts"] = str(root / d["prompts"])
    return {**base, **d}


def _is_flow_directory(root: Path) -> bool:
    try:
        return is_flow_config(json.loads((root / "scheduler" / "scheduler_config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return False
