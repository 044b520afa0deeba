"""What a model directory (or checkpoint file) holds, read from its configs and weight headers.

`diffcls info MODEL` shows this: components, parameter counts, weight files and sizes, the
prediction type and the default image size. Nothing is loaded: parameter counts come from the
safetensors headers (a .bin/.ckpt file is memory-mapped, not read), so it is quick at any size.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffcls.errors import DiffclsError
from diffcls.models.loading import (CHECKPOINT_SUFFIXES, check_model_path, checkpoint_family, checkpoint_shapes, file_configs, is_dit_directory,
                                    weight_shapes)
from diffcls.models import flux
from diffcls.models.noising import dynamic_shift_mu, is_dynamic_shift
from diffcls.models.sd3 import is_sd3_directory
from diffcls.models.sdxl import is_sdxl_directory

COMPONENT_DIRS = ("text_encoder", "vae", "unet")
DIT_COMPONENT_DIRS = ("vae", "transformer")  # class-conditional: no text encoder
SD3_COMPONENT_DIRS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer")  # T5 optional
SDXL_COMPONENT_DIRS = ("text_encoder", "text_encoder_2", "vae", "unet")
FLUX_COMPONENT_DIRS = ("text_encoder", "text_encoder_2", "vae", "transformer")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffclsError(f"cannot read {path} ({type(e).__name__}); re-save the model with diffusers") from e
    return data if isinstance(data, dict) else {}


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of a model component's weight file (`loading.weight_shapes`)."""
    try:
        return weight_shapes(path)
    except Exception as e:  # noqa: BLE001 - unreadable weights
        raise DiffclsError(f"cannot read weights {path} ({type(e).__name__}); re-save the model with diffusers") from e


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def weight_files(component_dir: Path) -> list[Path]:
    """The weight files diffusers/transformers would load: safetensors (all shards) before .bin,
    plain files before variants such as `*.fp16.safetensors` (listed only when nothing else is)."""
    for suffix in (".safetensors", ".bin"):
        files = sorted(component_dir.glob(f"*{suffix}"))
        plain = [f for f in files if f.name.count(".") == 1]
        if plain or files:
            return plain or files
    return []


def describe_model(model: str | Path | None, config: str | Path | None = None) -> dict:
    """Plain data about a model directory, cached model id or checkpoint file (with `config`, the
    directory or cached id whose configs describe it: the model it loads as, `_with_configs`)."""
    root = check_model_path(model)
    if root.is_file():
        return _describe_checkpoint(root) if config is None else _with_configs(_describe_checkpoint(root), root, config)
    if config is not None:
        raise DiffclsError(f"--config is for single-file checkpoints; {root} is a diffusers directory, drop --config")
    dit, is_flux = is_dit_directory(root), flux.is_flux_directory(root)
    sd3, sdxl = not is_flux and is_sd3_directory(root), is_sdxl_directory(root)
    kind = "dit" if dit else "flux" if is_flux else "sd3" if sd3 else "sdxl" if sdxl else "stable-diffusion"
    if is_flux:
        flux.check_flux_configs(root)  # a variant it cannot score is refused here too
    names = {"dit": DIT_COMPONENT_DIRS, "sd3": SD3_COMPONENT_DIRS, "sdxl": SDXL_COMPONENT_DIRS, "flux": FLUX_COMPONENT_DIRS}.get(kind, COMPONENT_DIRS)
    components = {}
    for name in names:
        if kind == "sd3" and not (root / name).is_dir():
            continue  # no T5: zeros in its place (models.sd3)
        cfg = _read_json(root / name / "config.json")
        files = weight_files(root / name)
        params = sum(_numel(s) for f in files for s in tensor_shapes(f).values())
        components[name] = {
            "class": cfg.get("_class_name") or (cfg.get("architectures") or [None])[0],
            "parameters": params,
            "files": [f.relative_to(root).as_posix() for f in files],
            "bytes": sum(f.stat().st_size for f in files),
        }
    unet = _read_json(root / ("unet" if kind in ("stable-diffusion", "sdxl") else "transformer") / "config.json")
    vae = _read_json(root / "vae" / "config.json")
    text = {} if dit else _read_json(root / "text_encoder" / "config.json")
    sched = _read_json(root / "scheduler" / "scheduler_config.json")
    factor = 2 ** (len(vae.get("block_out_channels") or [0]) - 1)
    out = {
        "kind": "directory",
        "model_kind": kind,
        "path": str(root),
        "components": components,
        "scheduler": sched.get("_class_name"),
        # a flow-matching scheduler's target is the velocity (models.noising)
        "prediction_type": "flow" if sched.get("_class_name") == "FlowMatchEulerDiscreteScheduler" else sched.get("prediction_type", "epsilon"),
        "shift": sched.get("shift") if sched.get("_class_name") == "FlowMatchEulerDiscreteScheduler" else None,
        "num_train_timesteps": sched.get("num_train_timesteps", 1000),
        "default_image_size": int(unet.get("sample_size", 0)) * factor or None,
        "latent_channels": unet.get("in_channels"),
        "text_hidden_size": text.get("hidden_size"),
        "max_length": text.get("max_position_embeddings"),
    }
    if is_flux:
        out.update(_flux_facts(root, unet, sched, factor))
    if dit:
        labels = _read_json(root / "model_index.json").get("id2label") or {}
        out["num_classes"] = unet.get("num_embeds_ada_norm")
        out["labels"] = [labels[k] for k in sorted(labels, key=int)] if labels else None
    return out


def _flux_facts(root: Path, transformer: dict, sched: dict, factor: int) -> dict:
    """What a Flux directory is scored with beyond the common facts (`models.flux`): 2x2 packed
    latents, T5's length, the fixed guidance, and the sigmas' shift at the default image size."""
    tok = _read_json(root / "tokenizer_2" / "tokenizer_config.json")
    size = flux.DEFAULT_SAMPLE_SIZE * factor
    out = {
        "default_image_size": size,
        "latent_channels": int(transformer.get("in_channels", 64)) // 4,
        "max_length": int(min(tok.get("model_max_length", flux.T5_MAX_LENGTH), flux.T5_MAX_LENGTH)),
        "guidance": flux.GUIDANCE if transformer.get("guidance_embeds") else None,
    }
    if is_dynamic_shift(sched):
        out["shift"] = None  # the static shift is unused: μ depends on the image's token count
        defaults = {"base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
        out["dynamic_shift"] = {k: sched.get(k, v) for k, v in defaults.items()}
        out["dynamic_shift"]["mu_at_default_size"] = round(dynamic_shift_mu(sched, (size // factor // 2) ** 2), 6)
    return out


def model_notes(d: dict) -> list[str]:
    """What `describe_model` found beyond the header and the components, a line each: the
    sigmas' shift by image size, Flux's guidance embedding."""
    lines = []
    if d.get("dynamic_shift"):
        s = d["dynamic_shift"]
        lines.append(f"sigmas shifted by image size as the pipeline does: mu {s['base_shift']:g} at {s['base_image_seq_len']} to "
                     f"{s['max_shift']:g} at {s['max_image_seq_len']} image tokens (mu {s['mu_at_default_size']:g} at the default size)")
    if d.get("model_kind") == "flux":
        g = d.get("guidance")
        lines.append(f"guidance embedding: fed {g:g} (the pipeline's default)" if g is not None else "guidance embedding: none (not guidance-distilled)")
    return lines


def model_view(path: str | Path, config: str | Path | None = None):
    """`describe_model(path, config)` as rich renderables (`rich.print(model_view("demo"))`, `diffcls
    info PATH [--config DIR]`): the header, `model_notes`, a table of the components, their weight files."""
    from diffcls.render import human_size, lines, table

    d = describe_model(path, config)
    if d["kind"] == "checkpoint" and config is None:
        head = [f"\ncheckpoint {d['path']} ({human_size(d['bytes'])}): {d['model_type']}"]
    else:
        shift = f", shift {d['shift']:g})" if d.get("shift") is not None else ")"
        what = (f"model directory {d['path']}" if config is None else
                f"checkpoint {d['path']} ({human_size(d['bytes'])}, {d['model_type']}) with the configs of {config}")
        head = [f"\n{what} ({d.get('model_kind', 'stable-diffusion')}): prediction type {d['prediction_type']}, default image size "
                f"{d['default_image_size']}, {d['num_train_timesteps']} train timesteps ({d['scheduler']}" + shift, *model_notes(d)]
    rows = [(name, str(c["class"] or "-"), f"{c['parameters'] / 1e6:,.1f} M", human_size(c["bytes"]) if c["bytes"] is not None else "-")
            for name, c in d["components"].items()]
    with_config = f" --config {config}" if config is not None else ""
    tail = ["weights: " + ", ".join(dict.fromkeys(f for c in d["components"].values() for f in c["files"])),
            f"export engines with: diffcls export --model {path}{with_config} --out ENGINES"] if "num_train_timesteps" in d else []
    return lines(*head, table(("component", "class", "parameters", "size"), rows, left=("component", "class")), *tail)


def _with_configs(d: dict, path: Path, config: str | Path) -> dict:
    """A checkpoint's description `d` as the model it loads as with --config `config`: the
    directory's facts (prediction type, image size, scheduler...), and each component from the
    file where it carries it, else from the directory (whose weights the load then reads)."""
    root, _ = file_configs(path, config)
    configs = describe_model(root)
    components = {name: {**c, "files": [str(root / f) for f in c["files"]]} if name not in d["components"]
                  else {**d["components"][name], "class": c["class"]} for name, c in configs["components"].items()}
    return {**configs, "kind": "checkpoint", "path": str(path), "bytes": d["bytes"], "model_type": d["model_type"].split(" (")[0],
            "config": str(config), "components": components}


def _describe_checkpoint(path: Path) -> dict:
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise DiffclsError(f"{path} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}); pass a model directory")
    shapes = checkpoint_shapes(path)
    family = checkpoint_family(path, shapes)
    prefixes = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}
    if family == "sdxl":  # SDXL's SGM layout: two text encoders under conditioner.
        prefixes = {**prefixes, "text_encoder": "conditioner.embedders.0.", "text_encoder_2": "conditioner.embedders.1."}
    if family == "sd3":  # the MMDiT, and the text encoders the file carries (the others come from --config)
        from diffcls.models.sd3 import FILE_ENCODERS

        prefixes = {"transformer": "model.diffusion_model.", "vae": "first_stage_model.",
                    **{name: p for name, p in FILE_ENCODERS.items() if any(k.startswith(p) for k in shapes)}}
    # a Flux file: the transformer (names bare or prefixed), and the parts an all-in-one file carries
    keys = flux.file_parts(shapes) if family == "flux" else {name: [k for k in shapes if k.startswith(p)] for name, p in prefixes.items()}
    components = {
        name: {"class": None, "parameters": sum(_numel(shapes[k].shape) for k in names), "files": [path.name], "bytes": None}
        for name, names in keys.items()
    }
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    kind = {"sdxl": "xl", "sd3": "sd3"}.get(family) or infer_diffusers_model_type(shapes)
    flux_types = {k: f"{name} (pass --config: the Flux directory or cached id with its configs, and the parts the file lacks)"
                  for k, name in flux.FILE_KINDS.items()}
    return {
        "kind": "checkpoint",
        "path": str(path),
        "bytes": path.stat().st_size,
        "components": components,
        "model_type": {"v1": "Stable Diffusion 1.x", "v2": "Stable Diffusion 2.x (base or 768-v: pass --config)",
                       "xl": "SDXL (pass --config: the SDXL directory or cached id with its configs)",
                       "sd3": "SD3/3.5 (pass --config: the SD3 directory or cached id with its configs)", **flux_types}.get(kind, kind),
        "prediction_type": None,
        "default_image_size": None,
    }
