"""`export_model`: one model -> an engine directory, rebuilding only what is stale.

Steps per component (text_encoder, vae_encoder, unet), each timed and reported as one line:

    onnxruntime: torch -> fp32 ONNX [-> ORT UNet fusion] [-> fp16] -> check vs torch -> <c>.onnx
    tensorrt:    torch -> fp32 ONNX (onnx/<c>.onnx) -> check vs torch -> TensorRT build -> <c>.plan

A component is rebuilt when its file is missing or its sha256 differs from the manifest, or when
anything that shaped it changed (model fingerprint, precision, image size, opset, fusion, and for
TensorRT the batch sizes, TensorRT version and GPU). Otherwise it is reported as "found cached".
The tokenizer and ᾱ (`alphas_cumprod`) are copied in, so the directory classifies on its own.
An fp16 export keeps the VAE encoder in fp32 where the VAE config sets `force_upcast` (SD's VAE
overflows in fp16); each component's manifest entry records the precision its graph computes in
(`run_precision`), and the manifest records the UNet's `prediction_type`.

The export owns the directory: a directory holding another model's engines is refused unless
`force`; what an earlier export wrote and this one did not (another model's `diffcls.json` and
prompts, the other backend's engines) is removed at the end; temporary files live under
`.partial/`, which the next export clears; the manifest says `"complete": false` until the last
step, so `info` and `classify` can tell an interrupted export from a finished one.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from diffcls.config import ExportBackend
from diffcls.engines import manifest as mf
from diffcls.engines.trt_backend import TensorRTEngine
from diffcls.errors import DiffclsError, install_hint
from diffcls.render import human_size  # noqa: F401 - export.pipeline.human_size, as before
from diffcls.export import onnx_export as ox
from diffcls.export import trt_build
from diffcls.models.loading import MODEL_TYPES, SDModel, load_model, model_defaults, single_file_config
from diffcls.models.spec import COMPONENTS, exported_components, model_component_specs

EXPORT_BACKENDS = tuple(b.value for b in ExportBackend)
DEFAULT_BATCH_SIZES = (8, 16, 32)
DEFAULT_VAE_BATCH_SIZE = 8  # the runtime's VAE batches (Classifier.iter_classify's vae_batch_size)
DEFAULT_TEXT_BATCH_SIZE = 16  # when the model names no prompts file to count


@dataclass
class ExportConfig:
    out: Path  # the engine directory
    model: str | Path | SDModel | None = None  # a loaded model (SDModel/DiTModel), a path or bundled name; None: the SD demo
    config: str | Path | None = None  # a checkpoint file model's configs: a diffusers directory or cached model id (load_model)
    no_t5: bool = False  # SD3/3.5 without its T5-XXL text encoder (load_model)
    backend: str = "onnxruntime"  # "onnxruntime" or "tensorrt"
    precision: str | None = None  # fp32/fp16; None: fp16 for TensorRT and ORT on CUDA, else fp32
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES  # the UNet batches the runtime will send
    vae_batch_size: int = DEFAULT_VAE_BATCH_SIZE  # the VAE encoder's one batch size
    text_batch_size: int | None = None  # the text encoder's; None: the model's prompt count rounded up to 8, else 16
    image_size: int | None = None  # None: the model's training resolution
    optimize: bool | None = None  # ORT UNet fusion; None: on for onnxruntime fp16 on CUDA
    device: str | None = None  # where the exported graphs are checked: cpu/cuda; None: cuda if usable
    opset: int = ox.OPSET
    workspace_gb: float = trt_build.DEFAULT_WORKSPACE_GB  # TensorRT builder workspace limit
    force: bool = False  # rebuild everything
    any_batch: bool = False  # onnxruntime: record no batch sizes, so the runtime sends any (the graphs are dynamic in the batch)


@dataclass
class StepEvent:
    """What `export_model` reports: a step starts, finishes, or is found cached."""

    status: str  # "start" | "done" | "cached" | "info"
    step: str  # e.g. "unet onnx", "unet tensorrt"
    message: str = ""
    seconds: float = 0.0
    path: Path | None = None
    nbytes: int = 0


class SpinnerReporter:
    """`export_model`'s `report` on a rich console (`diffcls export` shows it): a spinner while a
    step runs, one line when it ends.

        with SpinnerReporter() as report:
            result = export_model(ExportConfig(out="engines"), report)
    """

    def __init__(self, console=None):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console, transient=True)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "SpinnerReporter":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: StepEvent) -> None:
        if event.status == "start":
            self.tasks[event.step] = self.progress.add_task(event.step, total=None)
            return
        task = self.tasks.pop(event.step, None)
        if task is not None:
            self.progress.remove_task(task)
        style = {"done": "green", "cached": "cyan"}.get(event.status, "")
        text = event.message or event.status
        self.progress.console.print(f"[bold]{event.step}[/bold]: [{style}]{text}[/{style}]" if style else f"{event.step}: {text}")


@dataclass
class ExportResult:
    engine_dir: Path
    manifest: dict
    built: list[str] = field(default_factory=list)  # steps that ran
    cached: list[str] = field(default_factory=list)  # steps found cached

    def summary(self) -> str:
        """'engines in 'DIR' (12.3 MB): onnxruntime fp32, UNet batch sizes 8,16, VAE 8, ...'."""
        m, comps = self.manifest, self.manifest["components"]
        total = sum((self.engine_dir / f).stat().st_size for c in comps.values() for f in c["files"])
        # a class-conditional model (DiT) exports no text encoder: its prompts are class ids
        text = f"text encoder {comps['text_encoder']['batch_sizes'][0]}, " if "text_encoder" in comps else ""
        return (f"engines in '{self.engine_dir}' ({human_size(total)}): {m['backend']} {comps['unet']['precision']}, "
                f"UNet batch sizes {','.join(map(str, comps['unet']['batch_sizes']))}, VAE {comps['vae_encoder']['batch_sizes'][0]}, "
                f"{text}image size {m['image_size']}; built {len(self.built)}, cached {len(self.cached)}")


def files_size(paths) -> int:
    return sum(Path(p).stat().st_size for p in paths if Path(p).exists())


def resolve_export_device(device: str | None, backend: str) -> str:
    import torch

    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return "cpu"
        if backend == "tensorrt":
            return "cuda"
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    if device not in ("cpu", "cuda"):
        raise DiffclsError(f"--device must be cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise DiffclsError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


def resolve_settings(cfg: ExportConfig) -> tuple[str, str, bool]:
    """(device, precision, optimize) with the per-backend defaults filled in."""
    if cfg.backend not in EXPORT_BACKENDS:
        import difflib

        close = difflib.get_close_matches(str(cfg.backend), EXPORT_BACKENDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DiffclsError(f"cannot export for backend {cfg.backend!r} (choose {', '.join(EXPORT_BACKENDS)}){hint}")
    if cfg.backend == "tensorrt":
        if trt_build.tensorrt_version() is None:
            raise DiffclsError(f"--backend tensorrt needs TensorRT; install it with: {install_hint('tensorrt', 'tensorrt')}")
        device = resolve_export_device(cfg.device or "cuda", cfg.backend)
    else:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise DiffclsError(f"--backend onnxruntime needs onnxruntime; install it with: {install_hint('onnx', 'onnx onnxruntime')}") from e
        device = resolve_export_device(cfg.device, cfg.backend)
    precision = cfg.precision
    if precision in (None, "auto"):
        precision = "fp16" if (cfg.backend == "tensorrt" or device == "cuda") else "fp32"
    if precision not in ("fp32", "fp16"):
        raise DiffclsError(f"--precision must be fp32 or fp16 for export, not {precision!r}")
    optimize = cfg.optimize
    if optimize is None:
        optimize = cfg.backend == "onnxruntime" and precision == "fp16" and device == "cuda"
    if cfg.any_batch and cfg.backend != "onnxruntime":
        raise DiffclsError("TensorRT engines are built for fixed batch sizes; any_batch is for onnxruntime exports")
    if optimize and cfg.backend != "onnxruntime":
        raise DiffclsError("--optimize is ONNX Runtime's fusion pass; TensorRT fuses on its own, drop --optimize")
    return device, precision, bool(optimize)


def library_versions(backend: str) -> dict:
    import onnx
    import torch

    v = {"torch": torch.__version__, "onnx": onnx.__version__, "cuda": torch.version.cuda}
    try:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if backend == "tensorrt":
        v["tensorrt"] = trt_build.tensorrt_version()
    return v


def export_model(cfg: ExportConfig, report: Callable[[StepEvent], None] | None = None) -> ExportResult:
    """Export `cfg.model` into `cfg.out`; see the module docstring."""
    report = report or (lambda e: None)
    if cfg.config is not None and cfg.model is None:
        raise DiffclsError("--config describes a checkpoint file; pass it with --model FILE")
    device, precision, optimize = resolve_settings(cfg)
    batch_sizes = tuple(trt_build.normalize_batch_sizes(cfg.batch_sizes))
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise DiffclsError(f"--out {out} is a file; pass a directory")
    check_out_dir(out, None if isinstance(cfg.model, MODEL_TYPES) else cfg.model)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    report(StepEvent("start", "load model"))
    model = cfg.model if isinstance(cfg.model, MODEL_TYPES) else load_model(cfg.model, config=cfg.config, no_t5=cfg.no_t5)
    check_out_dir(out, model.source)  # a model id or bundled name resolved to its folder
    fingerprint = model.fingerprint()
    report(StepEvent("done", "load model", f"{model.source} (fingerprint {fingerprint})", time.perf_counter() - t0))
    image_size = int(cfg.image_size or model.default_image_size)
    specs = model_component_specs(model, image_size)  # validates image_size
    # each component is built for the batches the runtime sends it (TensorRT: one profile each)
    component_batches = {
        "text_encoder": [_one_batch_size(cfg.text_batch_size or default_text_batch_size(model), "--text-batch-size")],
        "vae_encoder": [_one_batch_size(cfg.vae_batch_size, "--vae-batch-size")],
        "unet": list(batch_sizes),
    }

    try:
        old = mf.read_manifest(out)
    except DiffclsError:
        old = None  # corrupt: rebuild everything
    # another model (not the same source rebuilt or retrained in place): its engines are not ours
    if old is not None and old.get("fingerprint") != fingerprint and old.get("source") != str(model.source) and not cfg.force:
        raise DiffclsError(
            f"--out {out} holds engines of another model ({old.get('source')}, fingerprint {old.get('fingerprint')}); "
            f"pass --force to replace them, or another --out"
        )
    stale_candidates = _owned_paths(out, old)  # what an earlier export wrote: removed unless rewritten
    _remove_partial(out)  # temp files of an export that was killed
    old_comps = (old or {}).get("components", {}) if not cfg.force else {}
    versions = library_versions(cfg.backend)
    gpu = trt_build.gpu_info() if cfg.backend == "tensorrt" else None

    manifest = _new_manifest(cfg, model, fingerprint, image_size, specs, versions, gpu, component_batches)
    # mark the directory as being rewritten before touching anything in it (keeping what the
    # old manifest vouches for, so that a killed export still reuses its finished parts)
    mf.write_manifest(out, {**(old or manifest), "complete": False, "components": dict(old_comps), "requested_batch_sizes": component_batches})
    result = ExportResult(out, manifest)
    # a model this export loaded is its own: each component's torch weights are freed once its
    # graph is written (before the fp16 conversion), which keeps an SD-2.1-size export's peak low
    owns_model = not isinstance(cfg.model, MODEL_TYPES)
    for comp in exported_components(specs):
        settings = {
            "backend": cfg.backend,
            "fingerprint": fingerprint,
            "precision": precision,
            "image_size": image_size,
            "opset": cfg.opset,
            "optimize": bool(optimize and comp == "unet"),
        }
        if precision != "fp32" and comp == "vae_encoder" and model.vae_force_upcast:
            settings["upcast_fp32"] = True  # the VAE config asks for fp32 (SD's VAE overflows in fp16)
        if cfg.backend == "tensorrt":
            settings.update(batch_sizes=component_batches[comp], tensorrt=versions.get("tensorrt"), gpu=gpu)
        if cfg.backend == "onnxruntime":
            release = (lambda c=comp: free_component(model, c)) if owns_model else None
            entry = _export_ort(model, comp, specs[comp], out, settings, old_comps.get(comp), device, cfg, report, result, release)
        else:
            entry = _export_trt(model, comp, specs[comp], out, settings, old_comps.get(comp), device, cfg, report, result)
        # ONNX graphs take any batch; the runtime sends these (none recorded: any)
        entry["batch_sizes"] = [] if cfg.any_batch else component_batches[comp]
        entry["image_size"] = image_size
        manifest["components"][comp] = entry
        # write as we go: an interrupted export keeps what it finished
        mf.write_manifest(out, manifest)

    _finish(cfg, model, out, manifest, stale_candidates)
    return result


def _new_manifest(cfg: ExportConfig, model, fingerprint: str, image_size: int, specs, versions, gpu, component_batches) -> dict:
    """The manifest of this export before any component is written (`complete` False)."""
    return {
        "format": mf.FORMAT,
        "backend": cfg.backend,
        "fingerprint": fingerprint,
        "image_size": image_size,
        "max_length": model.max_length,  # with the two below: the component specs, no model needed
        "hidden_size": model.hidden_size,
        "latent_shape": list(model.latent_shape(image_size)),
        "kind": model.kind,  # "stable-diffusion" or "dit"
        "specs": {name: s.to_json() for name, s in specs.items()},  # what engines are opened with
        "prediction_type": model.prediction_type,  # the UNet's target, from the scheduler config
        "source": str(model.source),
        "config": None if cfg.config is None else str(cfg.config),  # a single file's --config: fix commands repeat it
        "versions": versions,
        "gpu": gpu,
        "exporter": "torch.onnx.export(dynamo=False)",
        "complete": False,  # until the last step: `info` and `classify` call it an interrupted export
        "requested_batch_sizes": component_batches,  # what an interrupted export's fix command repeats
        "components": {},
    }


def _finish(cfg: ExportConfig, model, out: Path, manifest: dict, stale_candidates) -> None:
    """Write the runtime files, remove what an earlier export left and this one did not
    rewrite, and mark the manifest complete (the last step)."""
    written = _write_runtime_files(model, out, int(manifest["image_size"]), cfg.config)
    manifest["written"] = sorted(written)  # what the next export may remove: only what this one wrote
    manifest["runtime_files"] = mf.runtime_file_hashes(out)  # the schedule and tokenizer, checked on open
    keep = {mf.MANIFEST, *written}
    for entry in manifest["components"].values():
        keep |= set(entry.get("files") or {}) | set((entry.get("onnx") or {}).get("files") or {})
    if cfg.backend == "tensorrt":
        keep.add(trt_build.TIMING_CACHE)
    _remove_stale(out, stale_candidates - keep)
    _remove_partial(out)
    manifest["complete"] = True
    mf.write_manifest(out, manifest)


def _one_batch_size(value, flag: str) -> int:
    try:
        b = int(value)
    except (TypeError, ValueError):
        b = 0
    if b < 1:
        raise DiffclsError(f"{flag} must be a positive integer, got {value!r}")
    return b


def default_text_batch_size(model: SDModel) -> int:
    """The model's prompt count (its diffcls.json prompts file) rounded up to a multiple of 8,
    so one text-encoder call embeds every prompt; 16 when the model names no prompts."""
    root = Path(str(model.source))
    try:
        prompts = model_defaults(root).get("prompts") if root.is_dir() else None
        if prompts:
            with open(prompts, newline="") as f:
                n = sum(1 for row in csv.reader(f) if row) - 1  # minus the header
            if n > 0:
                return -(-n // 8) * 8
    except (OSError, DiffclsError, csv.Error):
        pass
    return DEFAULT_TEXT_BATCH_SIZE


def _fresh(out: Path, comp: str, entry: dict | None, settings: dict) -> bool:
    return bool(entry) and entry.get("settings") == settings and mf.file_problem(out, comp, entry) is None


def _timed(report, step: str, result: ExportResult, fn):
    report(StepEvent("start", step))
    t = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - t
    result.built.append(step)
    return value, seconds


def _report_saved(report, step: str, seconds: float, paths: list[Path], extra: str = "") -> None:
    nbytes = files_size(paths)
    # the one-line ending STYLE.md borrows from Ultralytics' exporters
    msg = f"export success {seconds:.1f} s, saved as '{paths[0]}' ({human_size(nbytes)})" + (f", {extra}" if extra else "")
    report(StepEvent("done", step, msg, seconds, paths[0], nbytes))


def _report_cached(report, step: str, result: ExportResult, out: Path, files: dict) -> None:
    first = out / next(iter(files))
    result.cached.append(step)
    report(StepEvent("cached", step, f"found cached {first} ({human_size(files_size(out / f for f in files))})", path=first))


def _entry(out: Path, paths: list[Path], settings: dict, check: dict, extra: dict | None = None) -> dict:
    files = {p.relative_to(out).as_posix(): mf.sha256_file(p) for p in paths}
    return {
        "file": paths[0].relative_to(out).as_posix(),
        "files": files,
        "precision": settings["precision"],
        "opset": settings["opset"],
        "settings": settings,
        "max_abs_err": check["max_abs_err"],
        "max_rel_err": check["max_rel_err"],
        "check_batch": check["check_batch"],
        **(extra or {}),
    }


def free_component(model, comp: str) -> None:
    """Drop a component's torch weights (moved to the meta device: configs stay readable).

    The model's wrapper for the component holds its modules, so moving it moves them (SD or DiT)."""
    import gc

    model.wrap(comp).to("meta")
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise); a no-op elsewhere."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _export_ort(model, comp, spec, out: Path, settings, old, device, cfg, report, result, release=None) -> dict:
    step = f"{comp} onnx"
    if _fresh(out, comp, old, settings):
        _report_cached(report, step, result, out, old["files"])
        if release is not None:
            release()
        return old
    final = out / f"{comp}.onnx"
    precision = run_precision(settings)

    def run():
        extra = {"run_precision": precision}
        feed, ref = ox.reference_pair(model, comp, spec)  # first: the torch weights may go after the export
        if not settings["optimize"] and precision == "fp32":
            ox.export_onnx(model, comp, spec, final, cfg.opset, work_dir=partial_dir(out))
            if release is not None:
                release()
            paths = ox.onnx_files(final)
        else:
            paths = _export_converted(model, comp, spec, out, final, precision, settings["optimize"], device, cfg.opset, extra, release)
        import gc

        gc.collect()  # the converters' graphs hold reference cycles: free them before ONNX Runtime loads the result
        _trim_heap()
        check = ox.check_against_reference(comp, final, precision, device, feed, ref)
        return paths, check, extra

    try:
        (paths, check, extra), seconds = _timed(report, step, result, run)
    except DiffclsError:
        for p in ox.onnx_files(final):
            p.unlink(missing_ok=True)  # never leave an unaccepted graph behind
        raise
    _report_saved(report, step, seconds, paths, f"max rel err {check['max_rel_err']:.2g} vs torch")
    return _entry(out, paths, settings, check, extra)


def run_precision(settings: dict) -> str:
    """The precision a component's graph computes in: fp32 for an upcast VAE encoder, else the export's."""
    return "fp32" if settings.get("upcast_fp32") else settings["precision"]


def _export_converted(model, comp, spec, out, final, precision, optimize, device, opset, extra, release=None) -> list[Path]:
    """fp32 ONNX in a temp dir -> [ORT fusion] -> [fp16] -> final."""
    with tempfile.TemporaryDirectory(dir=partial_dir(out)) as tmp:
        fp32 = ox.export_onnx(model, comp, spec, Path(tmp) / f"{comp}.onnx", opset, work_dir=Path(tmp))
        group_norm = ox.cuda_group_norm_ok(model.unet) if optimize and hasattr(model, "unet") else True
        if release is not None:
            release()  # the torch weights are not needed again: free them before converting
        _trim_heap()
        if not optimize:
            return ox.convert_fp16(fp32, final)
        fused = ox.optimize_unet(fp32, gpu=device == "cuda", for_fp16=precision == "fp16", group_norm=group_norm)
        extra["fused_ops"] = ox.fused_ops(fused)
        if precision == "fp16":
            return ox.convert_fp16(fused, final)
        return ox.save_onnx_model(fused, final)


def _export_trt(model, comp, spec, out: Path, settings, old, device, cfg, report, result) -> dict:
    onnx_dir = out / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    onnx_settings = {k: settings[k] for k in ("fingerprint", "image_size", "opset")}
    old_onnx = (old or {}).get("onnx") or {}
    onnx_path = onnx_dir / f"{comp}.onnx"
    step = f"{comp} onnx"
    if old_onnx.get("settings") == onnx_settings and mf.file_problem(out, comp, old_onnx) is None:
        _report_cached(report, step, result, out, old_onnx["files"])
        onnx_entry = old_onnx
    else:
        def run():
            paths = ox.export_onnx(model, comp, spec, onnx_path, cfg.opset, work_dir=partial_dir(out))
            paths = ox.onnx_files(onnx_path)
            return paths, ox.check_against_torch(model, comp, spec, onnx_path, "fp32", "cpu")

        (paths, check), seconds = _timed(report, step, result, run)
        _report_saved(report, step, seconds, paths, f"max rel err {check['max_rel_err']:.2g} vs torch")
        onnx_entry = {
            "files": {p.relative_to(out).as_posix(): mf.sha256_file(p) for p in paths},
            "settings": onnx_settings,
            "max_abs_err": check["max_abs_err"],
            "max_rel_err": check["max_rel_err"],
        }

    step = f"{comp} tensorrt"
    if _fresh(out, comp, old, settings) and old.get("onnx", {}).get("files") == onnx_entry["files"]:
        _report_cached(report, step, result, out, old["files"])
        return old
    plan = out / f"{comp}.plan"

    def run():
        trt_build.build_engine(
            onnx_path, plan, spec, settings["batch_sizes"], fp16=run_precision(settings) == "fp16",
            timing_cache=out / trt_build.TIMING_CACHE, workspace_gb=cfg.workspace_gb,
        )
        return check_trt_against_torch(model, comp, spec, plan, settings)

    (check), seconds = _timed(report, step, result, run)
    _report_saved(report, step, seconds, [plan], f"max rel err {check['max_rel_err']:.2g} vs torch")
    return _entry(out, [plan], settings, check, {"onnx": onnx_entry, "run_precision": run_precision(settings)})


def check_trt_against_torch(model, comp, spec, plan: Path, settings) -> dict:
    """Run the built engine at its smallest batch on random inputs and compare with fp32 torch."""
    import torch

    batch = min(settings["batch_sizes"])
    engine = TensorRTEngine(plan, spec, settings["batch_sizes"], torch.device("cuda"))
    feed = ox.random_feed(model, spec, batch, seed=1)
    ref = ox.torch_reference(model, comp, feed)
    out = engine(feed)[spec.output_names[0]].float().cpu().numpy()
    try:
        return ox.measure(comp, ref, out, run_precision(settings))
    except DiffclsError:
        plan.unlink(missing_ok=True)
        raise


def _write_runtime_files(model, out: Path, image_size: int, config=None) -> set[str]:
    """What `classify --engines DIR` needs besides the engines: tokenizer, ᾱ (and σ) at the
    export's image size, scheduler config (a single file's: its `config` directory's), and the
    model's classify defaults; returns the paths written (relative to `out`)."""
    written = {mf.TOKENIZER_DIR, mf.ALPHAS_FILE}
    tok = out / mf.TOKENIZER_DIR
    if tok.exists():
        shutil.rmtree(tok)
    model.tokenizer.save_pretrained(str(tok))
    alphas_cumprod, sigmas = model.noise_tables(image_size)  # Flux: shifted for this image size
    alphas = [float(a) for a in alphas_cumprod.detach().cpu().float().tolist()]
    tmp = out / (mf.ALPHAS_FILE + ".tmp")
    data = {"alphas_cumprod": alphas, "max_length": model.max_length}
    if sigmas is not None:  # a flow-matching model scores with its σ_t
        data["sigmas"] = [float(x) for x in sigmas.detach().cpu().float().tolist()]
    tmp.write_text(json.dumps(data))
    tmp.replace(out / mf.ALPHAS_FILE)
    root = Path(str(model.source)) if not str(model.source).startswith("<") else None
    configs = root if root is None or root.is_dir() or config is None else single_file_config(root, config)
    src = configs / "scheduler" / "scheduler_config.json" if configs is not None else None
    if src is not None and src.is_file():  # a flow model's engines then score with its default weighting too
        (out / "scheduler").mkdir(exist_ok=True)
        shutil.copyfile(src, out / "scheduler" / "scheduler_config.json")
        written.add("scheduler")
    if root is None or not root.is_dir():
        return written
    # the model's classify defaults (the demo model ships them) and the prompts file they name
    defaults = root / DEFAULTS_FILE
    if defaults.is_file():
        shutil.copyfile(defaults, out / DEFAULTS_FILE)
        written.add(DEFAULTS_FILE)
        prompts = prompts_file_named(defaults)
        if prompts is not None and (root / prompts).is_file() and _removable(out, prompts):
            (out / prompts).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / prompts, out / prompts)
            written.add(prompts)
    return written


# --- what the directory holds besides this export's own files ----------------------------------
DEFAULTS_FILE = "diffcls.json"
PARTIAL = ".partial"  # temp work inside the engine directory; removed by the next export


def prompts_file_named(defaults: Path) -> str | None:
    """The prompts file a diffcls.json names (relative to its folder); None when the file is
    missing or unreadable or names none."""
    try:
        prompts = json.loads(defaults.read_text()).get("prompts")
    except (OSError, ValueError, AttributeError):
        return None
    return prompts if isinstance(prompts, str) else None


def partial_dir(out: Path) -> Path:
    d = Path(out) / PARTIAL
    d.mkdir(exist_ok=True)
    return d


def _remove_partial(out: Path) -> None:
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    for d in (out, out / "onnx"):  # what older versions left behind: tmpXXXXXXXX/, .export-*/, *.tmp
        if not d.is_dir() or d.is_symlink():
            continue
        for p in d.iterdir():
            if p.is_dir() and not p.is_symlink() and (re.fullmatch(r"tmp[a-z0-9_]{8}", p.name) or p.name.startswith(".export-")):
                if all(f.is_file() and f.name.startswith(("model.onnx", *COMPONENTS)) for f in p.iterdir()):
                    shutil.rmtree(p, ignore_errors=True)
            elif p.is_file() and p.name in (mf.MANIFEST + ".tmp", mf.ALPHAS_FILE + ".tmp"):
                p.unlink(missing_ok=True)


def _removable(out: Path, rel) -> bool:
    """A relative path inside `out` whose folder (symlinks resolved) is inside `out` too."""
    if not isinstance(rel, str) or not rel:
        return False
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        return False
    root = out.resolve()
    return (root / p).parent.resolve().is_relative_to(root)


def check_out_dir(out: Path, model) -> None:
    """Refuse an --out the export must not take over: the model's own folder, or a non-empty
    folder that holds no engine manifest (the user's files: never deleted or replaced)."""
    if model is not None and not str(model).startswith("<"):
        src = Path(str(model))
        if src.exists() and out.exists() and (src.resolve() == out.resolve() or src.resolve().is_relative_to(out.resolve())):
            raise DiffclsError(f"--out {out} is the model's own folder (or holds it); pass a new folder for the engines, e.g. --out engines")
    if out.is_dir() and not (out / mf.MANIFEST).is_file() and any(out.iterdir()):
        raise DiffclsError(
            f"--out {out} is a folder with other files and no {mf.MANIFEST}, so it is not an engine directory; "
            "export owns its folder: pass a new or empty folder"
        )


def _owned_paths(out: Path, old: dict | None) -> set[str]:
    """Paths (relative to `out`) an earlier export wrote: the old manifest's files and the
    runtime files it lists (a manifest from before that list: the names every export writes,
    including the prompts file a copied diffcls.json names)."""
    written = (old or {}).get("written")
    if isinstance(written, list):
        names = {n for n in written if isinstance(n, str)} | {trt_build.TIMING_CACHE}
        for entry in ((old or {}).get("components") or {}).values():
            if isinstance(entry, dict):
                names |= set(entry.get("files") or {}) | set((entry.get("onnx") or {}).get("files") or {})
        return {n for n in names if _removable(out, n)}
    names = {mf.ALPHAS_FILE, mf.TOKENIZER_DIR, "scheduler", DEFAULTS_FILE, trt_build.TIMING_CACHE, "onnx"}
    for comp in COMPONENTS:
        names |= {f"{comp}.onnx", f"{comp}.onnx.data", f"{comp}.plan"}
    for entry in ((old or {}).get("components") or {}).values():
        if isinstance(entry, dict):
            names |= set(entry.get("files") or {}) | set((entry.get("onnx") or {}).get("files") or {})
    prompts = prompts_file_named(out / DEFAULTS_FILE)
    if prompts is not None:
        names.add(prompts)
    return {n for n in names if _removable(out, n)}


def _remove_stale(out: Path, rels: set[str]) -> None:
    """Remove what an earlier export wrote and this one did not (another model's defaults, the
    other backend's engines); never anything outside `out`, never through a symlink."""
    for rel in sorted(rels, key=lambda r: -len(Path(r).parts)):
        if not _removable(out, rel):
            continue
        p = out / rel
        if p.is_symlink() or p.is_file():
            p.unlink(missing_ok=True)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            continue
        parent = p.parent
        while parent != out and parent.is_dir() and not parent.is_symlink() and not any(parent.iterdir()):
            parent.rmdir()  # a folder emptied by the removal (e.g. prompts/)
            parent = parent.parent
