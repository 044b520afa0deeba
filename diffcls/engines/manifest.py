"""The engine directory's `manifest.json`: what was built, from which model, with what.

One manifest per engine directory (docs/design.md, "Engine directory and manifest"):

    {"format": 1, "backend": "onnxruntime", "fingerprint": "<model>", "image_size": 512,
     "source": "models/sd21", "versions": {"torch": ..., "onnx": ..., "onnxruntime": ...},
     "gpu": {"name": ..., "compute_capability": "9.0"} | null,
     "components": {"unet": {"file": "unet.onnx", "files": {"unet.onnx": "<sha256>"},
                             "precision": "fp16", "batch_sizes": [8, 16, 32], "opset": 17,
                             "settings": {...}, "max_abs_err": ..., "max_rel_err": ..., ...}}}

`verify_engine_dir` is what opening an engine directory runs first: every mismatch becomes a
one-line `DiffclsError` with the reason and the `diffcls export ...` command that fixes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path

from diffcls.engines.base import EngineSet, PassThroughEngine
from diffcls.errors import DiffclsError
from diffcls.models.filehash import file_sha256
from diffcls.models.loading import MODEL_TYPES, cached_fingerprint, load_model
from diffcls.models.noising import PREDICTION_TYPES
from diffcls.models.spec import ComponentSpec, component_specs, exported_components
from diffcls.models.tokenizer import load_tokenizer

MANIFEST = "manifest.json"
FORMAT = 1
TOKENIZER_DIR = "tokenizer"
ALPHAS_FILE = "alphas_cumprod.json"


def sha256_file(path: str | Path) -> str:
    """sha256 of an engine file; remembered by size + mtime, so a second open reads nothing."""
    return file_sha256(path)


def read_manifest(engine_dir: str | Path) -> dict | None:
    """The manifest as a dict, None if there is none; a corrupt one raises DiffclsError."""
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DiffclsError(f"{path} is corrupt ({type(e).__name__}); re-export: {fix_command(engine_dir, None)}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("components"), dict):
        raise DiffclsError(f"{path} is not a diffcls manifest (format {FORMAT}); re-export: {fix_command(engine_dir, None)}")
    return data


def write_manifest(engine_dir: str | Path, manifest: dict) -> Path:
    """Atomic write (temp file + rename), so a crash never leaves half a manifest; sealed with
    its own `digest`, so an edited manifest is refused on open."""
    path = Path(engine_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**manifest, "digest": manifest_digest(manifest)}, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


# --- everything that shapes the scores is hashed ------------------------------------------------
RUNTIME_FILES = (ALPHAS_FILE, TOKENIZER_DIR, "scheduler")  # besides the engines: ᾱ, tokenizer, scheduler config


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's fields (all but `digest`): it covers the engines' and runtime
    files' hashes, so it names the whole directory's scoring behaviour (results bind to it)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def runtime_file_hashes(engine_dir: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under RUNTIME_FILES."""
    root = Path(engine_dir)
    found = {}
    for rel in RUNTIME_FILES:
        p = root / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            found[f.relative_to(root).as_posix()] = sha256_file(f)
    return found


def tamper_problem(engine_dir: Path, manifest: dict, check_hash: bool = True) -> str | None:
    """Why the manifest or the runtime files differ from what the export wrote (None: they do
    not). A manifest from before the digest and runtime hashes were recorded has nothing to check."""
    if "digest" in manifest and manifest["digest"] != manifest_digest(manifest):
        return f"{engine_dir / MANIFEST} was edited after the export (its digest differs)"
    recorded = manifest.get("runtime_files")
    if not isinstance(recorded, dict) or not check_hash:
        return None
    here = runtime_file_hashes(engine_dir)
    for rel, digest in sorted(recorded.items()):
        if rel not in here:
            return f"{engine_dir / rel} is missing"
        if here[rel] != digest:
            return f"{engine_dir / rel} differs from the export (its sha256 differs from the manifest)"
    extra = sorted(set(here) - set(recorded))
    if extra:
        return f"{engine_dir / extra[0]} was not written by the export"
    return None


def fix_command(engine_dir: str | Path, manifest: dict | None, *, model: str | None = None, config: str | Path | None = None,
                **overrides) -> str:
    """The exact `diffcls export` command that (re)builds `engine_dir` as its manifest describes:
    `model` and its `config` (a single file's --config) where given, else the manifest's source
    and the --config it was exported with."""
    m = manifest or {}
    comps = m.get("components") or {}
    first = comps.get("unet") or (next(iter(comps.values()), {}) if comps else {})
    backend = overrides.get("backend") or m.get("backend") or "onnxruntime"
    precision = overrides.get("precision") or first.get("precision")
    asked = m.get("requested_batch_sizes") if isinstance(m.get("requested_batch_sizes"), dict) else {}

    def sizes_of(comp):  # what the component was built for, else what the (interrupted) export asked
        entry = comps.get(comp) if isinstance(comps.get(comp), dict) else {}
        sizes = entry.get("batch_sizes") or asked.get(comp) or []
        ok = isinstance(sizes, list) and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes)
        return list(sizes) if ok else []  # an edited value is not repeated: the defaults instead

    # never another component's: an export killed before the UNet has only the text encoder's
    batch_sizes = overrides.get("batch_sizes") or sizes_of("unet")
    # the text encoder's and VAE's own batch size (manifests before per-component sizes have none)
    own = {}
    for comp, flag in (("vae_encoder", "--vae-batch-size"), ("text_encoder", "--text-batch-size")):
        sizes = sizes_of(comp)
        if len(sizes) == 1 and sizes != sizes_of("unet"):
            own[flag] = str(sizes[0])
    image_size = overrides.get("image_size") or m.get("image_size")
    source = model if model is not None else m.get("source")
    config = config if config is not None or model is not None else m.get("config")
    parts = ["diffcls", "export"]
    if source and not str(source).startswith("<"):
        parts += ["--model", str(source)]
        if isinstance(config, (str, Path)) and str(config):
            parts += ["--config", str(config)]
    parts += ["--out", str(engine_dir), "--backend", backend]
    if precision:
        parts += ["--precision", precision]
    if batch_sizes:
        parts += ["--batch-sizes", ",".join(map(str, batch_sizes))]
    for flag, value in own.items():
        parts += [flag, value]
    if image_size:
        parts += ["--image-size", str(image_size)]
    return shlex.join(parts)


def component_files(engine_dir: Path, entry: dict) -> dict[str, str]:
    return dict(entry.get("files") or {})


def inside(engine_dir: str | Path, rel) -> bool:
    """Whether the manifest path `rel` names a file inside `engine_dir` (no absolute path, no
    `..`, no symlink leading out)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return False
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        return False
    root = Path(engine_dir).resolve()
    return (root / p).resolve().is_relative_to(root)


def file_problem(engine_dir: Path, name: str, entry: dict, *, check_hash: bool = True) -> str | None:
    """Why a component's files cannot be trusted, or None if they can.

    Every listed file must lie inside the directory and match its sha256, and the file that is
    loaded (`file`) must be one of them.
    """
    files = component_files(engine_dir, entry)
    if not files:
        return f"the manifest lists no file for {name}"
    outside = [rel for rel in [*files, entry.get("file")] if rel is not None and not inside(engine_dir, rel)]
    if outside:
        return f"the manifest names {name} file {outside[0]!r}, outside the engine directory"
    if "file" in entry and entry["file"] not in files:
        return f"the manifest's {name} file {entry['file']!r} is not among its checked files"
    for rel, digest in files.items():
        path = engine_dir / rel
        if not path.is_file():
            return f"{name} file {path} is missing"
        if check_hash and sha256_file(path) != digest:
            return f"{name} file {path} is corrupted (its sha256 differs from the manifest)"
    return None


def require_engine_dir(engine_dir: str | Path, *, backend: str | None = None, model_arg: str | None = None,
                       image_size: int | None = None, config_arg: str | Path | None = None) -> Path:
    """`engine_dir` as a Path if it is a directory, else a one-line error with the export command
    (of `model_arg`, with its --config `config_arg` where it is a single file that needs one)."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise DiffclsError(
            f"engine directory {engine_dir} does not exist; create it with: "
            f"{fix_command(engine_dir, None, model=model_arg, config=config_arg, backend=backend, image_size=image_size)}"
        )
    return engine_dir


def exported_backend(engine_dir: str | Path) -> str:
    """The backend an engine directory was exported for (onnxruntime when it has no manifest:
    opening it then says so); a corrupt manifest is a one-line DiffclsError."""
    backend = (read_manifest(engine_dir) or {}).get("backend")
    return backend if isinstance(backend, str) else "onnxruntime"


def require_finished_export(engine_dir: str | Path, *, backend: str | None = None, model_arg: str | None = None,
                            config_arg: str | Path | None = None) -> Path:
    """`require_engine_dir`, and a one-line error for a directory without a manifest or one whose
    export was interrupted (before its class prompts or defaults would be looked for)."""
    engine_dir = require_engine_dir(engine_dir, backend=backend, model_arg=model_arg, config_arg=config_arg)
    manifest = read_manifest(engine_dir)
    if manifest is None:
        raise DiffclsError(
            f"{engine_dir} has no {MANIFEST}, so it is not an exported engine directory; create it with: "
            f"{fix_command(engine_dir, None, model=model_arg, config=config_arg, backend=backend)}"
        )
    if manifest.get("complete") is False:
        raise DiffclsError(
            f"engine directory {engine_dir}: its export did not finish (it was interrupted); rerun the export to complete it: "
            f"{fix_command(engine_dir, manifest)}"
        )
    return engine_dir


def verify_engine_dir(
    engine_dir: str | Path,
    *,
    backend: str,
    fingerprint: str | None = None,
    model_arg: str | None = None,
    image_size: int | None = None,
    precision: str | None = None,
    check_hash: bool = True,
    runtime_check=None,
    config_arg: str | Path | None = None,
) -> dict:
    """The manifest of a usable engine directory for `backend`, or a one-line DiffclsError.

    `runtime_check(manifest) -> str | None` lets a backend add its own reason (e.g. a TensorRT
    engine built for another GPU). `config_arg`: `model_arg`'s --config, repeated in fix commands."""
    engine_dir = require_engine_dir(engine_dir, backend=backend, model_arg=model_arg, image_size=image_size, config_arg=config_arg)
    manifest = read_manifest(engine_dir)
    if manifest is None:
        raise DiffclsError(
            f"{engine_dir} has no {MANIFEST}, so it is not an exported engine directory; create it with: "
            f"{fix_command(engine_dir, None, model=model_arg, config=config_arg, backend=backend, image_size=image_size)}"
        )

    def fail(reason: str, **overrides) -> DiffclsError:
        cmd = fix_command(engine_dir, manifest, model=model_arg, config=config_arg, **overrides)
        return DiffclsError(f"engine directory {engine_dir}: {reason}; rebuild it with: {cmd}")

    if manifest.get("backend") != backend:
        raise fail(
            f"it was exported for the {manifest.get('backend')} backend, not {backend} "
            f"(pass --backend {manifest.get('backend')}, or re-export)",
            backend=backend,
        )
    if fingerprint is not None and manifest.get("fingerprint") != fingerprint:
        raise fail(
            f"it was built from another model (fingerprint {manifest.get('fingerprint')}, "
            f"the given model is {fingerprint})"
        )
    if image_size is not None and int(manifest.get("image_size", -1)) != int(image_size):
        raise fail(
            f"it was built for image size {manifest.get('image_size')}, not {image_size}",
            image_size=image_size,
        )
    if manifest.get("complete") is False:
        raise fail("its export did not finish (it was interrupted); rerun the export to complete it")
    comps = manifest["components"]
    missing = [k for k in ("fingerprint", "image_size", "max_length", "hidden_size", "latent_shape") if k not in manifest]
    if missing:
        raise fail(f"the manifest lacks {', '.join(missing)}")
    built = exported_components(manifest_specs(manifest))
    missing = [c for c in built if c not in comps]
    if missing:
        raise fail(f"the manifest lacks {', '.join(missing)}")
    for c in built:
        sizes = comps[c].get("batch_sizes") if isinstance(comps[c], dict) else None
        if not isinstance(comps[c], dict) or (sizes is not None and not (
            isinstance(sizes, list) and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes)
        )):
            raise fail(f"the manifest's {c} entry is malformed (batch_sizes {sizes!r} are not positive integers; was manifest.json edited?)")
    if precision not in (None, "auto"):
        have = {comps[c].get("precision") for c in built}
        if have != {precision}:
            raise fail(f"it holds {'/'.join(sorted(map(str, have)))} engines, not {precision}", precision=precision)
    for c in built:
        problem = file_problem(engine_dir, c, comps[c], check_hash=check_hash)
        if problem:
            raise fail(problem)
    for rel in (ALPHAS_FILE, TOKENIZER_DIR):
        if not (engine_dir / rel).exists():
            raise fail(f"{engine_dir / rel} is missing")
    problem = tamper_problem(engine_dir, manifest, check_hash)
    if problem:
        raise fail(problem)
    if runtime_check is not None:
        problem = runtime_check(manifest)
        if problem:
            raise fail(problem)
    return manifest


def manifest_specs(manifest: dict) -> dict[str, ComponentSpec]:
    """The component specs an engine directory was exported with (written into its manifest;
    a manifest from before that holds the Stable Diffusion sizes they are built from)."""
    if isinstance(manifest.get("specs"), dict):
        try:
            specs = {name: ComponentSpec.from_json(name, d) for name, d in manifest["specs"].items()}
            sample = specs["unet"].input("sample").shape[1:]
            image = specs["vae_encoder"].input("image").shape[2:]
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            raise DiffclsError(f"the manifest's component specs are unreadable ({type(e).__name__}); re-export the engine directory") from e
        latent, size = [int(x) for x in manifest["latent_shape"]], int(manifest["image_size"])
        if list(sample) != latent or list(image) != [size, size]:
            raise DiffclsError(
                f"the manifest's latent_shape {latent} / image_size {size} disagree with its component specs "
                f"(sample {list(sample)}, image {list(image)}; was manifest.json edited?); re-export the engine directory with diffcls export"
            )
        return specs
    return component_specs(
        max_length=int(manifest["max_length"]),
        hidden_size=int(manifest["hidden_size"]),
        image_size=int(manifest["image_size"]),
        latent_shape=tuple(int(x) for x in manifest["latent_shape"]),
    )


def load_runtime_files(engine_dir: str | Path):
    """(tokenizer, alphas_cumprod, sigmas or None) copied into the engine directory by export."""
    import torch

    engine_dir = Path(engine_dir)
    try:
        data = json.loads((engine_dir / ALPHAS_FILE).read_text())
        alphas = torch.tensor(data["alphas_cumprod"], dtype=torch.float32)
        sigmas = torch.tensor(data["sigmas"], dtype=torch.float32) if data.get("sigmas") is not None else None
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise DiffclsError(f"{engine_dir / ALPHAS_FILE} is unreadable ({type(e).__name__}); re-export the engine directory") from e
    try:
        tokenizer = load_tokenizer(engine_dir / TOKENIZER_DIR)
    except Exception as e:  # noqa: BLE001 - any loader failure is a broken copy
        raise DiffclsError(f"cannot load the tokenizer copy in {engine_dir / TOKENIZER_DIR}; re-export the engine directory") from e
    return tokenizer, alphas, sigmas


def check_batch_sizes(engine_dir: str | Path, manifest: dict, component: str, requested) -> tuple[int, ...]:
    """The batch sizes `component` was exported for; refuses requested sizes outside them.

    An empty tuple means the export fixed no batch size (a dynamic-batch ONNX graph).
    """
    have = tuple(int(b) for b in manifest["components"][component].get("batch_sizes") or ())
    extra = sorted(set(int(b) for b in requested or ()) - set(have))
    if extra and have:
        cmd = fix_command(engine_dir, manifest, batch_sizes=sorted(set(have) | set(extra)))
        raise DiffclsError(
            f"engine directory {engine_dir} was exported for batch sizes {', '.join(map(str, have))}, "
            f"not {', '.join(map(str, extra))}; use one of those or re-export: {cmd}"
        )
    return have


def engine_set(engine_dir: str | Path, manifest: dict, engines: dict, *, backend: str, device, info: dict):
    """An EngineSet over one engine per exported component (a pass-through for the others), with
    the directory's tokenizer and schedule."""
    tokenizer, alphas, sigmas = load_runtime_files(engine_dir)
    specs = manifest_specs(manifest)
    engines = {**{c: PassThroughEngine(s, device) for c, s in specs.items() if not s.exported}, **engines}
    precisions = {manifest["components"][c]["precision"] for c in exported_components(specs)}
    return EngineSet(
        text_encoder=engines["text_encoder"],
        vae_encoder=engines["vae_encoder"],
        unet=engines["unet"],
        tokenizer=tokenizer,
        alphas_cumprod=alphas,
        image_size=int(manifest["image_size"]),
        latent_shape=tuple(int(x) for x in manifest["latent_shape"]),
        max_length=int(manifest["max_length"]),
        fingerprint=manifest["fingerprint"],
        backend=backend,
        precision=precisions.pop() if len(precisions) == 1 else "mixed",
        device=device,
        info={"engine_dir": str(engine_dir), "manifest_digest": manifest_digest(manifest), **info},
        prediction_type=manifest_prediction_type(engine_dir, manifest),
        sigmas=sigmas,
    )


def manifest_prediction_type(engine_dir, manifest: dict) -> str:
    """The UNet's prediction type the export recorded; a manifest from before it was recorded means epsilon."""
    value = manifest.get("prediction_type", "epsilon")
    if value not in PREDICTION_TYPES:
        raise DiffclsError(
            f"engine directory {engine_dir}: its manifest says prediction_type {value!r}, which diffcls cannot "
            f"score ({' or '.join(PREDICTION_TYPES)}); rebuild it with: {fix_command(engine_dir, manifest)}"
        )
    return value


def resolve_model_arg(model, config=None):
    """(fingerprint or None, the --model string for fix commands) for an optional model argument
    (`config`: a single checkpoint file's --config, `load_model`)."""
    if model is None:
        return None, None
    if not isinstance(model, MODEL_TYPES):
        # remembered from an earlier load of the same files: no need to load gigabytes to check it
        remembered = cached_fingerprint(model)
        if remembered is not None:
            return remembered, str(model)
        model = load_model(model, config=config)
    src = str(model.source)
    return model.fingerprint(), (None if src.startswith("<") else src)
