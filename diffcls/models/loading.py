"""Load a Stable Diffusion model (diffusers directory or single checkpoint) into an `SDModel`.

Only the parts classification needs are loaded: tokenizer, text encoder, VAE (its encoder is
what runs), UNet and the scheduler config (for ᾱ, `alphas_cumprod`). No safety checker, no
feature extractor, no network: everything comes from local files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffcls.errors import DiffclsError
from diffcls.models import spec as specs
from diffcls.models import wrappers
from diffcls.models.dit import DEFAULT_SCHEDULE as DIT_DEFAULT_SCHEDULE
from diffcls.models.dit import DiTModel, class_labels, is_dit_directory, load_dit_directory

REQUIRED_DIRS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
# what the UNet predicts (the scheduler config's `prediction_type`); the scorer knows these targets
PREDICTION_TYPES = ("epsilon", "v_prediction")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class SDModel:
    """A loaded latent diffusion model, ready to be wrapped into engines."""

    tokenizer: object  # transformers CLIPTokenizer
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    unet: torch.nn.Module  # diffusers UNet2DConditionModel
    alphas_cumprod: torch.Tensor  # (T,) float32, ᾱ_t of the training noise schedule
    source: str = "<memory>"  # where it was loaded from, for messages and manifests
    prediction_type: str = "epsilon"  # the UNet's target: "epsilon" (noise) or "v_prediction"
    _fingerprint: str | None = field(default=None, repr=False)

    # --- derived facts, read once from the configs -------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @property
    def vae_force_upcast(self) -> bool:
        """The VAE config asks to run in fp32 (`force_upcast`, true for SD's VAE: it overflows in fp16)."""
        return bool(getattr(self.vae.config, "force_upcast", False))

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
            h = hashlib.sha256()
            for name in ("text_encoder", "vae", "unet"):
                module = getattr(self, name)
                h.update(name.encode())
                h.update(_config_json(module).encode())
                for key, tensor in sorted(module.state_dict().items()):
                    h.update(key.encode())
                    t = tensor.detach().to("cpu").contiguous()
                    h.update(str(t.dtype).encode())
                    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            h.update(self.alphas_cumprod.detach().cpu().float().numpy().tobytes())
            if self.prediction_type != "epsilon":  # same weights, other target: another model
                h.update(f"prediction_type={self.prediction_type}".encode())
            vocab = self.tokenizer.get_vocab()
            h.update(json.dumps(sorted(vocab.items())).encode())
            self._fingerprint = h.hexdigest()[:16]
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


# what `load_model` returns: engines and export take either
MODEL_TYPES = (SDModel, DiTModel)


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


def prediction_type_from_scheduler_config(config: dict, where) -> str:
    """The scheduler config's `prediction_type` (absent: epsilon); one the scorer cannot score is refused."""
    value = config.get("prediction_type") or "epsilon"
    if value not in PREDICTION_TYPES:
        raise DiffclsError(
            f"{where}: prediction_type {value!r} is not supported; diffcls scores models that predict "
            f"{' or '.join(PREDICTION_TYPES)} (set it in the scheduler config if that is what the UNet was trained for)"
        )
    return value


def default_model_path() -> Path:
    """The bundled demo model (trained on scikit-learn digits), shipped inside the package."""
    return Path(__file__).resolve().parent / "demo"


# the models that ship inside the package, addressable by name: --model demo / --model demo-dit
BUNDLED = {"demo": "demo", "demo-dit": "demo-dit"}


def bundled_model_path(name: str = "demo") -> Path:
    return Path(__file__).resolve().parent / BUNDLED[name]


def resolve_model_path(path: str | Path | None = None) -> Path:
    """None -> the SD demo; a bundled name ("demo", "demo-dit") that is not a local path -> its
    directory inside the package; anything else as given."""
    if path is None:
        return default_model_path()
    if str(path) in BUNDLED and not Path(path).exists():
        return bundled_model_path(str(path))
    return Path(path)


def check_model_path(path: str | Path | None = None) -> Path:
    """The model path, if it can be a model (exists; a directory has every component); cheap."""
    path = resolve_model_path(path)
    if not path.exists():
        if path in [bundled_model_path(n) for n in BUNDLED]:
            raise DiffclsError(
                f"the bundled model is missing at {path}; reinstall diffcls or pass --model DIR"
            )
        raise DiffclsError(
            f"model path {path} does not exist; pass a diffusers directory, a checkpoint file, "
            f"or a bundled model ({', '.join(BUNDLED)})"
        )
    if path.is_dir():
        if is_dit_directory(path):
            return path  # its components are checked when it loads
        missing = [d for d in REQUIRED_DIRS if not (path / d).is_dir()]
        if missing:
            raise DiffclsError(
                f"model directory {path} lacks {', '.join(missing)}/; a diffusers Stable Diffusion "
                f"directory needs {', '.join(d + '/' for d in REQUIRED_DIRS)} (a DiT directory: transformer/, vae/, scheduler/)"
            )
    return path


def load_model(path: str | Path | None = None) -> SDModel | DiTModel:
    """Load from a diffusers directory (Stable Diffusion or DiT), a single checkpoint file, a
    bundled model's name, or (None) the SD demo model."""
    path = check_model_path(path)
    if path.is_file():
        return _load_single_file(path)
    if is_dit_directory(path):
        quiet_hf_logs()
        return load_dit_directory(path)
    return _load_directory(path)


def quiet_hf_logs() -> None:
    """diffusers/transformers log progress bars and advice on every load; keep the CLI clean."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - logging knobs only
        pass


def _load_directory(path: Path) -> SDModel:
    """A directory `check_model_path` accepted (load_model checks it first)."""
    quiet_hf_logs()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def load(kind: str, loader):
        try:
            return loader(path / kind)
        except Exception as e:  # noqa: BLE001 - any loader failure is a broken component dir
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DiffclsError(
                f"cannot load {path / kind}: {first}; re-save that component with diffusers/transformers"
            ) from e

    tokenizer = load("tokenizer", lambda p: CLIPTokenizer.from_pretrained(p))
    text_encoder = load("text_encoder", lambda p: CLIPTextModel.from_pretrained(p))
    vae = load("vae", lambda p: AutoencoderKL.from_pretrained(p))
    unet = load("unet", lambda p: UNet2DConditionModel.from_pretrained(p))
    sched_file = path / "scheduler" / "scheduler_config.json"
    try:
        sched_cfg = json.loads(sched_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffclsError(f"cannot read {sched_file}: {e}; it must be a diffusers scheduler config") from e
    model = SDModel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        alphas_cumprod=alphas_cumprod_from_scheduler_config(sched_cfg),
        source=str(path),
        prediction_type=prediction_type_from_scheduler_config(sched_cfg, sched_file),
    )
    return model.eval()


def _load_single_file(path: Path) -> SDModel:
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise DiffclsError(
            f"{path} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}); pass a diffusers directory or a checkpoint file"
        )
    quiet_hf_logs()
    try:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_single_file(
            str(path), local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffclsError(
            f"cannot load checkpoint {path}: {first}; single-file loading needs the original "
            "configs cached locally, or convert it to a diffusers directory and pass --model DIR"
        ) from e
    model = SDModel(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        alphas_cumprod=alphas_cumprod_from_scheduler_config(dict(pipe.scheduler.config)),
        source=str(path),
        prediction_type=prediction_type_from_scheduler_config(dict(pipe.scheduler.config), path),
    )
    return model.eval()


def model_defaults(path: str | Path | None) -> dict:
    """Optional `diffcls.json` beside a model: default image_size, prompts file, schedule.

    A class-conditional model (a DiT directory, or an engine directory exported from one) also
    gives `labels` (class id -> name) and the DiT protocol's schedule unless diffcls.json has one.

    The bundled demo model ships one so that `diffcls classify DIR` needs no other flags.
    Paths inside it are relative to the model directory.
    """
    root = resolve_model_path(path)
    f = root / "diffcls.json"
    labels = class_labels(root) if root.is_dir() else None
    # a class-conditional model: every class is a prompt, scored with the official DiT protocol
    base = {"labels": labels, **DIT_DEFAULT_SCHEDULE} if labels else {}
    if not root.is_dir() or not f.exists():
        return base
    try:
        d = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffclsError(f"cannot read {f} ({e}); fix or delete it") from None
    if "prompts" in d:
        d["prompts"] = str(root / d["prompts"])
    return {**base, **d}
