"""`diffcls classify` and `diffcls evaluate`: score image folders against class prompts."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, out, user_errors
from diffcls.cli.settings import Run, RunSettings, prepare, run_options
from diffcls.errors import DiffclsError


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
            # negative numbers too, so that "--n-samples -1 2" is reported as a bad value
            while i < len(args) and re.fullmatch(r"-?\d+(,-?\d+)*", args[i]):
                vals.append(args[i])
                i += 1
            if vals:
                out_args.append(",".join(vals))
    return out_args


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
        TextColumn("{task.fields[rate]} img/s"),
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
    from rich.markup import escape

    from diffcls.runtime.preprocess import file_digest, find_images
    from diffcls.runtime.results import ResultsWriter, printable

    skipped: list[tuple[str, str]] = []

    def folder_problem(path, msg):
        skipped.append((path, msg))
        console.print(f"[yellow]skipped[/] {escape(printable(msg))}")

    images = find_images(folder, on_problem=folder_problem)
    root = folder if folder.is_dir() else folder.parent
    keys = {p: p.relative_to(root).as_posix() for p in images}
    by_key = {k: p for p, k in keys.items()}
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
        # rows are keyed by the path under the root: another root's "a.png" is another image
        "root": os.fsdecode(os.path.abspath(root)),
    }
    writer = None
    done: dict[str, dict] = {}
    if out_csv is not None:
        writer = ResultsWriter(out_csv, settings, errors_path)

        def unchanged(key: str, sha: str) -> bool:  # a row stands only for the bytes it was computed from
            p = by_key.get(key)
            if p is None:
                return True  # not part of this run: left as it is
            try:
                return file_digest(p) == sha
            except OSError:
                return False  # unreadable now: the run will report it

        done = writer.open(current=unchanged)
    elif errors_path is not None:
        raise DiffclsError("--save-errors needs --out too (the CSV records which images are done)")
    todo = [p for p in images if keys[p] not in done]
    results: dict[str, dict] = {k: {"classidx": int(r["classidx"]), "prediction": r["prediction"], "score": r["score"], "row": r} for k, r in done.items() if k in by_key}
    if writer is not None:
        for why, n in writer.dropped.items():
            console.print(escape(f"{out_csv}: {_DROPPED.get(why, why).format(n=n, errors=errors_path)}"))
    if results:
        console.print(f"resuming {out_csv}: {len(results)} of {len(images)} images already done")
    start = time.perf_counter()
    n_done = 0
    try:
        with _progress() as progress:
            task = progress.add_task("classify", total=len(todo), rate="-")

            def on_skip(path, msg):
                skipped.append((path, msg))
                console.print(f"[yellow]skipped[/] {escape(printable(msg))}")
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
                progress.update(task, advance=1, rate=f"{n_done / elapsed:.2f}" if elapsed > 0 else "-")
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - start
    stats = clf.last_stats
    if n_done:
        evals = stats.unet_evals if stats else 0
        console.print(
            f"classified {n_done} images in {elapsed:.1f} s ({n_done / elapsed:.2f} img/s, "
            f"{evals / elapsed:.0f} UNet evals/s, padding {100 * (stats.padding_fraction if stats else 0):.1f}%)"
            + (f"; {len(skipped)} skipped" if skipped else "")
        )
        console.print("speed: " + _per_image_speed(clf.timer.summary(), n_done))
    elif skipped:
        console.print(f"no image could be classified; {len(skipped)} skipped")
    return results, skipped, keys


_DROPPED = {  # why ResultsWriter dropped rows on resume -> what the user is told
    "torn": "a row cut short by an interrupted write was dropped; that image is classified again",
    "malformed": "{n} malformed row(s) dropped; those images are classified again",
    "duplicate": "{n} duplicate row(s) dropped",
    "changed": "{n} image(s) changed since they were classified; classifying them again",
    "no errors record": "{n} image(s) have no record in {errors}; classifying them again to write one",
}


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


OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Results CSV (path, prediction, top-5 with scores); rerunning resumes it.")]
ErrorsOpt = Annotated[Optional[Path], typer.Option("--save-errors", help="JSONL file with every (prompt, t, trial, error) per image.")]


def _run_folder(folder: Path, run: Run, s: RunSettings, out_csv, save_errors, labels=None):
    return run_folder(
        folder,
        prompts_set=run.prompts,
        clf=run.classifier,
        schedule=run.schedule,
        seed=s.seed,
        noise=run.noise,
        batch_size=s.batch_size,
        interpolation=s.interpolation.value,
        out_csv=out_csv,
        errors_path=save_errors,
        workers=s.workers,
    )


@app.command()
@run_options
def classify(
    folder: Annotated[Path, typer.Argument(help="Image file or folder (searched recursively).")],
    out_csv: OutOpt = None,
    save_errors: ErrorsOpt = None,
    *,
    settings: RunSettings,
) -> None:
    """Classify images zero-shot: the class whose prompt best predicts the added noise wins."""
    with user_errors():
        run = prepare(settings, folder)
        results, skipped, keys = _run_folder(folder, run, settings, out_csv, save_errors)
        if out_csv is None or len(results) <= 20:
            _print_predictions(results)
        if out_csv is not None:
            console.print(f"results in {out_csv}" + (f", errors in {save_errors}" if save_errors else ""))
        if not results:
            raise DiffclsError(f"no image under {folder} could be classified; see the skipped files above")


def _print_predictions(results: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from diffcls.runtime.results import printable

    table = Table("image", "prediction", "score", "runner-up")
    for key in sorted(results):
        r = results[key]
        top = r.get("top") or []
        runner = f"{top[1][1]} ({top[1][2]:.4g})" if len(top) > 1 else (r["row"].get("top2", "") if "row" in r else "")
        table.add_row(escape(printable(key)), escape(r["prediction"]), str(r["score"]), escape(runner))
    out.print(table)


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


@app.command()
@run_options
def evaluate(
    folder: Annotated[Path, typer.Argument(help="Labeled folder: one subfolder of images per class, named as the classes.")],
    out_csv: OutOpt = None,
    save_errors: ErrorsOpt = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the confusion matrix as a PNG.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics as JSON.")] = None,
    *,
    settings: RunSettings,
) -> None:
    """Accuracy on a labeled folder: top-1, mean per-class accuracy and a confusion matrix."""
    with user_errors():
        if not folder.is_dir():
            raise DiffclsError(f"{folder} is not a folder; evaluate needs one subfolder of images per class")
        subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subdirs:
            raise DiffclsError(f"{folder} has no class subfolders; put each class's images in a subfolder named after the class")
        from diffcls.runtime.results import check_writable

        check_writable(json_out, "--json")  # before the run, not after it finished
        check_writable(plot, "--plot")
        run = prepare(settings, folder, folder_classes=subdirs)
        pset = run.prompts
        by_name = {_norm(name): idx for idx, name in pset.classes.items()}
        unknown = [d for d in subdirs if _norm(d) not in by_name]
        if unknown:
            raise DiffclsError(
                f"subfolders {', '.join(unknown)} of {folder} match no class name ({', '.join(pset.classes.values())}); rename them or fix the prompts"
            )
        results, skipped, keys = _run_folder(folder, run, settings, out_csv, save_errors)
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
