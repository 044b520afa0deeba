"""`diffcls classify`, `evaluate` and `calibrate`: options -> a `ClassifyJob`, and printing.

The run itself (inputs, shard, resume, labels, executors, the results file) is
`diffcls.runtime.execution.job.ClassifyJob`; the metrics are `diffcls.runtime.evaluation.evaluate`'s.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, out, progress_bar, rate, user_errors
from diffcls.cli.settings import RunSettings, run_options
from diffcls.errors import DiffclsError
from diffcls.runtime.evaluation.evaluate import LabelKind

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


_SCALE = "Many GPUs"
PathsArg = Annotated[Optional[list[str]], typer.Argument(help="Images, folders (searched recursively) or globs such as 'photos/*.jpg'. Result keys are paths relative to the folder given, or to the deepest folder holding all inputs.", show_default=False, metavar="PATH")]
LabeledArg = Annotated[Optional[list[str]], typer.Argument(help="Labeled folders: one subfolder of images per class (or --list a CSV with path,label).", show_default=False, metavar="FOLDER")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Results CSV (path, prediction, the top 5 classes with their mean errors); rerunning resumes it.")]
ErrorsOpt = Annotated[Optional[Path], typer.Option("--save-errors", help="JSONL file with every (prompt, t, trial, error) per image.")]
CalibrationOpt = Annotated[Optional[Path], typer.Option("--calibration", help="Temperature file from `diffcls calibrate` for this model, prompts and schedule: adds class probabilities (CSV topN_probability columns).")]
LabelsOpt = Annotated[LabelKind, typer.Option("--labels", help="What subfolder names (or a CSV's label column) are: class names, or class indices 0, 1, ... (the prompts' classidx).")]
ShardOpt = Annotated[Optional[str], typer.Option("--shard", help="Classify only shard I of N (e.g. 0/4): a fixed share of the images, by a hash of each path; join the shards' --out files with `diffcls merge`.", rich_help_panel=_SCALE)]
RayOpt = Annotated[bool, typer.Option("--ray", help="Run on Ray workers (needs the ray extra: pip install -e \".\\[ray]\" in the diffcls folder): an existing cluster with --ray-address, else a local one.", rich_help_panel=_SCALE)]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster address, e.g. auto or ray://head:10001 (default: a local cluster).", rich_help_panel=_SCALE)]
RayWorkersOpt = Annotated[Optional[int], typer.Option("--ray-workers", help="Ray workers, each opening the engines once (default: one per GPU, else 1).", rich_help_panel=_SCALE, min=1)]
GpusOpt = Annotated[Optional[float], typer.Option("--gpus-per-worker", help="GPUs per Ray worker, may be a fraction (default: 1 when the cluster has GPUs, else 0).", rich_help_panel=_SCALE, min=0)]


def _duration(seconds: float) -> str:
    """'45 s', '12 min', '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _run(job) -> dict:
    """Open the job, run it with a progress bar, print what it says; returns its outcomes."""
    import time

    from rich.markup import escape

    from diffcls.runtime.results.writer import printable

    job.open()
    for path, msg in job.skipped:  # folders that could not be listed or entered
        console.print(f"[yellow]skipped[/] {escape(printable(msg))}")
    for note in job.notes:
        console.print(escape(note))
    start = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("classify", total=len(job.todo), rate="-")

        def on_skip(path, msg):
            console.print(f"[yellow]skipped[/] {escape(printable(msg))}")
            progress.advance(task)

        estimated = False
        for n, _ in enumerate(job.iter_run(on_skip=on_skip), 1):
            elapsed = time.perf_counter() - start
            progress.update(task, advance=1, rate=rate(n, elapsed, "img"))
            left = len(job.todo) - n
            if not estimated and left > 0 and (elapsed >= 10 or n >= max(3, len(job.todo) // 20)):
                estimated = True  # once, early: what the whole run will take at this pace
                console.print(f"estimate: about {_duration(left * elapsed / n)} more for {left} images at {rate(n, elapsed, 'img')}")
    for line in job.summary():
        console.print(escape(line))
    return job.results


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
    json_stdout: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout (one image: an object; several: a list), each with its --top-k classes; nothing else goes to stdout.", show_default=False)] = False,
    top_k: Annotated[int, typer.Option("--top-k", min=1, max=5, help="Classes shown per image: one image's table and --json.")] = 5,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, speed lines or per-image table: only the summary (and --json).", show_default=False)] = False,
    *,
    settings: RunSettings,
) -> None:
    """Classify images zero-shot: the class whose prompt best predicts the added noise wins."""
    from diffcls.runtime.execution.job import ClassifyJob, RayOptions

    with user_errors():
        rayopts = RayOptions.from_flags(ray, ray_address, ray_workers, gpus_per_worker)
        with ClassifyJob(settings, paths or [], out=out_csv, save_errors=save_errors, shard=shard, calibration=calibration, ray=rayopts) as job, _quiet(quiet):
            results = _run(job)
        if not results:
            raise DiffclsError(f"no image of {job.describe_inputs()} could be classified; see the skipped files above")
        temperature = job.temperature
        if json_stdout:
            recs = [results[k].to_json(k, temperature, top_k) for k in sorted(results)]
            print(json.dumps(recs[0] if len(job.inputs) == 1 else recs, indent=2))
        elif len(job.inputs) == 1:
            _print_top(next(iter(results.items())), temperature, top_k)
        elif not quiet and (out_csv is None or len(results) <= 20):
            _print_predictions(results, temperature)
        console.print(job.predictions_line() + (f"; results in {out_csv}" if out_csv is not None else "")
                      + (f", errors in {save_errors}" if save_errors else ""))


@contextlib.contextmanager
def _quiet(on: bool):
    """--quiet: the stderr console (progress, speed lines, notices) says nothing meanwhile."""
    old = console.quiet
    console.quiet = on or old
    try:
        yield
    finally:
        console.quiet = old


def _print_top(item, temperature: float | None, k: int) -> None:
    """One image: its best k classes in ranking order, with mean errors (and probabilities)."""
    from rich.markup import escape
    from rich.table import Table

    from diffcls.runtime.algorithm.ranking import probabilities
    from diffcls.runtime.results.writer import printable

    key, r = item
    ranked = r.ranked or []
    probs = probabilities(ranked, temperature) if temperature is not None else None
    cols = ["#", "class", "mean error"] + (["probability"] if probs is not None else []) + ["decided"]
    table = Table(*cols, title=escape(printable(key)), caption="mean error: lower is better" + ("" if probs is not None else "; --calibration FILE adds probabilities"))
    for i, c in enumerate(ranked[:k]):
        cells = [str(i + 1), escape(c.classname), f"{c.mean_error:.5g}"] + ([f"{probs[i]:.3f}"] if probs is not None else [])
        cells.append("final decision" if c.in_final else f"pruned after {c.pruned_after} timesteps")
        table.add_row(*cells)
    out.print(table)


def _print_predictions(results: dict, temperature: float | None = None) -> None:
    """One row per image: the prediction and the runner-up of its ranking (runtime.algorithm.ranking),
    with the mean errors that decided them and, calibrated, their probabilities."""
    from rich.markup import escape
    from rich.table import Table

    from diffcls.runtime.algorithm.ranking import probabilities
    from diffcls.runtime.results.writer import printable

    cols = ["image", "prediction", "mean error"] + (["probability"] if temperature is not None else []) + ["runner-up"]
    table = Table(*cols, caption="mean error: lower is better; " + _PRUNED_NOTE)
    for key in sorted(results):
        r = results[key]
        ranked = r.ranked or []
        probs = probabilities(ranked, temperature) if temperature is not None and ranked else None
        cells = [escape(printable(key)), escape(r.prediction), f"{ranked[0].mean_error:.4g}" if ranked else ""]
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


@app.command()
@run_options
def evaluate(
    paths: LabeledArg = None,
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
    compare: Annotated[Optional[Path], typer.Option("--compare", help="Another results CSV of the same images, e.g. the full-budget answer (--n-samples G --to-keep 1, G = the adaptive grid): report how many answers differ from it, with a 95% interval (docs/adaptive.md).")] = None,
    *,
    settings: RunSettings,
) -> None:
    """Accuracy on labeled images: top-1/top-5, per-class precision/recall, a confusion matrix,
    and the calibration of the class probabilities (NLL, expected calibration error)."""
    from diffcls.runtime.evaluation.evaluate import evaluation, evaluation_report, reliability_path, write_plots
    from diffcls.runtime.execution.job import ClassifyJob, RayOptions
    from diffcls.runtime.results.outputs import check_distinct, check_output, output_errors
    from diffcls.runtime.results.writer import atomic_write_text

    with user_errors():
        rayopts = RayOptions.from_flags(ray, ray_address, ray_workers, gpus_per_worker)
        rel = reliability_path(plot)
        outputs = (("--out", out_csv), ("--save-errors", save_errors), ("--json", json_out), ("--plot", plot), ("--plot's reliability diagram", rel))
        check_output(json_out, "--json", "metrics")  # before the run, not after it finished
        check_output(plot, "--plot", "png")
        check_output(rel, "--plot (its -reliability.png)", "png")
        check_distinct(*outputs)
        with ClassifyJob(settings, paths or [], out=out_csv, save_errors=save_errors, labels=labels, calibration=calibration,
                         ray=rayopts, exclude=[p for _, p in outputs]) as job:
            _run(job)
        m, cal = evaluation(job)
        t = job.temperature
        _print_metrics(m, job.prompts.classes)
        _print_disagreement(m, job, compare)
        if cal is not None:
            how = f"temperature {t:.4g} from {calibration}" if t is not None else "uncalibrated, temperature 1; fit one with diffcls calibrate"
            out.print(f"probabilities ({how}): NLL {cal['nll']:.4f}, ECE {100 * cal['ece']:.2f}% (15 bins, {cal['n']} images)")
        if json_out is not None:
            with output_errors("--json", json_out):
                atomic_write_text(json_out, json.dumps(evaluation_report(job, m, cal), indent=2))
        if plot is not None:
            model = settings.engines or settings.model or "demo"  # as the user named it
            written = write_plots(plot, m, cal, job.prompts.classes, t, f"{model} on {job.describe_inputs()}")
            for what, path in zip(("confusion matrix plot", "reliability diagram"), written):
                console.print(f"{what} in {path}")


@app.command()
@run_options
def calibrate(
    paths: Annotated[Optional[list[str]], typer.Argument(help="Labeled folders to fit the temperature on (one subfolder per class, or --list a CSV with path,label); not the images you will evaluate on.", show_default=False, metavar="FOLDER")] = None,
    out_path: Annotated[Path, typer.Option("--out", help="Where to write the temperature (JSON), for classify/evaluate --calibration.")] = Path("calibration.json"),
    results_csv: Annotated[Optional[Path], typer.Option("--results", help="Results CSV of this run (resumable; an evaluate --out CSV with the same settings is reused).")] = None,
    labels: LabelsOpt = LabelKind.name,
    timestep_weights: Annotated[Optional[int], typer.Option("--timestep-weights", help="Instead of a temperature, fit timestep weights in this many equal bands of t (mean over variance of the paired difference to the true class; bands that point away dropped) from a full grid, e.g. --n-samples 100 --to-keep 1; classify/evaluate --calibration then weight every schedule's timesteps with them (docs/adaptive.md).", min=1)] = None,
    *,
    settings: RunSettings,
) -> None:
    """Fit the temperature of the class probabilities on labeled images (minimum NLL), or timestep weights."""
    import tempfile

    from diffcls.runtime.evaluation.evaluate import fit_calibration, fit_weights_calibration
    from diffcls.runtime.execution.job import ClassifyJob
    from diffcls.runtime.results.outputs import check_distinct, check_output, output_errors

    with user_errors(), tempfile.TemporaryDirectory() as tmp:
        check_output(out_path, "--out", "calibration")  # before the run, not after it finished
        check_distinct(("--results", results_csv), ("--out", out_path))
        errors = None
        if timestep_weights is not None:  # the fit needs every error: beside the results CSV
            results_csv = results_csv or Path(tmp) / "calibrate.csv"
            errors = results_csv.with_name(results_csv.name + ".errors.jsonl")
        with ClassifyJob(settings, paths or [], out=results_csv, save_errors=errors, labels=labels) as job:
            _run(job)
        if timestep_weights is not None:
            cal = fit_weights_calibration(job, errors, timestep_weights)
            with output_errors("--out", out_path):
                cal.save(out_path)
            out.print(f"timestep weights by band of {1000 // timestep_weights} t, fitted on {cal.n_images} images: "
                      f"{' '.join(f'{w:.2g}' for w in cal.timestep_weights)}; written to {out_path}")
            return
        cal = fit_calibration(job)
        with output_errors("--out", out_path):
            cal.save(out_path)
        out.print(
            f"temperature {cal.temperature:.4g} fitted on {cal.n_images} images: NLL {cal.nll_before:.4f} -> {cal.nll_after:.4f}, "
            f"ECE {100 * cal.ece_before:.2f}% -> {100 * cal.ece_after:.2f}% (on the fitting images); written to {out_path}"
        )


def _print_disagreement(m: dict, job, compare: Path | None) -> None:
    """--adaptive: the knob's measured meaning; --compare: answers that differ from another run's."""
    from diffcls.runtime.algorithm.schedule import AdaptiveSchedule
    from diffcls.runtime.evaluation.evaluate import disagreement

    sched = job.schedule
    if isinstance(sched, AdaptiveSchedule) and sched.alpha is None:
        out.print(f"--error-rate {sched.error_rate:g}: the test runs at alpha {sched.resolved_alpha:g}; measured on digits train replays, "
                  f"P(answer differs from the full-budget answer) <= {sched.error_rate:g} at the default settings (docs/adaptive.md)")
    if compare is not None:
        d = disagreement(job, compare)
        m["disagreement"] = d
        out.print(f"answers that differ from {compare}: {d['differ']} of {d['n']} ({100 * d['rate']:.2f}%, 95% {100 * d['ci95'][0]:.2f}-{100 * d['ci95'][1]:.2f}%)")


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
