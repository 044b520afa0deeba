"""What is installed, and what an engine directory holds, as plain data (`diffcls info` renders it)."""

from __future__ import annotations

from pathlib import Path

from diffcls.engines import manifest as mf
from diffcls.errors import DiffclsError


def environment() -> dict:
    """Versions, backends and ONNX Runtime providers."""
    import torch

    from diffcls.engines import BACKENDS, available_backends

    cuda = torch.cuda.is_available()
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda, "gpu": torch.cuda.get_device_name() if cuda else None,
           "backends": {b: b in available_backends() for b in BACKENDS}, "onnxruntime": None, "ort_providers": [], "tensorrt": None}
    try:
        import onnxruntime as ort

        env["onnxruntime"], env["ort_providers"] = ort.__version__, ort.get_available_providers()
    except ImportError:
        pass
    try:
        import tensorrt

        env["tensorrt"] = str(tensorrt.__version__)
    except ImportError:
        pass
    return env


def environment_lines(env: dict) -> list[str]:
    """`environment()` in a few lines: torch and CUDA, the backends, ONNX Runtime, TensorRT."""
    lines = [f"torch {env['torch']} (CUDA {env['cuda'] or 'none'}; GPU: {env['gpu'] or 'none'})",
             "backends: " + ", ".join(f"{b} ({'installed' if ok else 'not installed'})" for b, ok in env["backends"].items())]
    if env["onnxruntime"]:
        lines.append(f"onnxruntime {env['onnxruntime']}, providers: {', '.join(env['ort_providers'])}")
    return lines + [f"tensorrt: {env['tensorrt'] or 'not installed'}"]


def engine_dir_line(engine_dir: Path, manifest: dict) -> str:
    """An engine directory's backend, model, fingerprint and image size."""
    return (f"engine directory {engine_dir}: backend {manifest.get('backend')}, model {manifest.get('source')} "
            f"(fingerprint {manifest.get('fingerprint')}), image size {manifest.get('image_size')}")


def is_model(path: Path) -> bool:
    """Whether `path` names a model (directory, checkpoint, cached id, bundled name), not engines."""
    from diffcls.models.loading import BUNDLED, CHECKPOINT_SUFFIXES, REPO_ID, REQUIRED_DIRS, is_dit_directory, is_flux_directory, is_sd3_directory, is_sdxl_directory

    if str(path) in BUNDLED and not path.exists():  # `info demo`, `info demo-dit`
        return True
    if path.is_dir():
        if (path / mf.MANIFEST).exists():
            return False
        return is_dit_directory(path) or is_flux_directory(path) or is_sd3_directory(path) or is_sdxl_directory(path) or all((path / d).is_dir() for d in REQUIRED_DIRS)
    if path.is_file():
        return path.suffix in CHECKPOINT_SUFFIXES
    return bool(REPO_ID.fullmatch(str(path)))


def _component_row(engine_dir: Path, name: str, entry: dict, manifest: dict) -> dict:
    files = [engine_dir / f for f in entry.get("files", {})]
    present = all(f.is_file() for f in files)
    problem = mf.file_problem(engine_dir, name, entry, check_hash=True)
    return {
        "component": name, "file": entry.get("file"), "files": [f.relative_to(engine_dir).as_posix() for f in files],
        "precision": entry.get("precision"), "batch_sizes": entry.get("batch_sizes"),
        "image_size": entry.get("image_size", manifest.get("image_size")),
        "bytes": sum(f.stat().st_size for f in files if f.is_file()), "present": present,
        "status": "ok" if problem is None else ("missing" if not present else "corrupted"),
        "max_abs_err": entry.get("max_abs_err"), "max_rel_err": entry.get("max_rel_err"), "fused": entry.get("fused_ops"),
    }


def engine_dir_rows(engine_dir: Path) -> tuple[dict, list[dict]]:
    """(manifest, one row per component: files, sizes, whether they are present and intact)."""
    from diffcls.models.spec import COMPONENTS

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
    comps = manifest["components"]
    order = [c for c in COMPONENTS if c in comps] + sorted(set(comps) - set(COMPONENTS))
    return manifest, [_component_row(engine_dir, name, comps[name], manifest) for name in order]


def model_kind_line(manifest: dict) -> str:
    """What kind of model an engine directory was exported from, and what conditions its denoiser."""
    unet = mf.manifest_specs(manifest)["unet"]
    cond = unet.input(unet.condition) if unet.condition else unet.inputs[-1]
    kind = manifest.get("kind", "stable-diffusion")
    what = "class-conditional: a prompt is a class id" if cond.dtype == "int64" else "text-conditional"
    return f"model kind {kind} ({what}; denoiser conditioning input {cond.name} {cond.dtype} {list(cond.shape)})"


def status_lines(engine_dir: Path, manifest: dict) -> list[str]:
    """An unfinished or changed directory (which classify refuses), and what it was built with and on."""
    lines = []
    if manifest.get("complete") is False:
        lines.append(f"status: INCOMPLETE - its export did not finish (interrupted or failed); finish it with: {mf.fix_command(engine_dir, manifest)}")
    changed = mf.tamper_problem(engine_dir, manifest)
    if changed:
        lines.append(f"status: CHANGED - {changed}; rebuild it with: {mf.fix_command(engine_dir, manifest)}")
    lines.append("built with " + ", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items() if v))
    if manifest.get("gpu"):
        gpu = manifest["gpu"]
        lines.append(f"built on {gpu.get('name')} (compute capability {gpu.get('compute_capability')})")
    return lines


def files_text(row: dict) -> str:
    """'unet.onnx + unet.onnx.data (external data)': every file a component's size counts."""
    first = str(row["file"])
    extra = [f for f in row.get("files") or [] if f != first]
    return first + "".join(" + " + f + (" (external data)" if f.endswith(".data") else "") for f in extra)


def engine_dir_view(engine_dir: Path):
    """An engine directory as rich renderables (`rich.print(engine_dir_view(path))`, `diffcls info
    DIR`): what it holds, its model, its status, a table of its components, their files."""
    from diffcls.render import human_size, lines, table

    manifest, rows = engine_dir_rows(engine_dir)

    def err(x):
        return f"{x:.2g}" if x is not None else "-"

    # short headers and no wrapping: the table fits 80 columns (file names are listed below it);
    # no batch sizes recorded: dynamic ONNX graphs take any
    cells = [(r["component"], str(r["precision"]), ",".join(map(str, r["batch_sizes"] or [])) or "any", human_size(r["bytes"]),
              err(r["max_abs_err"]), err(r["max_rel_err"]), r["status"]) for r in rows]
    return lines("\n" + engine_dir_line(engine_dir, manifest), model_kind_line(manifest), *status_lines(engine_dir, manifest),
                 table(("component", "prec", "batches", "size", "abs err", "rel err", "status"), cells, left=("component", "status")),
                 "files: " + ", ".join(files_text(r) for r in rows) + "; errors: largest difference from torch on random inputs")
