"""What the models with several text encoders share (SDXL, SD3): one tokenizer row, one packed
embedding, one fingerprint rule.

diffcls keeps one prompt encoder and one conditioning input per model. A model conditioned on
more than one tensor per prompt (SD3: text embeddings and a pooled projection; SDXL: text
embeddings and the pooled embedding of its second encoder) packs them into the prompt encoder's
output, the extra vectors as rows after the text tokens (zero-padded to the width), and its
denoiser wrapper unpacks them. So the embedding cache, the engines and the scoring loop are the
ones every model uses; the token ids of several tokenizers travel as one row (`MultiTokenizer`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcls.errors import DiffclsError
from diffcls.models import filehash
from diffcls.models.latent import LatentDiffusionModel, hash_module

MULTI_FILE = "multi_tokenizer.json"


class MultiTokenizer:
    """Several tokenizers as one: each pads/truncates to its own length; ids concatenated."""

    def __init__(self, parts: dict[str, object], lengths: dict[str, int]):
        self.parts, self.lengths = dict(parts), {k: int(v) for k, v in lengths.items()}

    @property
    def model_max_length(self) -> int:
        return sum(self.lengths.values())

    def __call__(self, prompts, **_ignored):
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = [
            tok(list(prompts), padding="max_length", max_length=self.lengths[name], truncation=True, return_tensors="pt").input_ids
            for name, tok in self.parts.items()
        ]
        return _Encoded(torch.cat(rows, dim=1).to(torch.int64))

    def get_vocab(self) -> dict[str, int]:
        return {f"{name}:{k}": v for name, tok in self.parts.items() for k, v in tok.get_vocab().items()}

    def save_pretrained(self, out_dir) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, tok in self.parts.items():
            tok.save_pretrained(str(out / name))
        (out / MULTI_FILE).write_text(json.dumps({"parts": list(self.parts), "lengths": self.lengths}, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path) -> "MultiTokenizer":
        from transformers import AutoTokenizer

        path = Path(path)
        d = json.loads((path / MULTI_FILE).read_text())
        parts = {name: AutoTokenizer.from_pretrained(str(path / name), local_files_only=True) for name in d["parts"]}
        return cls(parts, d["lengths"])


@dataclass
class _Encoded:
    input_ids: torch.Tensor


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def component_loader(path: Path, pipeline: str, required: tuple[str, ...], note: str = ""):
    """Check that a pipeline directory has its `required` component folders (one line naming the
    missing ones otherwise) and return `load(kind, loader)`: `loader(path/kind, local_files_only=True)`
    with any failure turned into one line naming the folder."""
    missing = [d for d in required if not (path / d).is_dir()]
    if missing:
        raise DiffclsError(f"{pipeline.replace('Pipeline', '').replace('StableDiffusion', 'SD')} directory {path} lacks "
                           f"{', '.join(d + '/' for d in missing)}; a {pipeline} directory has {', '.join(d + '/' for d in required)}{note}")

    def load(kind: str, loader):
        try:
            return loader(str(path / kind), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any loader failure is a broken component dir
            raise DiffclsError(f"cannot load {path / kind}: {first_line(e)}; re-save that component with diffusers/transformers") from e

    return load


def config_json(module) -> str:
    """A module's config without bookkeeping keys (the rule `loading._config_json` applies)."""
    cfg = module.config
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    drop = ("transformers_version", "diffusers_version", "architectures", "dtype", "torch_dtype", "name_or_path")
    return json.dumps({k: v for k, v in d.items() if not k.startswith("_") and k not in drop}, sort_keys=True, default=str)


class PackedModel(LatentDiffusionModel):
    """Mixin for a model dataclass with `kind`, `tokenizer` (a MultiTokenizer), `alphas_cumprod`,
    `sigmas` (or None), `prediction_type`, the `_fingerprint` fields, and `module_names`: its
    torch modules' attribute names (None-valued ones are absent parts, e.g. SD3 without T5)."""

    module_names: tuple[str, ...] = ()
    denoiser_name: str = "unet"  # the attribute holding the noise predictor ("transformer" for SD3)

    @property
    def latent_channels(self) -> int:
        return int(getattr(self, self.denoiser_name).config.in_channels)

    @property
    def default_image_size(self) -> int:
        return int(getattr(self, self.denoiser_name).config.sample_size) * self.vae_scale_factor

    @property
    def max_length(self) -> int:  # token ids per prompt (every tokenizer's together)
        return self.tokenizer.model_max_length

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {n: getattr(self, n) for n in self.module_names if getattr(self, n) is not None}

    def fingerprint(self) -> str:
        """sha256 over every module's config and weights, the noise tables, the prediction type,
        the packing lengths and the vocabularies (16 hex); remembered per directory as for SD."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.kind.encode())
            for name, module in self.modules.items():
                hash_module(h, name, module, config_json(module))
            h.update(self.alphas_cumprod.detach().cpu().float().numpy().tobytes())
            if self.sigmas is not None:
                h.update(self.sigmas.detach().cpu().float().numpy().tobytes())
            h.update(f"prediction_type={self.prediction_type} lengths={sorted(self.tokenizer.lengths.items())}".encode())
            h.update(self.fingerprint_extra().encode())
            h.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
            self._fingerprint = h.hexdigest()[:16]
            if self._fingerprint_record is not None:
                root, state, versions = self._fingerprint_record
                filehash.remember_fingerprint(root, versions, state, self._fingerprint)
        return self._fingerprint

    def fingerprint_extra(self) -> str:
        """What else identifies the model beyond modules and tables (Flux: its dynamic shift)."""
        return ""

    def wrap(self, component: str) -> torch.nn.Module:
        """The exported graph of a component: the family's text-encoder and denoiser wrappers
        (`text_encoder_wrapper`, `denoiser_wrapper`), the VAE encoder with its scale and shift."""
        from diffcls.models.wrappers import VaeEncoderWrapper

        if component == "text_encoder":
            return self.text_encoder_wrapper()
        if component == "vae_encoder":
            return VaeEncoderWrapper(self.vae, self.scaling_factor, self.shift_factor)
        if component == "unet":
            return self.denoiser_wrapper()
        raise DiffclsError(f"unknown component {component!r}; choose text_encoder, vae_encoder or unet")

    def to(self, device, dtype: torch.dtype | None = None):
        for m in self.modules.values():
            m.to(device=device, dtype=dtype)
        return self

    def eval(self):
        for m in self.modules.values():
            m.eval().requires_grad_(False)
        return self

    @property
    def min_vocab_size(self) -> int:
        """Token ids every text encoder takes (random export inputs stay in range)."""
        return min(int(m.config.vocab_size) for n, m in self.modules.items() if n.startswith("text_encoder"))


def save_parts(model: PackedModel, out: Path, sched_cfg: dict, index: dict) -> Path:
    """A pipeline directory as `save_pretrained` writes it: every tokenizer and module of `model`
    in its diffusers subfolder (safetensors weights), the scheduler config and `index` as
    model_index.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name, tok in model.tokenizer.parts.items():
        tok.save_pretrained(str(out / name))
    for name, module in model.modules.items():
        module.save_pretrained(str(out / name), safe_serialization=True)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
