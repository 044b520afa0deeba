"""`diffcls info [DIR]`: installed backends and devices; what an engine directory holds."""

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

    if not engine_dir.is_dir():
        raise DiffclsError(f"{engine_dir} is not a directory; pass an engine directory written by diffcls export")
    manifest = mf.read_manifest(engine_dir)
    if manifest is None:
        raise DiffclsError(f"{engine_dir} has no manifest.json; create it with: diffcls export --out {engine_dir}")
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
    engine_dir: Annotated[Optional[Path], typer.Argument(help="An engine directory to describe.")] = None,
) -> None:
    """Show installed backends, ONNX Runtime providers, torch/CUDA, and an engine directory's contents."""
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
        if engine_dir is None:
            return
        manifest, rows = engine_dir_rows(engine_dir)
        out.print(
            f"\nengine directory {engine_dir}: backend {manifest.get('backend')}, model {manifest.get('source')} "
            f"(fingerprint {manifest.get('fingerprint')}), image size {manifest.get('image_size')}"
        )
        out.print(model_kind_line(manifest))
        if manifest.get("complete") is False:
            from diffcls.engines.manifest import fix_command

            out.print(f"status: INCOMPLETE - its export did not finish (interrupted or failed); finish it with: {fix_command(engine_dir, manifest)}")
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
                ",".join(map(str, r["batch_sizes"] or [])),
                human_size(r["bytes"]),
                f"{r['max_abs_err']:.2g}" if r["max_abs_err"] is not None else "-",
                f"{r['max_rel_err']:.2g}" if r["max_rel_err"] is not None else "-",
                r["status"],
            )
        out.print(table)
        out.print("files: " + ", ".join(str(r["file"]) for r in rows) + "; errors: largest difference from torch on random inputs")
