"""`diffcls match`: Winoground-style image-text matching (text, image and group scores)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, out, run_job, user_errors
from diffcls.cli.settings import RunSettings, run_options
from diffcls.errors import DiffclsError
from diffcls.runtime.execution.match_job import MatchJob

_MATCH = "Matching"
_ADAPTIVE = "Adaptive evaluation"


@app.command()
@run_options(exclude=MatchJob.UNUSED)  # match declares its adaptive options with its own defaults
def match(
    items_file: Annotated[Path, typer.Argument(help="CSV or JSONL with image_0,image_1,caption_0,caption_1[,tag] (paths relative to it), or a local Winoground-format Hugging Face data set (save_to_disk folder or parquet; needs the datasets extra).", metavar="ITEMS", show_default=False)],
    out_csv: Annotated[Optional[Path], typer.Option("--out", help="Results CSV, one row per item (errors, decisions, scores); rerunning resumes it.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every number (overall, by_tag, agreement, settings) as JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="PNG chart of the scores per tag with 95% intervals (needs the plot extra).")] = None,
    t_interval: Annotated[int, typer.Option("--t-interval", help="Timestep spacing: t = interval/2, interval/2 + interval, ... < T (the reference's grid; 5: 200 timesteps).", rich_help_panel=_MATCH, min=1)] = 5,
    save_errors: Annotated[Optional[Path], typer.Option("--save-errors", help="JSONL file with every (arm, t, trial, error) per item (needs --out).")] = None,
    compare: Annotated[Optional[Path], typer.Option("--compare", help="A results CSV of another match run of the same items (e.g. the full grid): report how often each comparison's decision agrees.", rich_help_panel=_MATCH)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N items.", rich_help_panel=_MATCH, min=1)] = None,
    adaptive: Annotated[bool, typer.Option("--adaptive", help="Stop each comparison once a paired sequential test (the rule of classify --adaptive) settles it, instead of the whole grid.", rich_help_panel=_ADAPTIVE)] = False,
    error_rate: Annotated[Optional[float], typer.Option("--error-rate", help="--adaptive: the sequential test's constant alpha (default 0.5, chosen on train-split replays; smaller stops later). What it buys is measured, not bounded: --compare a full-grid run.", rich_help_panel=_ADAPTIVE)] = None,
    min_samples: Annotated[Optional[int], typer.Option("--min-samples", help="--adaptive: timesteps every comparison gets before it may stop, n0 (default 6).", rich_help_panel=_ADAPTIVE)] = None,
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="--adaptive: timesteps per comparison at most (default: the whole grid, where an unsettled comparison is the full grid's decision).", rich_help_panel=_ADAPTIVE)] = None,
    *,
    settings: RunSettings,
) -> None:
    """Score image-text matching items the Winoground way: all four (caption, image) pairs of an
    item on the same timesteps and noise; text, image (raw and normalised by the empty prompt)
    and group scores, overall and per tag, with 95% Wilson intervals."""
    with user_errors():
        from diffcls.runtime.evaluation import match as M
        from diffcls.runtime.results.outputs import check_outputs, output_errors, write_json

        check_outputs(("ITEMS", items_file, None), ("--out", out_csv, None), ("--json", json_out, "match"), ("--plot", plot, "png"),
                      ("--compare", compare, None))  # before the run, not after it finished
        given = {k: v for k, v in (("error_rate", error_rate), ("min_samples", min_samples), ("max_samples", max_samples)) if v is not None}
        job = MatchJob(settings, items_file, t_interval=t_interval, adaptive=given if adaptive else None, limit=limit, out=out_csv, save_errors=save_errors)
        reference = M.read_results(compare) if compare is not None else None
        if given and not adaptive:
            raise DiffclsError(f"--{next(iter(given)).replace('_', '-')} applies to --adaptive only; add --adaptive or drop it")
        done = run_job(job, "match", "items", ("items", "item"), estimate=False, skipped=lambda item, msg: f"item {item.key}: {msg}").done()
        if not done:
            raise DiffclsError(f"no item of {items_file} could be scored; {len(job.skipped)} skipped")
        summary = M.summarize(done)
        out.print(M.summary_view(summary, job.schedule))
        agree = M.agreement(done, reference) if reference is not None else None
        if agree is not None:
            out.print(M.agreement_line(agree, compare), markup=False)
        if json_out is not None:
            write_json(json_out, job.report(summary, agree, adaptive=adaptive, **given))
        if plot is not None:
            with output_errors("--plot", plot):
                M.plot_scores(summary, plot, title=f"{items_file.name}: {job.schedule.describe()}")
            console.print(f"score chart in {plot}")

