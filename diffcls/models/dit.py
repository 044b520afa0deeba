"""Class-conditional latent diffusion transformers (DiT, Peebles & Xie, ICCV 2023) as classifiers.

The paper's second system (`eval_prob_dit.py`) scores a DiT-XL/2 trained on ImageNet: a
"prompt" is a class id, the conditioning input is `class_labels` (int64, one per sample)
instead of text embeddings, and with learned sigma the transformer returns 2C channels of which
the first C are the noise prediction. A `DiTModel` reads the directory `DiTPipeline.save_pretrained`
writes (transformer/, vae/, scheduler/, model_index.json; class names from `id2label` there) and
offers the same interface as `SDModel`, so export, engines and runtime treat both alike:

- `component_specs(image_size)`: the prompt-encoder role is a pass-through (class ids need no
  encoder, nothing is exported for it); the "unet" role takes `class_labels`;
- `wrap(component)`: the torch modules with exactly those signatures;
- `tokenizer`: a `LabelTokenizer` that turns prompts ("207" or a label name) into class ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffcls.errors import DiffclsError
from diffcls.models import filehash
from diffcls.models import spec as specs
from diffcls.models.latent import LatentDiffusionModel, hash_module
from diffcls.models import wrappers

KIND = "dit"
PIPELINE_CLASS = "DiTPipeline"
REQUIRED_DIRS = ("transformer", "vae", "scheduler")
LABELS_FILE = "id2label.json"  # what LabelTokenizer.save_pretrained writes
PREDICTION_TYPES = ("epsilon", "v_prediction")  # the targets the scorer knows (as loading.PREDICTION_TYPES)
# the official protocol: every class at every timestep of a grid with interval 5 (t = 2, 7, ...)
DEFAULT_SCHEDULE = {"n_samples": [200], "to_keep": [1]}


class LabelTokenizer:
    """Prompts -> class ids for a class-conditional model; called like a transformers tokenizer.

    A prompt is a class id ("207") or one of the model's label names (a DiT label may list
    synonyms, "tench, Tinca tinca": each one names the class).
    """

    def __init__(self, id2label: dict[int, str]):
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.label2id: dict[str, int] = {}
        for i, text in sorted(self.id2label.items()):
            for name in [text, *text.split(",")]:
                self.label2id.setdefault(name.strip(), i)

    def __len__(self) -> int:
        return len(self.id2label)

    def class_id(self, prompt: str) -> int:
        text = str(prompt).strip()
        if text.lstrip("-").isdigit() and int(text) in self.id2label:
            return int(text)
        if text in self.label2id:
            return self.label2id[text]
        raise DiffclsError(
            f"{prompt!r} is not a class of this model; use a class id 0..{len(self) - 1} or a label name "
            f"(e.g. {self.id2label[min(self.id2label)]!r})"
        )

    def __call__(self, prompts, **_ignored) -> "_Encoded":
        """(P,) int64 class ids; padding/truncation arguments have nothing to do here."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return _Encoded(torch.tensor([self.class_id(p) for p in prompts], dtype=torch.int64))

    def get_vocab(self) -> dict[str, int]:
        return dict(self.label2id)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (LABELS_FILE + ".tmp")
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(self.id2label.items())}, indent=2) + "\n")
        tmp.replace(out / LABELS_FILE)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "LabelTokenizer":
        f = Path(path) / LABELS_FILE
        try:
            return cls(json.loads(f.read_text()))
        except (OSError, ValueError, AttributeError) as e:
            raise DiffclsError(f"cannot read the class labels {f} ({type(e).__name__}); re-export the engine directory") from e


@dataclass
class _Encoded:
    input_ids: torch.Tensor


@dataclass
class DiTModel(LatentDiffusionModel):
    """A loaded class-conditional DiT (transformer + VAE + noise schedule + class names)."""

    transformer: torch.nn.Module  # diffusers DiTTransformer2DModel
    vae: torch.nn.Module  # diffusers AutoencoderKL
    alphas_cumprod: torch.Tensor  # (T,) float32
    id2label: dict[int, str]
    source: str = "<memory>"
    prediction_type: str = "epsilon"  # the scheduler config's (DiT predicts the noise)
    kind: str = KIND
    _fingerprint: str | None = field(default=None, repr=False)
    # (directory, its files' sizes and mtimes, library versions): where fingerprint() remembers itself
    _fingerprint_record: tuple | None = field(default=None, repr=False)

    # --- derived facts ------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def default_image_size(self) -> int:
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    @property
    def max_length(self) -> int:
        return 1  # one class id per prompt

    @property
    def hidden_size(self) -> int:
        return 0  # no prompt embedding: the class id is the conditioning

    @property
    def tokenizer(self) -> LabelTokenizer:
        return LabelTokenizer(self.id2label)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor
        h = image_size // f if image_size % f == 0 else None
        if h is None or h != int(self.transformer.config.sample_size):
            # a DiT's positional embedding is fixed to its training resolution
            raise DiffclsError(
                f"--image-size {image_size} does not fit this DiT, which takes {self.default_image_size} px "
                f"({self.transformer.config.sample_size}x{self.transformer.config.sample_size} latents); "
                f"pass --image-size {self.default_image_size} or drop it"
            )
        return (self.latent_channels, h, h)

    # --- the one component description ----------------------------------------------------------
    def component_specs(self, image_size: int) -> dict[str, specs.ComponentSpec]:
        return specs.dit_component_specs(image_size=image_size, latent_shape=self.latent_shape(image_size))

    def wrap(self, component: str) -> torch.nn.Module:
        if component == "text_encoder":
            return wrappers.PassThrough()
        if component == "vae_encoder":
            return wrappers.VaeEncoderWrapper(self.vae, self.scaling_factor)
        if component == "unet":
            return wrappers.DiTWrapper(self.transformer)
        raise ValueError(f"unknown component {component!r}")

    def fingerprint(self) -> str:
        """sha256 over the transformer's and VAE's configs and weights, ᾱ and the labels (16 hex).
        Loaded from a directory, it is remembered by the files' sizes and mtimes (as for SD)."""
        if self._fingerprint is None:
            self._fingerprint = hash_dit_weights(self)
            if self._fingerprint_record is not None:
                root, state, versions = self._fingerprint_record
                filehash.remember_fingerprint(root, versions, state, self._fingerprint)
        return self._fingerprint

    def to(self, device, dtype: torch.dtype | None = None) -> "DiTModel":
        for m in (self.transformer, self.vae):
            m.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "DiTModel":
        for m in (self.transformer, self.vae):
            m.eval().requires_grad_(False)
        return self


def hash_dit_weights(model: DiTModel) -> str:
    """The fingerprint computed from the loaded configs and tensors (reads every weight)."""
    h = hashlib.sha256(KIND.encode())
    for name in ("transformer", "vae"):
        module = getattr(model, name)
        hash_module(h, name, module, _config_json(module))
    h.update(model.alphas_cumprod.detach().cpu().float().numpy().tobytes())
    h.update(json.dumps(sorted(model.id2label.items())).encode())
    if model.prediction_type != "epsilon":
        h.update(f"prediction_type={model.prediction_type}".encode())
    return h.hexdigest()[:16]


def _config_json(module) -> str:
    """A module's config without bookkeeping keys (the rule `loading._config_json` applies)."""
    d = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    return json.dumps(d, sort_keys=True, default=str)


# --- the directory ------------------------------------------------------------------------------
def is_dit_directory(path: str | Path) -> bool:
    """A `DiTPipeline` directory: model_index.json names it, or it has transformer/ and no unet/."""
    path = Path(path)
    if not path.is_dir():
        return False
    index = read_model_index(path)
    if index.get("_class_name") == PIPELINE_CLASS:
        return True
    # a text-conditioned transformer (SD3, Flux) has text encoders; a DiT has none
    return (path / "transformer").is_dir() and not (path / "unet").is_dir() and not (path / "text_encoder").is_dir()


def read_model_index(path: Path) -> dict:
    try:
        d = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def read_id2label(path: str | Path, num_classes: int | None = None) -> dict[int, str]:
    """Class names from model_index.json's `id2label` (as the DiT pipelines carry them), else ids."""
    raw = read_model_index(Path(path)).get("id2label")
    if isinstance(raw, dict) and raw:
        try:
            return {int(k): str(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}
        except ValueError:
            raise DiffclsError(f"{Path(path) / 'model_index.json'}: id2label keys must be class ids; fix the file") from None
    if num_classes is None:
        return {}
    return {i: str(i) for i in range(num_classes)}


def class_labels(root: str | Path) -> dict[int, str] | None:
    """The classes of a class-conditional model directory or of an engine directory exported
    from one (its `tokenizer/id2label.json`); None for anything else."""
    root = Path(root)
    copy = root / "tokenizer" / LABELS_FILE
    if copy.is_file():
        return LabelTokenizer.from_pretrained(copy.parent).id2label
    if not is_dit_directory(root):
        return None
    try:
        n = int(json.loads((root / "transformer" / "config.json").read_text())["num_embeds_ada_norm"])
    except (OSError, ValueError, KeyError, TypeError):
        n = None
    return read_id2label(root, n) or None


def check_dit_directory(path: Path) -> None:
    missing = [d for d in REQUIRED_DIRS if not (path / d).is_dir()]
    if missing:
        raise DiffclsError(
            f"DiT directory {path} lacks {', '.join(d + '/' for d in missing)}; a diffusers DiT directory "
            f"(DiTPipeline.save_pretrained) has {', '.join(d + '/' for d in REQUIRED_DIRS)}"
        )


def load_dit_directory(path: str | Path) -> DiTModel:
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    path = Path(path)
    check_dit_directory(path)

    def load(kind: str, loader):
        try:
            return loader(str(path / kind))
        except Exception as e:  # noqa: BLE001 - any loader failure is a broken component dir
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DiffclsError(f"cannot load {path / kind}: {first}; re-save that component with diffusers") from e

    transformer = load("transformer", DiTTransformer2DModel.from_pretrained)
    vae = load("vae", AutoencoderKL.from_pretrained)
    sched_file = path / "scheduler" / "scheduler_config.json"
    try:
        sched = {k: v for k, v in json.loads(sched_file.read_text()).items() if not k.startswith("_")}
    except (OSError, ValueError) as e:
        raise DiffclsError(f"cannot read {sched_file}: {e}; it must be a diffusers scheduler config") from e
    alphas = DDPMScheduler.from_config(sched).alphas_cumprod.to(torch.float32).clone()
    prediction_type = sched.get("prediction_type") or "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise DiffclsError(
            f"{sched_file}: prediction_type {prediction_type!r} is not supported; diffcls scores models that "
            f"predict {' or '.join(PREDICTION_TYPES)}"
        )
    n = int(transformer.config.num_embeds_ada_norm)
    id2label = read_id2label(path, n)
    extra = sorted(k for k in id2label if not 0 <= k < n)
    if extra:
        raise DiffclsError(f"{path / 'model_index.json'}: id2label has ids {extra[:3]} outside the model's {n} classes; fix id2label")
    model = DiTModel(transformer=transformer, vae=vae, alphas_cumprod=alphas, id2label=id2label, source=str(path),
                     prediction_type=prediction_type)
    return model.eval()


def save_dit_directory(model: DiTModel, out_dir: str | Path, sched_cfg: dict) -> Path:
    """Write the layout `DiTPipeline.save_pretrained` writes, with `id2label` in model_index.json
    (where the DiT pipelines on the Hub carry it and `DiTPipeline.from_pretrained` reads it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(str(out / "transformer"), safe_serialization=True)
    model.vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2) + "\n")
    index = {
        "_class_name": PIPELINE_CLASS,
        "id2label": {str(i): name for i, name in sorted(model.id2label.items())},
        "scheduler": ["diffusers", sched_cfg.get("_class_name", "DDIMScheduler")],
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def dit_scheduler_config(num_train_timesteps: int = 1000) -> dict:
    """DiT's noise schedule (linear betas 1e-4..0.02), as the DiT-XL-2 pipelines ship it."""
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
        "clip_sample": False,
        "set_alpha_to_one": True,
        "steps_offset": 0,
    }


def tiny_dit(seed: int = 0, *, num_classes: int = 5, sample_size: int = 8, learn_sigma: bool = True,
             vae_channels: tuple[int, ...] = (32, 64)) -> DiTModel:
    """A deterministic tiny DiT from a `DiTTransformer2DModel` config (random weights), for tests."""
    from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8 if learn_sigma else 4,
            num_layers=2, sample_size=sample_size, patch_size=2, num_embeds_ada_norm=num_classes,
        )
        with torch.no_grad():  # adaLN-Zero starts at zero: spread it like a trained model
            for p in transformer.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        n = len(vae_channels)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=vae_channels, latent_channels=4, layers_per_block=1,
            norm_num_groups=min(32, vae_channels[0]), sample_size=sample_size * 2 ** (n - 1),
        )
        with torch.no_grad():
            for p in vae.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    finally:
        torch.random.set_rng_state(state)
    sched = {k: v for k, v in dit_scheduler_config().items() if not k.startswith("_")}
    alphas = DDPMScheduler.from_config(sched).alphas_cumprod.to(torch.float32).clone()
    names = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
    id2label = {i: (names[i] if i < len(names) else f"class {i}") for i in range(num_classes)}
    return DiTModel(transformer, vae, alphas, id2label, source=f"<tiny dit seed={seed}>").eval()
