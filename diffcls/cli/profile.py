"""`diffcls profile`: where the time goes, per stage, on a folder of images.

Runs the same pipeline as `classify` (same options) over the first `--limit` images and reports,
per stage (model/engine load, preprocess, text encode, VAE encode, UNet scoring per round, total),
the number of calls, total seconds and p50/p90 per call, plus UNet evals/s, images/s, the padding
fraction of UNet batches, UNet evaluations per image (mean, p50, p90, max: they vary per image
with --adaptive), cache hits/misses and the peak GPU memory. `--warmup` classifies one
image first, outside the measurement (with the cache off, so that it warms every stage), so
compile and first-call costs are reported on their own line.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.classify import PathsArg
from diffcls.cli.settings import RunSettings, run_options
from diffcls.cli.common import LineProgress, app, console, interactive, out, per_second, user_errors
from diffcls.errors import DiffclsError
from diffcls.runtime.execution.profiling import ordered_stages, stage_label

def _cached_note(name: str, stage: dict, cache: dict | None) -> str:
    """' (cached)' for a text/VAE stage that never ran because the cache held it all."""
    if name in ("text_encode", "vae_encode") and stage["calls"] == 0 and cache and cache.get("hits"):
        return " (cached)"
    return ""


def _print_report(report: dict) -> None:
    from rich.table import Table

    stages = report["stages"]
    wall = report["total_s"]
    table = Table(title=f"diffcls profile ({report['n_images']} images)")
    table.add_column("stage", no_wrap=True)
    for col, just in (("calls", "right"), ("total s", "right"), ("p50 ms/call", "right"), ("p90 ms/call", "right"), ("% of run", "right")):
        table.add_column(col, justify=just)
    for name in ordered_stages(stages):
        st = stages[name]
        share = "-" if name == "load" or not wall else f"{100 * st['total_s'] / wall:.1f}"
        table.add_row(stage_label(name) + _cached_note(name, st, report["cache"]), str(st["calls"]), f"{st['total_s']:.3f}", f"{st['p50_ms']:.2f}", f"{st['p90_ms']:.2f}", share)
    if report.get("warmup"):
        w = report["warmup"]["total_s"]
        table.add_row("warm-up (not counted)", "1", f"{w:.3f}", f"{1000 * w:.2f}", f"{1000 * w:.2f}", "-")
    out.print(table)
    out.print("preprocess: reading, decoding and resizing images on --workers threads, overlapped with the UNet; cached: the cache held every result, so the stage did not run; p50/p90 are per call")
    cache = report["cache"]
    cache_txt = "off" if cache is None else f"{cache['hits']} hits, {cache['misses']} misses" + (f", {cache['rejected']} rejected" if cache["rejected"] else "")
    mem = report["peak_gpu_memory_bytes"]
    ev = report.get("evals_per_image")
    if ev:
        out.print(f"UNet evaluations per image: mean {ev['mean']:.1f}, p50 {ev['p50']:.0f}, p90 {ev['p90']:.0f}, max {ev['max']}")
    out.print(
        f"{per_second(report['images_per_s'], 'images', 'image', 3)}, "
        f"{per_second(report['unet_evals_per_s'], 'UNet evals', 'UNet eval', 1)} "
        f"({report['unet_evals']} evals in {report['unet_calls']} calls), padding "
        f"{100 * report['padding_fraction']:.2f}%, cache {cache_txt}, peak GPU memory "
        + ("n/a (no GPU)" if mem is None else f"{mem / 2**20:.0f} MiB")
    )


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
    from diffcls.runtime.execution.profiling import plot_stages, require_matplotlib
    from diffcls.runtime.results.outputs import check_distinct, check_output, output_errors

    with user_errors():
        if plot is not None:
            require_matplotlib()  # fail before any work

        check_output(json_out, "--json", "profile")  # before the run, not after it finished
        check_output(plot, "--plot", "png")
        check_distinct(("--json", json_out), ("--plot", plot))

        from diffcls.runtime.execution.job import ClassifyJob

        job = ClassifyJob(settings, paths or []).open()  # prompts, schedule, noise, the opened classifier
        report = _profile(job, warmup)
        _print_report(report)
        if json_out is not None:
            from diffcls.runtime.results.writer import atomic_write_text

            with output_errors("--json", json_out):
                atomic_write_text(json_out, json.dumps(report, indent=2))
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
