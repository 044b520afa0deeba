"""`diffcls info [PATH]`: installed backends and devices; what a model or an engine directory holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, out, user_errors
from diffcls.errors import DiffclsError


def environment() -> dict:
    """Versions, backends and providers, as plain data (the command renders it)."""
    import torch

    from diffcls.engines import BACKENDS, available_backends

    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": {b: b in available_backends() for b in BACKENDS},
        "onnxruntime": None,
        "ort_providers": [],
        "tensorrt": None,
    }
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    from diffcls.export.trt_build import tensorrt_version

    env["tensorrt"] = tensorrt_version()
    return env


def engine_dir_rows(engine_dir: Path) -> tuple[dict, list[dict]]:
    """(manifest, one row per component with files present/sizes) for an engine directory."""
    from diffcls.engines import manifest as mf

    if not engine_dir.exists():
        raise DiffclsError(
            f"{engine_dir} does not exist; pass a model (a diffusers directory, a checkpoint file, a cached org/name, "
            "demo or demo-dit) or an engine directory written by diffcls export"
        )
    if not engine_dir.is_dir():
        raise DiffclsError(f"{engine_dir} is neither a model nor an engine directory; pass a diffusers model directory, a checkpoint file or an engine directory")
    manifest = mf.read_manifest(engine_dir)
    if manifest is None:
        raise DiffclsError(
            f"{engine_dir} is neither an engine directory (no manifest.json) nor a diffusers model directory; "
            f"pass one, or create an engine directory with: diffcls export --model MODEL --out {engine_dir}"
        )
    rows = []
    from diffcls.models.spec import COMPONENTS

    order = [c for c in COMPONENTS if c in manifest["components"]] + sorted(set(manifest["components"]) - set(COMPONENTS))
    for name in order:
        entry = manifest["components"][name]
        files = [engine_dir / f for f in entry.get("files", {})]
        present = all(f.is_file() for f in files)
        size = sum(f.stat().st_size for f in files if f.is_file())
        problem = mf.file_problem(engine_dir, name, entry, check_hash=True)
        rows.append(
            {
                "component": name,
                "file": entry.get("file"),
                "files": [f.relative_to(engine_dir).as_posix() for f in files],
                "precision": entry.get("precision"),
                "batch_sizes": entry.get("batch_sizes"),
                "image_size": entry.get("image_size", manifest.get("image_size")),
                "bytes": size,
                "present": present,
                "status": "ok" if problem is None else ("missing" if not present else "corrupted"),
                "max_abs_err": entry.get("max_abs_err"),
                "max_rel_err": entry.get("max_rel_err"),
                "fused": entry.get("fused_ops"),
            }
        )
    return manifest, rows


def is_model(path: Path) -> bool:
    """Whether `info PATH` describes a model (directory, checkpoint, cached id), not engines."""
    from diffcls.engines.manifest import MANIFEST
    from diffcls.models.loading import BUNDLED, CHECKPOINT_SUFFIXES, REPO_ID, REQUIRED_DIRS, is_dit_directory, is_sd3_directory, is_sdxl_directory

    if str(path) in BUNDLED and not path.exists():  # `info demo`, `info demo-dit`
        return True
    if path.is_dir():
        if (path / MANIFEST).exists():
            return False
        return is_dit_directory(path) or is_sd3_directory(path) or is_sdxl_directory(path) or all((path / d).is_dir() for d in REQUIRED_DIRS)
    if path.is_file():
        return path.suffix in CHECKPOINT_SUFFIXES
    return bool(REPO_ID.fullmatch(str(path)))


def print_model(path: Path) -> None:
    from rich.table import Table

    from diffcls.export.pipeline import human_size
    from diffcls.models.describe import describe_model

    d = describe_model(path)
    if d["kind"] == "checkpoint":
        out.print(f"\ncheckpoint {d['path']} ({human_size(d['bytes'])}): {d['model_type']}")
    else:
        out.print(
            f"\nmodel directory {d['path']} ({d.get('model_kind', 'stable-diffusion')}): prediction type {d['prediction_type']}, default image size "
            f"{d['default_image_size']}, {d['num_train_timesteps']} train timesteps ({d['scheduler']}"
            + (f", shift {d['shift']:g})" if d.get("shift") is not None else ")")
        )
    table = Table()
    for col in ("component", "class", "parameters", "size"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("component", "class") else "right")
    for name, c in d["components"].items():
        table.add_row(name, str(c["class"] or "-"), f"{c['parameters'] / 1e6:,.1f} M", human_size(c["bytes"]) if c["bytes"] is not None else "-")
    out.print(table)
    if d["kind"] == "directory":
        out.print("weights: " + ", ".join(f for c in d["components"].values() for f in c["files"]))
        out.print(f"export engines with: diffcls export --model {path} --out ENGINES")


def model_kind_line(manifest: dict) -> str:
    """What kind of model an engine directory was exported from, and what conditions its denoiser."""
    from diffcls.engines.manifest import manifest_specs

    unet = manifest_specs(manifest)["unet"]
    cond = unet.input(unet.condition) if unet.condition else unet.inputs[-1]
    kind = manifest.get("kind", "stable-diffusion")
    what = "class-conditional: a prompt is a class id" if cond.dtype == "int64" else "text-conditional"
    return f"model kind {kind} ({what}; denoiser conditioning input {cond.name} {cond.dtype} {list(cond.shape)})"


@app.command("info")
def info_cmd(
    path: Annotated[Optional[Path], typer.Argument(help="A model to describe (diffusers directory, checkpoint file, cached org/name, demo, demo-dit) or an engine directory from diffcls export.", metavar="PATH", show_default=False)] = None,
) -> None:
    """Show installed backends, ONNX Runtime providers, torch/CUDA, and what an engine or model directory holds."""
    from rich.table import Table

    from diffcls.export.pipeline import human_size

    with user_errors():
        env = environment()
        out.print(f"torch {env['torch']} (CUDA {env['cuda'] or 'none'}; GPU: {env['gpu'] or 'none'})")
        out.print(
            "backends: "
            + ", ".join(f"{b} ({'installed' if ok else 'not installed'})" for b, ok in env["backends"].items())
        )
        if env["onnxruntime"]:
            out.print(f"onnxruntime {env['onnxruntime']}, providers: {', '.join(env['ort_providers'])}")
        out.print(f"tensorrt: {env['tensorrt'] or 'not installed'}")
        if path is None:
            return
        if is_model(path):
            print_model(path)
            return
        manifest, rows = engine_dir_rows(path)
        out.print(
            f"\nengine directory {path}: backend {manifest.get('backend')}, model {manifest.get('source')} "
            f"(fingerprint {manifest.get('fingerprint')}), image size {manifest.get('image_size')}"
        )
        out.print(model_kind_line(manifest))
        if manifest.get("complete") is False:
            from diffcls.engines.manifest import fix_command

            out.print(f"status: INCOMPLETE - its export did not finish (interrupted or failed); finish it with: {fix_command(path, manifest)}")
        from diffcls.engines.manifest import fix_command, tamper_problem

        changed = tamper_problem(path, manifest)
        if changed:  # classify refuses it: say so here too
            out.print(f"status: CHANGED - {changed}; rebuild it with: {fix_command(path, manifest)}")
        versions = manifest.get("versions") or {}
        out.print("built with " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
        if manifest.get("gpu"):
            gpu = manifest["gpu"]
            out.print(f"built on {gpu.get('name')} (compute capability {gpu.get('compute_capability')})")
        # short headers and no wrapping: the table fits 80 columns (file names are listed below it)
        table = Table()
        for col in ("component", "prec", "batches", "size", "abs err", "rel err", "status"):
            table.add_column(col, no_wrap=True, justify="left" if col in ("component", "status") else "right")
        for r in rows:
            table.add_row(
                r["component"],
                str(r["precision"]),
                ",".join(map(str, r["batch_sizes"] or [])) or "any",  # none recorded: dynamic ONNX graphs
                human_size(r["bytes"]),
                f"{r['max_abs_err']:.2g}" if r["max_abs_err"] is not None else "-",
                f"{r['max_rel_err']:.2g}" if r["max_rel_err"] is not None else "-",
                r["status"],
            )
        out.print(table)
        out.print("files: " + ", ".join(_files_text(r) for r in rows) + "; errors: largest difference from torch on random inputs")


def _files_text(row: dict) -> str:
    """'unet.onnx + unet.onnx.data (external data)': every file a component's size counts."""
    first = str(row["file"])
    extra = [f for f in row.get("files") or [] if f != first]
    if not extra:
        return first
    return first + " + " + " + ".join(f + (" (external data)" if f.endswith(".data") else "") for f in extra)
