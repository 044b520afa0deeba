"""`diffcls classify`, `evaluate` and `calibrate`: options -> a `ClassifyJob`, and printing.

The run itself (inputs, shard, resume, labels, executors, the results file) is
`diffcls.runtime.execution.job.ClassifyJob`; the metrics are `diffcls.runtime.evaluation.evaluate`'s.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, out, quieted, run_job, user_errors
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
        with ClassifyJob(settings, paths or [], out=out_csv, save_errors=save_errors, shard=shard, calibration=calibration, ray=rayopts) as job, quieted(quiet):
            results = run_job(job, "classify").results
        if not results:
            raise DiffclsError(f"no image of {job.describe_inputs()} could be classified; see the skipped files above")
        if json_stdout:
            print(json.dumps(job.to_json(top_k), indent=2))
        elif len(job.inputs) == 1 or not quiet and (out_csv is None or len(results) <= 20):
            out.print(job.table(top_k))  # one image: its best --top-k classes; more: each one's prediction and runner-up
        console.print(job.predictions_line() + (f"; results in {out_csv}" if out_csv is not None else "")
                      + (f", errors in {save_errors}" if save_errors else ""))


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
    from diffcls.runtime.evaluation import evaluate as E
    from diffcls.runtime.execution.job import ClassifyJob, RayOptions
    from diffcls.runtime.results.outputs import write_json

    with user_errors():
        rayopts = RayOptions.from_flags(ray, ray_address, ray_workers, gpus_per_worker)
        outputs = E.check_outputs(out_csv, save_errors, json_out, plot)  # before the run, not after it finished
        with ClassifyJob(settings, paths or [], out=out_csv, save_errors=save_errors, labels=labels, calibration=calibration,
                         ray=rayopts, exclude=outputs) as job:
            run_job(job, "classify")
        m, cal = E.evaluation(job)
        t = job.temperature
        out.print(E.metrics_view(m, job.prompts.classes))
        if note := E.schedule_note(job.schedule):
            out.print(note, markup=False)
        if compare is not None:
            m["disagreement"] = E.disagreement(job, compare)
            out.print(E.disagreement_line(m["disagreement"]), markup=False)
        if cal is not None:
            out.print(E.calibration_line(cal, t, calibration), markup=False)
        if json_out is not None:
            write_json(json_out, E.evaluation_report(job, m, cal))
        if plot is not None:
            model = settings.engines or settings.model or "demo"  # as the user named it
            written = E.write_plots(plot, m, cal, job.prompts.classes, t, f"{model} on {job.describe_inputs()}")
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
    from diffcls.runtime.results.outputs import check_outputs, output_errors

    with user_errors(), tempfile.TemporaryDirectory() as tmp:
        check_outputs(("--results", results_csv, None), ("--out", out_path, "calibration"))  # before the run, not after it finished
        errors = None
        if timestep_weights is not None:  # the fit needs every error: beside the results CSV
            results_csv = results_csv or Path(tmp) / "calibrate.csv"
            errors = results_csv.with_name(results_csv.name + ".errors.jsonl")
        with ClassifyJob(settings, paths or [], out=results_csv, save_errors=errors, labels=labels) as job:
            run_job(job, "classify")
        cal = fit_calibration(job) if timestep_weights is None else fit_weights_calibration(job, errors, timestep_weights)
        with output_errors("--out", out_path):
            cal.save(out_path)
        out.print(f"{cal.describe()}; written to {out_path}", markup=False)
