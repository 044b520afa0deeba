"""`diffcls classify` and `diffcls evaluate`: score image folders against class prompts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import LineProgress, app, console, interactive, out, rate, user_errors
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
    """A progress bar on a terminal; plain progress lines every few seconds in a log or pipe."""
    if not interactive(console):
        return LineProgress(console)
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
    shard: tuple[int, int] | None = None,
    runner=None,
    calibration=None,
):
    """Classify every image `folder` names (a path, or collected `Inputs`; or shard I of N of
    them: `shard=(I, N)`), resuming `out_csv`; `runner` (a runtime.distributed.RayRunner) scores
    them instead of `clf`. Returns ({key: outcome}, skipped, {image: key}) (outcome: see
    runtime.results.outcome). `labels` ({key: true classidx}) adds the CSV columns label and
    correct; `calibration` (a runtime.calibration.Calibration) the probability columns, after
    checking that it was fitted on this run's model, prompts and schedule."""
    from rich.markup import escape

    from diffcls.runtime.distributed import engine_info
    from diffcls.runtime.inputs import Inputs, collect_inputs
    from diffcls.runtime.preprocess import file_digest
    from diffcls.runtime.shards import shard_of
    from diffcls.runtime.results import ResultsWriter, outcome, outcome_from_row, printable

    skipped: list[tuple[str, str]] = []

    def folder_problem(path, msg):
        skipped.append((path, msg))
        console.print(f"[yellow]skipped[/] {escape(printable(msg))}")

    inputs = folder if isinstance(folder, Inputs) else collect_inputs([folder])
    for path, msg in inputs.problems:  # folders that could not be listed or entered
        folder_problem(path, msg)
    images, keys, root = inputs.images, inputs.keys, inputs.root
    if shard is not None:
        images = [p for p in images if shard_of(keys[p], shard[1]) == shard[0]]
        keys = {p: keys[p] for p in images}
    by_key = {k: p for p, k in keys.items()}
    e = runner.info if runner is not None else engine_info(clf)
    settings = {
        "model": e["fingerprint"],
        "engines": e.get("engines_digest"),  # every file of an engine directory that shapes the scores
        "backend": e["backend"],
        "precision": e["precision"],
        "prompts": prompts_set.digest(),
        "schedule": schedule.describe(),
        "seed": seed if noise is None else None,
        "noise": None if noise is None else _tensor_digest(noise),
        "image_size": e["image_size"],
        "interpolation": interpolation,
        # rows are keyed by the path under the root: another root's "a.png" is another image
        "root": os.fsdecode(os.path.abspath(root)),
    }
    if shard is not None:  # a shard's file is resumed only by the same shard; `merge` drops it
        settings["shard"] = f"{shard[0]}/{shard[1]}"
        settings["inputs"] = inputs.spec()  # `merge` checks coverage against the run's own inputs
    temperature = None
    if calibration is not None:
        calibration.check(model=settings["model"], prompts=settings["prompts"], schedule=settings["schedule"])
        temperature = settings["temperature"] = calibration.temperature  # the probability columns depend on it
    writer = None
    done: dict[str, dict] = {}
    if out_csv is not None:
        writer = ResultsWriter(
            out_csv, settings, errors_path, extra_columns=LABEL_COLUMNS if labels is not None else (), temperature=temperature
        )

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
    class_ids = {name: idx for idx, name in prompts_set.classes.items()}
    results: dict[str, dict] = {k: outcome_from_row(r, class_ids) for k, r in done.items() if k in by_key}
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

            if runner is not None:  # workers elsewhere: absolute paths, mapped back to keys
                by_abs = {os.path.abspath(p): p for p in todo}
                stream = runner.iter_classify(list(by_abs), on_skip=on_skip)
            else:
                by_abs = None
                stream = clf.iter_classify(
                    [str(p) for p in todo],
                    prompts_set,
                    schedule,
                    seed=seed,
                    noise=noise,
                    batch_size=batch_size,
                    interpolation=interpolation,
                    workers=workers,
                    on_skip=on_skip,
                )
            for r in stream:
                key = keys[by_abs[r.source] if by_abs is not None else Path(r.source)]
                if writer is not None:
                    writer.write(key, r, _label_cells(labels, key, r, prompts_set))
                results[key] = outcome(r)
                n_done += 1
                elapsed = time.perf_counter() - start
                progress.update(task, advance=1, rate=rate(n_done, elapsed, "img"))
    finally:
        if writer is not None:
            writer.close()
    elapsed = time.perf_counter() - start
    stats = clf.last_stats if clf is not None else None
    if n_done and runner is not None:
        console.print(
            f"classified {n_done} images in {elapsed:.1f} s ({n_done / elapsed:.2f} img/s) on "
            f"{len(runner.worker_stats)} Ray workers" + (f"; {len(skipped)} skipped" if skipped else "")
        )
        console.print("per worker: " + runner.summary())
    elif n_done:
        evals = stats.unet_evals if stats else 0
        console.print(
            f"classified {n_done} images in {elapsed:.1f} s ({rate(n_done, elapsed, 'img')}, "
            f"{evals / n_done:.0f} UNet evals/image, {rate(evals, elapsed, 'UNet evals', 'UNet eval', digits=0)}, "
            f"padding {100 * (stats.padding_fraction if stats else 0):.1f}%)"
            + (f"; {len(skipped)} skipped" if skipped else "")
        )
        console.print("speed: " + _per_image_speed(clf.timer.summary(), n_done))
    elif skipped:
        console.print(f"no image could be classified; {len(skipped)} skipped")
    return results, skipped, keys


def evals_per_image(results: dict, keys=None) -> float | None:
    """Mean UNet evaluations per image over `keys` (default: all results) that record it."""
    counts = [results[k]["n_evals"] for k in (results if keys is None else keys) if results[k].get("n_evals") is not None]
    return sum(counts) / len(counts) if counts else None


_DROPPED = {  # why ResultsWriter dropped rows on resume -> what the user is told
    "torn": "a row cut short by an interrupted write was dropped; that image is classified again",
    "malformed": "{n} malformed row(s) dropped; those images are classified again",
    "duplicate": "{n} duplicate row(s) dropped",
    "changed": "{n} image(s) changed since they were classified; classifying them again",
    "no errors record": "{n} image(s) have no record in {errors}; classifying them again to write one",
}

LABEL_COLUMNS = ("label", "correct")  # evaluate's extra CSV columns: true class name, 1 or 0


def _label_cells(labels: dict[str, int] | None, key: str, r, prompts_set) -> tuple[str, ...]:
    if labels is None or key not in labels:
        return ()
    return prompts_set.classes[labels[key]], "1" if labels[key] == r.prediction else "0"


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
CalibrationOpt = Annotated[Optional[Path], typer.Option("--calibration", help="Temperature file from `diffcls calibrate`: adds class probabilities (CSV 'probability' columns).")]


def _calibration(path: Path | None):
    """The Calibration of --calibration (checked against the run in run_folder), or None."""
    from diffcls.runtime.calibration import Calibration

    return None if path is None else Calibration.load(path)


_SCALE = "Many GPUs"


@dataclass(frozen=True)
class ScaleOut:
    """How a run is spread: a shard of the folder, and/or Ray workers."""

    shard: tuple[int, int] | None = None
    ray: bool = False
    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None

    @classmethod
    def from_options(cls, shard, ray, address, workers, gpus_per_worker) -> "ScaleOut":
        from diffcls.runtime.shards import parse_shard

        if not ray:
            given = [f for f, v in (("--ray-address", address), ("--ray-workers", workers), ("--gpus-per-worker", gpus_per_worker)) if v is not None]
            if given:
                raise DiffclsError(f"{', '.join(given)} only apply with --ray; add --ray or drop {given[0]}")
        return cls(None if shard is None else parse_shard(shard), ray, address, workers, gpus_per_worker)


ShardOpt = Annotated[Optional[str], typer.Option("--shard", help="Classify only shard I of N (e.g. 0/4): a fixed share of the images, by a hash of each path; join the shards' --out files with `diffcls merge`.", rich_help_panel=_SCALE)]
RayOpt = Annotated[bool, typer.Option("--ray", help="Run on Ray workers (pip install 'diffcls[ray]'): an existing cluster with --ray-address, else a local one.", rich_help_panel=_SCALE)]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster address, e.g. auto or ray://head:10001 (default: a local cluster).", rich_help_panel=_SCALE)]
RayWorkersOpt = Annotated[Optional[int], typer.Option("--ray-workers", help="Ray workers, each opening the engines once (default: one per GPU, else 1).", rich_help_panel=_SCALE, min=1)]
GpusOpt = Annotated[Optional[float], typer.Option("--gpus-per-worker", help="GPUs per Ray worker, may be a fraction (default: 1 when the cluster has GPUs, else 0).", rich_help_panel=_SCALE, min=0)]


def _run_folder(folder, run: Run, s: RunSettings, out_csv, save_errors, labels=None, scale: ScaleOut | None = None, calibration=None):
    """run_folder, locally or on Ray workers (then `run` was prepared without opening engines)."""
    scale = scale or ScaleOut()
    with contextlib.ExitStack() as stack:
        runner = None
        if scale.ray:
            from diffcls.cli.settings import classifier_kwargs
            from diffcls.runtime.distributed import RayRunner, WorkerSpec

            spec = WorkerSpec(
                classifier=classifier_kwargs(s, run.image_size, absolute=True),
                prompts=run.prompts,
                schedule=run.schedule,
                seed=s.seed,
                noise=run.noise,
                batch_size=s.batch_size,
                interpolation=s.interpolation.value,
                decode_workers=s.workers,
            )
            runner = RayRunner(spec, address=scale.address, workers=scale.workers, gpus_per_worker=scale.gpus_per_worker)
            stack.enter_context(runner)
            console.print(f"Ray: {runner.workers} workers x {runner.gpus_per_worker:g} GPUs, engines on {runner.info['device']} ({runner.info['backend']})")
        results, skipped, keys = run_folder(
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
            labels=labels,
            shard=scale.shard,
            runner=runner,
            calibration=calibration,
        )
    return results, skipped, keys


PathsArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        help="Images, folders (searched recursively) or globs such as 'photos/*.jpg'. Result keys are "
        "paths relative to the folder given, or to the deepest folder holding all inputs.",
        show_default=False,
        metavar="PATH",
    ),
]


@app.command()
@run_options
def classify(
    paths: PathsArg = None,
    out_csv: OutOpt = None,
    save_errors: ErrorsOpt = None,
    shard: ShardOpt = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    gpus_per_worker: GpusOpt = None,
    calibration: CalibrationOpt = None,
    *,
    settings: RunSettings,
) -> None:
    """Classify images zero-shot: the class whose prompt best predicts the added noise wins."""
    from diffcls.runtime.inputs import collect_inputs

    with user_errors():
        scale = ScaleOut.from_options(shard, ray, ray_address, ray_workers, gpus_per_worker)
        cal = _calibration(calibration)
        inputs = collect_inputs(paths or [], settings.list_file)
        run = prepare(settings, inputs, open_engines=not scale.ray)
        results, skipped, keys = _run_folder(inputs, run, settings, out_csv, save_errors, scale=scale, calibration=cal)
        if out_csv is None or len(results) <= 20:
            _print_predictions(results, cal.temperature if cal else None)
        if out_csv is not None:
            console.print(f"results in {out_csv}" + (f", errors in {save_errors}" if save_errors else ""))
        if not results:
            raise DiffclsError(f"no image of {_describe(paths, settings)} could be classified; see the skipped files above")


def _describe(paths, s: RunSettings) -> str:
    return ", ".join([*(paths or []), *([f"--list {s.list_file}"] if s.list_file else [])])


def _print_predictions(results: dict, temperature: float | None = None) -> None:
    """One row per image: the prediction and the runner-up of its ranking (runtime.ranking),
    with the mean errors that decided them and, calibrated, their probabilities."""
    from rich.markup import escape
    from rich.table import Table

    from diffcls.runtime.ranking import probabilities
    from diffcls.runtime.results import printable

    cols = ["image", "prediction", "mean error"] + (["probability"] if temperature is not None else []) + ["runner-up"]
    table = Table(*cols, caption="mean error: lower is better; " + _PRUNED_NOTE)
    for key in sorted(results):
        r = results[key]
        ranked = r.get("ranked") or []
        probs = probabilities(ranked, temperature) if temperature is not None and ranked else None
        cells = [escape(printable(key)), escape(r["prediction"]), f"{ranked[0].mean_error:.4g}" if ranked else ""]
        if temperature is not None:
            cells.append(f"{probs[0]:.3f}" if probs else "")
        cells.append(escape(_describe_class(ranked[1], probs[1] if probs else None)) if len(ranked) > 1 else "")
        table.add_row(*cells)
    out.print(table)


_PRUNED_NOTE = "a class pruned before the final decision shows its mean over its own fewer samples"


def _describe_class(c, probability: float | None) -> str:
    """'four (0.0712, p 0.103)', or 'four (0.0712 over 10 timesteps, pruned)'."""
    if c.pruned_after is not None:
        return f"{c.classname} ({c.mean_error:.4g} over {c.pruned_after} timesteps, pruned)"
    return f"{c.classname} ({c.mean_error:.4g}" + (f", p {probability:.3f})" if probability is not None else ")")


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


class LabelKind(str, Enum):
    name = "name"  # folder / label text is the class name
    index = "index"  # folder / label text is the class index (0, 1, ...: the prompts' classidx)


LabelsOpt = Annotated[LabelKind, typer.Option("--labels", help="What subfolder names (or a CSV's label column) are: class names, or class indices 0, 1, ... (the prompts' classidx).")]


@app.command()
@run_options
def evaluate(
    paths: Annotated[
        Optional[list[str]],
        typer.Argument(help="Labeled folders: one subfolder of images per class (or --list a CSV with path,label).", show_default=False, metavar="FOLDER"),
    ] = None,
    out_csv: OutOpt = None,
    save_errors: ErrorsOpt = None,
    labels: LabelsOpt = LabelKind.name,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the confusion matrix as a PNG (and the reliability diagram beside it, *-reliability.png; needs the plot extra).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the metrics and the run's settings as JSON.")] = None,
    ray: RayOpt = False,
    ray_address: RayAddressOpt = None,
    ray_workers: RayWorkersOpt = None,
    gpus_per_worker: GpusOpt = None,
    calibration: CalibrationOpt = None,
    *,
    settings: RunSettings,
) -> None:
    """Accuracy on labeled images: top-1/top-5, per-class precision/recall, a confusion matrix,
    and the calibration of the class probabilities (NLL, expected calibration error)."""
    with user_errors():
        scale = ScaleOut.from_options(None, ray, ray_address, ray_workers, gpus_per_worker)
        from diffcls.runtime.outputs import check_distinct, check_output, output_errors

        outputs = (("--out", out_csv), ("--save-errors", save_errors), ("--json", json_out), ("--plot", plot), ("--plot's reliability diagram", _reliability_path(plot)))
        check_output(json_out, "--json", "metrics")  # before the run, not after it finished
        check_output(plot, "--plot", "png")
        check_output(_reliability_path(plot), "--plot (its -reliability.png)", "png")
        check_distinct(*outputs)
        cal_file = _calibration(calibration)
        temperature = cal_file.temperature if cal_file else None
        run, results, truth, skipped, unlabeled = _labelled_run(paths, settings, labels, out_csv, save_errors, cal_file, scale, exclude=[p for _, p in outputs])
        pset = run.prompts
        from diffcls.runtime.metrics import confusion_metrics

        class_ids = list(pset.classes)
        by_name = {name: idx for idx, name in pset.classes.items()}
        m = confusion_metrics(
            [truth[k] for k in truth],
            [results[k]["classidx"] for k in truth],
            class_ids,
            top=[_top_ids(results[k], by_name) for k in truth],
        )
        m["evals_per_image"] = evals_per_image(results, truth)
        _print_metrics(m, pset.classes)
        cal = _calibration_metrics(results, truth, temperature)
        if cal is not None:
            out.print(
                f"probabilities ({'temperature %.4g from %s' % (temperature, calibration) if temperature is not None else 'uncalibrated, temperature 1; fit one with diffcls calibrate'}): "
                f"NLL {cal['nll']:.4f}, ECE {100 * cal['ece']:.2f}% (15 bins, {cal['n']} images)"
            )
        if json_out is not None:
            from diffcls.runtime.results import atomic_write_text

            report = {
                **m,
                "schedule": run.schedule.describe(),
                "classes": pset.classes,
                "n_skipped": len(skipped),
                "n_unlabeled": unlabeled,
                "settings": _run_record(settings, run, paths, labels.value),
            }
            if cal is not None:
                report["calibration"] = {k: v for k, v in cal.items() if k not in ("confidence", "correct")}
            with output_errors("--json", json_out):
                atomic_write_text(json_out, json.dumps(report, indent=2))
        if plot is not None:
            from diffcls.runtime.metrics import plot_confusion

            with output_errors("--plot", plot):
                plot_confusion(m["confusion"], [pset.classes[i] for i in class_ids], plot, title=f"top-1 {100 * m['top1']:.1f}%")
            console.print(f"confusion matrix plot in {plot}")
            if cal is not None and _reliability_path(plot) is not None:
                from diffcls.runtime.calibration import plot_reliability

                rel = _reliability_path(plot)
                label = f"T={temperature:.4g}" if temperature is not None else "uncalibrated (T=1)"
                with output_errors("--plot", rel):
                    plot_reliability(cal["confidence"], cal["correct"], rel, title=f"{label}: ECE {100 * cal['ece']:.2f}%, NLL {cal['nll']:.3f}")
                console.print(f"reliability diagram in {rel}")


def _reliability_path(plot: Path | None) -> Path | None:
    """The reliability diagram beside --plot (none beside a device or pipe such as /dev/stdout)."""
    from diffcls.runtime.outputs import target_kind

    if plot is None or target_kind(plot) == "stream":
        return None
    return plot.with_name(plot.stem + "-reliability.png")


def _labelled_run(paths, settings: RunSettings, labels: "LabelKind", out_csv, save_errors, calibration=None, scale=None, exclude=()):
    """Run (or resume) labelled images; returns (Run, results, {key: true classidx}, skipped, n
    unlabeled). `exclude`: files the run writes, never taken as inputs."""
    from diffcls.runtime.inputs import collect_inputs

    inputs = collect_inputs(paths or [], settings.list_file, exclude=exclude)
    raw = inputs.labels
    if not raw:
        raise DiffclsError(
            f"no labeled image in {_describe(paths, settings)}; give folders with one subfolder "
            "of images per class, or --list a CSV with path and label columns"
        )
    names = sorted(set(raw.values()))
    scale = scale or ScaleOut()
    run = prepare(settings, inputs, folder_classes=names if labels == LabelKind.name else None, open_engines=not scale.ray)
    pset = run.prompts
    what = "labels" if settings.list_file is not None else "subfolders"
    truth_of = _label_ids(names, labels, pset, _describe(paths, settings), what)
    truth_by_key = {k: truth_of[v] for k, v in raw.items()}
    unlabeled = len(inputs) - len(raw)
    if unlabeled:
        console.print(f"{unlabeled} image(s) have no label (not in a class subfolder); they are classified but not scored")
    results, skipped, keys = _run_folder(inputs, run, settings, out_csv, save_errors, labels=truth_by_key, scale=scale, calibration=calibration)
    truth = {k: t for k, t in truth_by_key.items() if k in results}
    if not truth:
        raise DiffclsError(f"no labeled image of {_describe(paths, settings)} was classified")
    return run, results, truth, skipped, unlabeled


def _decisions(results: dict, truth: dict) -> tuple[list[list[float]], list[int | None], list[str]]:
    """Per labelled image whose ranking is known: the listed final-decision classes' mean errors
    (the prediction's first), the true class's position among them (None: pruned or not
    listed, probability 0) and the key."""
    lists, pos, keys = [], [], []
    for key, label in truth.items():
        ranked = results[key].get("ranked")
        if not ranked:
            continue
        final = [c for c in ranked if c.in_final]
        ids = [c.classidx for c in final]
        lists.append([c.mean_error for c in final])
        pos.append(ids.index(label) if label in ids else None)
        keys.append(key)
    return lists, pos, keys


def _calibration_metrics(results: dict, truth: dict, temperature: float | None) -> dict | None:
    """NLL of the true class and ECE of the predicted class's probability (runtime.ranking:
    the prediction's is the highest)."""
    from diffcls.runtime.calibration import UNCALIBRATED, expected_calibration_error, nll, softmax_neg

    t = UNCALIBRATED if temperature is None else temperature
    lists, pos, keys = _decisions(results, truth)
    if not lists:
        return None
    conf = [softmax_neg(m, t)[0] for m in lists]
    correct = [results[k]["classidx"] == truth[k] for k in keys]
    return {
        "temperature": t,
        "n": len(lists),
        "nll": nll(lists, pos, t),
        "ece": expected_calibration_error(conf, correct),
        "confidence": conf,
        "correct": correct,
    }


@app.command()
@run_options
def calibrate(
    paths: Annotated[
        Optional[list[str]],
        typer.Argument(help="Labeled folders to fit the temperature on (one subfolder per class, or --list a CSV with path,label); not the images you will evaluate on.", show_default=False, metavar="FOLDER"),
    ] = None,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the temperature (JSON), for classify/evaluate --calibration.")] = Path("calibration.json"),
    results_csv: Annotated[Optional[Path], typer.Option("--results", help="Results CSV of this run (resumable; an evaluate --out CSV with the same settings is reused).")] = None,
    labels: LabelsOpt = LabelKind.name,
    *,
    settings: RunSettings,
) -> None:
    """Fit the temperature of the class probabilities on labeled images (minimum NLL)."""
    with user_errors():
        from diffcls.runtime.calibration import UNCALIBRATED, Calibration, expected_calibration_error, fit_temperature, nll, softmax_neg
        from diffcls.runtime.outputs import check_distinct, check_output, output_errors

        check_output(out_path, "--out", "calibration")  # before the run, not after it finished
        check_distinct(("--results", results_csv), ("--out", out_path))
        run, results, truth, _, _ = _labelled_run(paths, settings, labels, results_csv, None)
        before = _calibration_metrics(results, truth, None)
        if before is None:
            raise DiffclsError(f"no image of {_describe(paths, settings)} has a ranking to fit on; pass another --results to recompute")
        lists, pos, keys = _decisions(results, truth)
        t = fit_temperature(lists, pos)
        conf = [softmax_neg(m, t)[0] for m in lists]
        correct = [results[k]["classidx"] == truth[k] for k in keys]
        cal = Calibration(
            temperature=t,
            n_images=len(lists),
            nll_before=nll(lists, pos, UNCALIBRATED),
            nll_after=nll(lists, pos, t),
            ece_before=before["ece"],
            ece_after=expected_calibration_error(conf, correct),
            schedule=run.schedule.describe(),
            model=run.classifier.engines.fingerprint,
            prompts=run.prompts.digest(),
        )
        with output_errors("--out", out_path):
            cal.save(out_path)
        out.print(
            f"temperature {t:.4g} fitted on {cal.n_images} images: NLL {cal.nll_before:.4f} -> {cal.nll_after:.4f}, "
            f"ECE {100 * cal.ece_before:.2f}% -> {100 * cal.ece_after:.2f}% (on the fitting images); written to {out_path}"
        )


def _label_ids(names: list[str], kind: LabelKind, pset, where: str, what: str = "subfolders") -> dict[str, int]:
    """Raw label text (folder name / CSV label) -> classidx; a one-line error for unknown ones."""
    if kind == LabelKind.index:
        ids = {}
        bad = []
        for name in names:
            try:
                ids[name] = int(name)
            except ValueError:
                bad.append(name)
            else:
                if ids[name] not in pset.classes:
                    bad.append(name)
        if bad:
            raise DiffclsError(
                f"{what} {', '.join(bad[:5])} of {where} are not class indices of the prompts "
                f"({min(pset.classes)}..{max(pset.classes)}); fix them, or use --labels name"
            )
        return ids
    by_name = {_norm(name): idx for idx, name in pset.classes.items()}
    unknown = [n for n in names if _norm(n) not in by_name]
    if unknown:
        hint = "; the labels are numbers: pass --labels index" if all(u.isdigit() for u in unknown) else "; rename them or fix the prompts"
        raise DiffclsError(
            f"{what} {', '.join(unknown[:5])} of {where} match no class name "
            f"({', '.join(list(pset.classes.values())[:10])}){hint}"
        )
    return {n: by_name[_norm(n)] for n in names}


def _top_ids(r: dict, by_name: dict[str, int]) -> list[int]:
    """The class ids of a result's top-5, best first."""
    return [c.classidx for c in r.get("ranked") or []]



def _run_record(s: RunSettings, run: Run, paths, labels: str) -> dict:
    """What --json records about the run: the inputs, every shared option, and what ran."""
    from dataclasses import asdict

    import torch

    def plain(v):
        if isinstance(v, Enum):
            return v.value
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple):
            return list(v)
        return v

    e = run.classifier.engines
    return {
        "inputs": list(paths or []),
        "labels": labels,
        **{k: plain(v) for k, v in asdict(s).items()},
        "resolved": {
            "backend": e.backend,
            "device": str(e.device),
            "precision": e.precision,
            "image_size": e.image_size,
            "model_fingerprint": e.fingerprint,
            "schedule": run.schedule.describe(),
            "n_prompts": len(run.prompts),
            "threads": torch.get_num_threads(),
        },
    }


def _print_metrics(m: dict, classes: dict[int, str]) -> None:
    from rich.table import Table

    names = [classes[i] for i in m["class_ids"]]
    out.print(f"top-1 accuracy: {100 * m['top1']:.2f}% ({m['correct']}/{m['n']})")
    if "top5" in m:
        out.print(f"top-5 accuracy: {100 * m['top5']:.2f}% ({m['correct_top5']}/{m['n']})")
    out.print(f"mean per-class accuracy: {100 * m['mean_per_class']:.2f}%")
    if m.get("evals_per_image") is not None:
        out.print(f"UNet evaluations per image: {m['evals_per_image']:.1f}")
    if len(names) > 30:
        out.print(f"per-class precision/recall and confusion matrix: {len(names)} classes, too many to print; see --json / --plot")
        return

    def pct(x):
        return "-" if x is None else f"{100 * x:.0f}%"

    per = Table(title="per class (precision: of the images predicted as the class, recall: of its images)")
    for col in ("class", "precision", "recall", "f1", "images"):
        per.add_column(col, justify="left" if col == "class" else "right", no_wrap=True)
    for i, name, p, r, f, n in zip(m["class_ids"], names, m["precision"], m["recall"], m["f1"], m["support"]):
        per.add_row(f"{i} {name}", pct(p), pct(r), pct(f), str(n))
    out.print(per)
    # columns are headed by class id so the counts stay readable in an 80-column terminal
    table = Table(title="confusion (rows: true, columns: predicted class id)")
    table.add_column("true class", no_wrap=True)
    for i in m["class_ids"]:
        table.add_column(str(i), justify="right", no_wrap=True)
    table.add_column("acc", justify="right", no_wrap=True, min_width=4)
    for i, name, row, acc in zip(m["class_ids"], names, m["confusion"], m["per_class"]):
        table.add_row(f"{i} {name}", *map(str, row), "-" if acc is None else f"{100 * acc:.0f}%")
    out.print(table)
