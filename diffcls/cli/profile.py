"""`diffcls profile`: where the time goes, per stage, on a folder of images: the same pipeline
and options as `classify`, measured by `diffcls.runtime.execution.profiling` (what it reports is
described there); `--warmup` classifies one image first, outside the measurement."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.classify import PathsArg
from diffcls.cli.settings import RunSettings, run_options
from diffcls.cli.common import LineProgress, app, console, interactive, out, user_errors
from diffcls.errors import DiffclsError


@app.command()
@run_options
def profile(
    paths: PathsArg = None,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="Classify one image first, not counted (reports compile/first-call cost separately).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full profile as JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a per-stage bar chart (PNG; needs matplotlib).")] = None,
    *,
    settings: RunSettings,
) -> None:
    """Per-stage latency of classification: load, preprocess, text/VAE encode, UNet rounds."""
    from diffcls.runtime.execution.profiling import plot_stages, report_view, require_matplotlib
    from diffcls.runtime.results.outputs import check_outputs, output_errors, write_json

    with user_errors():
        if plot is not None:
            require_matplotlib()  # fail before any work

        check_outputs(("--json", json_out, "profile"), ("--plot", plot, "png"))  # before the run, not after it finished
        from diffcls.runtime.execution.job import ClassifyJob

        job = ClassifyJob(settings, paths or []).open()  # prompts, schedule, noise, the opened classifier
        report = _profile(job, warmup)
        out.print(report_view(report))
        if json_out is not None:
            write_json(json_out, report)
            console.print(f"profile in {json_out}")
        if plot is not None:
            with output_errors("--plot", plot):
                plot_stages(report, plot)
            console.print(f"stage plot in {plot}")
        if not report["n_images"]:
            raise DiffclsError(f"no image of {', '.join(paths or [str(settings.list_file)])} could be classified; see the skipped files above")


def _profile(job, warmup: bool) -> dict:
    """profile_job with a spinner on a terminal; in a log or pipe, a line every few seconds."""
    from diffcls.runtime.execution.profiling import profile_job

    n = len(job.inputs.images)
    lines = None if interactive(console) else LineProgress(console)
    task = lines.add_task("profile", total=n) if lines is not None else None
    with console.status(f"profiling {n} images ...") if lines is None else contextlib.nullcontext():
        return profile_job(job, warmup=warmup, on_skip=lambda path, msg: console.print(f"[yellow]skipped[/] {msg}"),
                           on_image=(lambda: lines.advance(task)) if lines is not None else None)
