"""`diffcls classify` and `diffcls evaluate`: score image folders against class prompts."""

from __future__ import annotations

import json
import re
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, out, rate, user_errors
from diffcls.errors import DiffclsError


class Loss(str, Enum):
    l2 = "l2"
    l1 = "l1"
    huber = "huber"


class Interp(str, Enum):
    bicubic = "bicubic"
    bilinear = "bilinear"
    lanczos = "lanczos"


class Backend(str, Enum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


# --- shared options (defined once) ------------------------------------------------------------
ModelOpt = Annotated[Optional[Path], typer.Option("--model", help="Diffusers model directory, Hugging Face model id from the local cache (org/name), or checkpoint file (default: the bundled demo model).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="For a checkpoint --model: the diffusers directory or cached model id whose configs describe it (needed for SD 2.x).")]
EnginesOpt = Annotated[Optional[Path], typer.Option("--engines", help="Engine directory from `diffcls export` (runs ONNX Runtime / TensorRT instead of torch).")]
BackendOpt = Annotated[Backend, typer.Option("--backend", help="Engine backend; auto = torch, or the one an --engines directory was exported for.")]
PromptsOpt = Annotated[Optional[Path], typer.Option("--prompts", help="CSV with columns prompt,classname,classidx (several prompts may share a classidx).")]
ClassesOpt = Annotated[Optional[str], typer.Option("--classes", help='Comma-separated class names, e.g. "cat,dog" (used with --template).')]
TemplateOpt = Annotated[str, typer.Option("--template", help="Prompt template for --classes; {} is the class name.")]
NSamplesOpt = Annotated[Optional[str], typer.Option("--n-samples", help="Timesteps per round, e.g. '50 500' or 50,500 (default: the model's, else 50 500).")]
ToKeepOpt = Annotated[Optional[str], typer.Option("--to-keep", help="Prompts kept after each round, e.g. '5 1' (last must be 1).")]
TrialsOpt = Annotated[int, typer.Option("--n-trials", min=1, help="Noise draws per timestep.")]
LossOpt = Annotated[Loss, typer.Option("--loss", help="Error between true and predicted noise.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="UNet batch size (images share batches).")]
SizeOpt = Annotated[Optional[int], typer.Option("--image-size", min=8, help="Input resolution S (default: the model's, 512 for SD 2.x base).")]
InterpOpt = Annotated[Interp, typer.Option("--interpolation", help="Resize filter.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the noise bank.")]
NoiseOpt = Annotated[Optional[Path], typer.Option("--noise", help="Noise bank file (torch .pt or .npy) of shape [max(n_samples)*n_trials, C, h, w].")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Results CSV (path, prediction, top-5 with scores); rerunning resumes it.")]
ErrorsOpt = Annotated[Optional[Path], typer.Option("--save-errors", help="JSONL file with every (prompt, t, trial, error) per image.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto (fp16 on GPU, fp32 on CPU), fp32 or fp16.")]
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache for text embeddings and latents (default: ~/.cache/diffcls or $DIFFCLS_CACHE).")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Do not read or write the embedding/latent cache.")]
CompileOpt = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the UNet (CUDA graphs on GPU; compiled once per batch size).")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, help="Threads that decode and resize images while the UNet runs.")]


def parse_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise DiffclsError(f"{flag} {text!r} must be integers, e.g. {flag} 50 500") from None
    if not values:
        raise DiffclsError(f"{flag} is empty; give integers, e.g. {flag} 50 500")
    return values


LIST_FLAGS = ("--n-samples", "--to-keep", "--batch-sizes")


def join_list_flags(args: list[str]) -> list[str]:
    """Let `--n-samples 50 500` mean `--n-samples 50,500` (click options take one value)."""
    out_args: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        out_args.append(a)
        i += 1
        if a in LIST_FLAGS:
            vals = []
            while i < len(args) and re.fullmatch(r"\d+(,\d+)*", args[i]):
                vals.append(args[i])
                i += 1
            if vals:
                out_args.append(",".join(vals))
    return out_args


def resolve_prompts(prompts: Path | None, classes: str | None, template: str, defaults: dict, folder_classes: list[str] | None = None):
    from diffcls.runtime.prompts import PromptSet

    if prompts is not None and classes is not None:
        raise DiffclsError("give either --prompts or --classes, not both")
    if prompts is not None:
        return PromptSet.from_csv(prompts)
    if classes is not None:
        return PromptSet.from_classes(classes, template)
    if defaults.get("prompts"):
        return PromptSet.from_csv(defaults["prompts"])
    if folder_classes:
        return PromptSet.from_classes(folder_classes, template)
    raise DiffclsError("no class prompts: pass --prompts prompts.csv or --classes \"cat,dog\"")


def build_schedule(n_samples, to_keep, n_trials, loss, n_prompts, defaults):
    from diffcls.runtime.schedule import Schedule, default_schedule

    ns = parse_ints(n_samples, "--n-samples")
    ks = parse_ints(to_keep, "--to-keep")
    if ns is None and ks is None:
        ns = tuple(defaults.get("n_samples", (50, 500)))
        ks = tuple(defaults.get("to_keep", (5, 1)))
        return default_schedule(n_prompts, ns, ks, n_trials=n_trials, loss=loss)
    if ns is None or ks is None:
        raise DiffclsError("give both --n-samples and --to-keep (one value per round each), or neither")
    return Schedule(n_samples=ns, to_keep=ks, n_trials=n_trials, loss=loss)


def load_noise(path: Path | None):
    if path is None:
        return None
    import numpy as np
    import torch

    try:
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path)).float()
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DiffclsError(f"noise file {path} does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise DiffclsError(f"cannot read noise file {path} ({type(e).__name__}); save a tensor with torch.save or numpy.save") from None
    if not isinstance(obj, torch.Tensor):
        raise DiffclsError(f"noise file {path} holds a {type(obj).__name__}, not a tensor; torch.save(tensor, path)")
    return obj.float()


def open_classifier(model, engines, backend, device, precision, image_size, batch_size, compile, cache_dir, no_cache):
    from diffcls.runtime.classifier import Classifier

    name = backend.value
    if name == "auto":
        name = "torch"
        if engines is not None:
            try:
                name = json.loads((engines / "manifest.json").read_text()).get("backend", "onnxruntime")
            except (OSError, json.JSONDecodeError):
                name = "onnxruntime"  # the backend reports the broken manifest
    clf = Classifier.from_pretrained(
        model if engines is None or model is None or not isinstance(model, Path) else str(model),
        backend=name,
        engine_dir=engines,
        device=None if device == "auto" else device,
        precision=None if precision == "auto" else precision,
        image_size=image_size,
        # a compiled UNet gets one static graph per batch size: pad the tail to the same size
        batch_sizes=(batch_size,) if compile and name == "torch" else None,
        compile=compile,
        cache_dir=cache_dir,
        use_cache=not no_cache,
    )
    sizes = clf.engines.unet.batch_sizes
    if engines is not None and sizes and batch_size not in sizes:
        from diffcls.engines.manifest import check_batch_sizes, read_manifest

        try:  # refuses it, with the export command that adds it
            check_batch_sizes(engines, read_manifest(engines), "unet", (batch_size,))
        except DiffclsError as e:
            raise DiffclsError(f"--batch-size {batch_size}: {e}") from None
    return clf


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def run_folder(
    folder: Path,
    *,
    prompts_set,
    clf,
    schedule,
    seed,
    noise,
    batch_size,
    interpolation,
    out_csv,
    errors_path,
    workers,
    labels: dict[str, int] | None = None,
):
    """Classify every image under `folder`, resuming `out_csv`; returns {key: (classidx, row)}."""
    from diffcls.runtime.preprocess import find_images
    from diffcls.runtime.results import ResultsWriter

    images = find_images(folder)
    root = folder if folder.is_dir() else folder.parent
    keys = {p: p.relative_to(root).as_posix() for p in images}
    e = clf.engines
    settings = {
        "model": e.fingerprint,
        "backend": e.backend,
        "precision": e.precision,
        "prompts": prompts_set.digest(),
        "schedule": schedule.describe(),
        "seed": seed if noise is None else None,
        "noise": None if noise is None else _tensor_digest(noise),
        "image_size": e.image_size,
        "interpolation": interpolation,
    }
    writer = None
    done: dict[str, dict] = {}
    if out_csv is not None:
        writer = ResultsWriter(out_csv, settings, errors_path)
        done = writer.open()
    elif errors_path is not None:
        raise DiffclsError("--save-errors needs --out too (the CSV records which images are done)")
    todo = [p for p in images if keys[p] not in done]
    results: dict[str, dict] = {k: {"classidx": int(r["classidx"]), "prediction": r["prediction"], "score": r["score"], "row": r} for k, r in done.items() if k in keys.values()}
    if done:
        console.print(f"resuming {out_csv}: {len(done)} of {len(images)} images already done")
    skipped: list[tuple[str, str]] = []
    start = time.perf_counter()
    n_done = 0
    try:
        with _progress() as progress:
            task = progress.add_task("classify", total=len(todo), rate="-")

            def on_skip(path, msg):
                skipped.append((path, msg))
                console.print(f"[yellow]skipped[/] {msg}")
                progress.advance(task)

            for r in clf.iter_classify(
                [str(p) for p in todo],
                prompts_set,
                schedule,
                seed=seed,
                noise=noise,
                batch_size=batch_size,
                interpolation=interpolation,
                workers=workers,
                on_skip=on_skip,
            ):
                key = keys[Path(r.source)]
                if writer is not None:
                    writer.write(key, r)
                results[key] = {
                    "classidx": r.prediction,
                    "prediction": r.classname,
                    "score": f"{r.scores[r.prompt]:.6g}",
                    "top": r.top_classes(5),
                }
                n_done += 1
                elapsed = time.perf_counter() - start
                progress.update(task, advance=1, rate=rate(n_done, elapsed, "img"))
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - start
    stats = clf.last_stats
    if n_done:
        evals = stats.unet_evals if stats else 0
        console.print(
            f"classified {n_done} images in {elapsed:.1f} s ({rate(n_done, elapsed, 'img')}, "
            f"{rate(evals, elapsed, 'UNet evals', 'UNet eval', digits=0)}, padding {100 * (stats.padding_fraction if stats else 0):.1f}%)"
            + (f"; {len(skipped)} skipped" if skipped else "")
        )
        console.print("speed: " + _per_image_speed(clf.timer.summary(), n_done))
    elif skipped:
        console.print(f"no image could be classified; {len(skipped)} skipped")
    return results, skipped, keys


def _per_image_speed(stages: dict, n: int) -> str:
    """'1.2 ms preprocess, 0.4 ms text encode, ... per image' (stages summed over the run / n)."""
    def ms(*names):
        return 1000 * sum(stages.get(k, {}).get("total_s", 0.0) for k in names) / n

    unet = [k for k in stages if k.startswith("unet_round_")]
    parts = [("preprocess", ("preprocess",)), ("text encode", ("text_encode",)), ("VAE encode", ("vae_encode",)), ("UNet", unet)]
    return ", ".join(f"{ms(*keys):.1f} ms {label}" for label, keys in parts) + " per image"


def _tensor_digest(t) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


@app.command()
def classify(
    folder: Annotated[Path, typer.Argument(help="Image file or folder (searched recursively).")],
    prompts: PromptsOpt = None,
    classes: ClassesOpt = None,
    template: TemplateOpt = "a photo of a {}.",
    model: ModelOpt = None,
    config: ConfigOpt = None,
    engines: EnginesOpt = None,
    backend: BackendOpt = Backend.auto,
    n_samples: NSamplesOpt = None,
    to_keep: ToKeepOpt = None,
    n_trials: TrialsOpt = 1,
    loss: LossOpt = Loss.l2,
    batch_size: BatchOpt = 32,
    image_size: SizeOpt = None,
    interpolation: InterpOpt = Interp.bicubic,
    seed: SeedOpt = 0,
    noise: NoiseOpt = None,
    out_csv: OutOpt = None,
    save_errors: ErrorsOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    compile: CompileOpt = False,
    workers: WorkersOpt = 2,
) -> None:
    """Classify images zero-shot: the class whose prompt best predicts the added noise wins."""
    with user_errors():
        ctx = _setup(folder, prompts, classes, template, model, engines, backend, n_samples, to_keep, n_trials, loss, batch_size, image_size, device, precision, cache_dir, no_cache, compile, noise, config=config)
        results, skipped, keys = run_folder(
            folder,
            prompts_set=ctx["prompts"],
            clf=ctx["clf"],
            schedule=ctx["schedule"],
            seed=seed,
            noise=ctx["noise"],
            batch_size=batch_size,
            interpolation=interpolation.value,
            out_csv=out_csv,
            errors_path=save_errors,
            workers=workers,
        )
        if out_csv is None or len(results) <= 20:
            _print_predictions(results)
        if out_csv is not None:
            console.print(f"results in {out_csv}" + (f", errors in {save_errors}" if save_errors else ""))
        if not results:
            raise DiffclsError(f"no image under {folder} could be classified; see the skipped files above")


def _setup(folder, prompts, classes, template, model, engines, backend, n_samples, to_keep, n_trials, loss, batch_size, image_size, device, precision, cache_dir, no_cache, compile, noise, folder_classes=None, config=None):
    from diffcls.models.loading import check_model_path, model_defaults
    from diffcls.runtime.preprocess import find_images

    # fail fast on a missing/empty folder, model or engine directory, before loading anything
    find_images(folder)
    if engines is None:
        check_model_path(model)
    else:
        from diffcls.engines.manifest import require_engine_dir

        require_engine_dir(engines, backend=None if backend.value == "auto" else backend.value)
    defaults = model_defaults(model) if engines is None and (model is None or Path(model).is_dir()) else {}
    if engines is not None and model is None:
        defaults = _engine_defaults(engines)
    prompt_set = resolve_prompts(prompts, classes, template, defaults, folder_classes)
    schedule = build_schedule(n_samples, to_keep, n_trials, loss.value, len(prompt_set), defaults)
    schedule.validate(len(prompt_set))
    noise_t = load_noise(noise)
    if config is not None:
        if model is None:
            raise DiffclsError("--config describes a checkpoint file; pass it with --model FILE")
        from diffcls.models.loading import load_model

        model = load_model(model, config=config)
    clf = open_classifier(model, engines, backend, device, precision, image_size or defaults.get("image_size"), batch_size, compile, cache_dir, no_cache)
    schedule.validate(len(prompt_set), clf.engines.num_train_timesteps)
    return {"prompts": prompt_set, "schedule": schedule, "clf": clf, "noise": noise_t}


def _engine_defaults(engines: Path) -> dict:
    """An engine directory exported from the demo model carries its diffcls.json defaults."""
    from diffcls.models.loading import model_defaults

    return model_defaults(engines) if (engines / "diffcls.json").exists() else {}


def _print_predictions(results: dict) -> None:
    from rich.table import Table

    table = Table("image", "prediction", "score", "runner-up")
    for key in sorted(results):
        r = results[key]
        top = r.get("top") or []
        runner = f"{top[1][1]} ({top[1][2]:.4g})" if len(top) > 1 else (r["row"].get("top2", "") if "row" in r else "")
        table.add_row(key, r["prediction"], str(r["score"]), runner)
    out.print(table)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


@app.command()
def evaluate(
    folder: Annotated[Path, typer.Argument(help="Labeled folder: one subfolder of images per class, named as the classes.")],
    prompts: PromptsOpt = None,
    classes: ClassesOpt = None,
    template: TemplateOpt = "a photo of a {}.",
    model: ModelOpt = None,
    config: ConfigOpt = None,
    engines: EnginesOpt = None,
    backend: BackendOpt = Backend.auto,
    n_samples: NSamplesOpt = None,
    to_keep: ToKeepOpt = None,
    n_trials: TrialsOpt = 1,
    loss: LossOpt = Loss.l2,
    batch_size: BatchOpt = 32,
    image_size: SizeOpt = None,
    interpolation: InterpOpt = Interp.bicubic,
    seed: SeedOpt = 0,
    noise: NoiseOpt = None,
    out_csv: OutOpt = None,
    save_errors: ErrorsOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the confusion matrix as a PNG.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics as JSON.")] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    compile: CompileOpt = False,
    workers: WorkersOpt = 2,
) -> None:
    """Accuracy on a labeled folder: top-1, mean per-class accuracy and a confusion matrix."""
    with user_errors():
        if not folder.is_dir():
            raise DiffclsError(f"{folder} is not a folder; evaluate needs one subfolder of images per class")
        subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subdirs:
            raise DiffclsError(f"{folder} has no class subfolders; put each class's images in a subfolder named after the class")
        ctx = _setup(folder, prompts, classes, template, model, engines, backend, n_samples, to_keep, n_trials, loss, batch_size, image_size, device, precision, cache_dir, no_cache, compile, noise, folder_classes=subdirs, config=config)
        pset = ctx["prompts"]
        by_name = {_norm(name): idx for idx, name in pset.classes.items()}
        unknown = [d for d in subdirs if _norm(d) not in by_name]
        if unknown:
            raise DiffclsError(
                f"subfolders {', '.join(unknown)} of {folder} match no class name ({', '.join(pset.classes.values())}); rename them or fix the prompts"
            )
        results, skipped, keys = run_folder(
            folder,
            prompts_set=pset,
            clf=ctx["clf"],
            schedule=ctx["schedule"],
            seed=seed,
            noise=ctx["noise"],
            batch_size=batch_size,
            interpolation=interpolation.value,
            out_csv=out_csv,
            errors_path=save_errors,
            workers=workers,
        )
        truth = {}
        for key in results:
            top = key.split("/", 1)[0]
            if "/" in key and _norm(top) in by_name:
                truth[key] = by_name[_norm(top)]
        if not truth:
            raise DiffclsError(f"no labeled image under {folder} was classified")
        from diffcls.runtime.metrics import confusion_metrics

        class_ids = list(pset.classes)
        m = confusion_metrics([truth[k] for k in truth], [results[k]["classidx"] for k in truth], class_ids)
        _print_metrics(m, pset.classes)
        if json_out is not None:
            from diffcls.runtime.results import atomic_write_text

            atomic_write_text(json_out, json.dumps({**m, "classes": pset.classes, "n_skipped": len(skipped)}, indent=2))
        if plot is not None:
            from diffcls.runtime.metrics import plot_confusion

            plot_confusion(m["confusion"], [pset.classes[i] for i in class_ids], plot, title=f"top-1 {100 * m['top1']:.1f}%")
            console.print(f"confusion matrix plot in {plot}")


def _print_metrics(m: dict, classes: dict[int, str]) -> None:
    from rich.table import Table

    names = [classes[i] for i in m["class_ids"]]
    out.print(f"top-1 accuracy: {100 * m['top1']:.2f}% ({m['correct']}/{m['n']})")
    out.print(f"mean per-class accuracy: {100 * m['mean_per_class']:.2f}%")
    if len(names) > 30:
        out.print(f"confusion matrix: {len(names)} classes, too many to print; see --json / --plot")
        return
    # columns are headed by class id so the counts stay readable in an 80-column terminal
    table = Table(title="confusion (rows: true, columns: predicted class id)")
    table.add_column("true class", no_wrap=True)
    for i in m["class_ids"]:
        table.add_column(str(i), justify="right", no_wrap=True)
    table.add_column("acc", justify="right", no_wrap=True, min_width=4)
    for i, name, row, acc in zip(m["class_ids"], names, m["confusion"], m["per_class"]):
        table.add_row(f"{i} {name}", *map(str, row), "-" if acc is None else f"{100 * acc:.0f}%")
    out.print(table)
