"""`diffcls match`: Winoground-style image-text matching (text, image and group scores)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, out, progress_bar, rate, user_errors
from diffcls.cli.settings import RunSettings, run_options
from diffcls.errors import DiffclsError

# the shared options that do not apply (class prompts, image lists, the fixed rounds) and the
# adaptive ones, which match declares with its own defaults (one two-sided test per comparison,
# up to the whole grid, no final stage)
EXCLUDED = ("prompts", "classes", "template", "list_file", "limit", "sample", "n_samples", "to_keep", "adaptive", "error_rate", "min_samples",
            "max_samples", "rule", "rel_delta", "final_samples", "final_keep", "final_error_rate", "alpha", "look_every")
_MATCH = "Matching"
_ADAPTIVE = "Adaptive evaluation"


@app.command()
@run_options(exclude=EXCLUDED)
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
        from diffcls.runtime.evaluation.match import read_results, summarize
        from diffcls.runtime.execution.match_job import MatchJob
        from diffcls.runtime.results.outputs import check_distinct, check_output, output_errors

        check_output(json_out, "--json", "match")  # before the run, not after it finished
        check_output(plot, "--plot", "png")
        check_distinct(("ITEMS", items_file), ("--out", out_csv), ("--json", json_out), ("--plot", plot), ("--compare", compare))
        given = {k: v for k, v in (("error_rate", error_rate), ("min_samples", min_samples), ("max_samples", max_samples)) if v is not None}
        job = MatchJob(settings, items_file, t_interval=t_interval, adaptive=given if adaptive else None, limit=limit, out=out_csv, save_errors=save_errors)
        reference = read_results(compare) if compare is not None else None
        if given and not adaptive:
            raise DiffclsError(f"--{next(iter(given)).replace('_', '-')} applies to --adaptive only; add --adaptive or drop it")
        done = _run(job.open())
        schedule = job.schedule
        if not done:
            raise DiffclsError(f"no item of {items_file} could be scored; {len(job.skipped)} skipped")
        summary = summarize(done)
        _print_summary(summary, schedule)
        agree = None
        if reference is not None:
            from diffcls.runtime.evaluation.match import agreement

            agree = agreement(done, reference)
            _print_agreement(agree, compare)
        if json_out is not None:
            from diffcls.runtime.results.writer import atomic_write_text

            report = {**summary, "schedule": schedule.describe(), "n_items": len(job.items), "n_skipped": len(job.skipped),
                      "settings": {**job.record(EXCLUDED), "adaptive": adaptive, **given}}
            if agree is not None:
                report["agreement"] = agree
            with output_errors("--json", json_out):
                atomic_write_text(json_out, json.dumps(report, indent=2))
        if plot is not None:
            from diffcls.runtime.evaluation.match import plot_scores

            with output_errors("--plot", plot):
                plot_scores(summary, plot, title=f"{items_file.name}: {schedule.describe()}")
            console.print(f"score chart in {plot}")


def _run(job) -> list:
    """Score the items left with a progress bar, printing what the job says; returns the results in the items' order."""
    from rich.markup import escape

    from diffcls.runtime.results.writer import printable

    for note in job.notes:
        console.print(escape(note))
    start = time.perf_counter()
    with progress_bar("items") as progress:
        task = progress.add_task("match", total=len(job.todo), rate="-")

        def on_skip(item, msg):
            console.print(f"[yellow]skipped[/] item {escape(printable(item.key))}: {escape(printable(msg))}")
            progress.advance(task)

        for n, _ in enumerate(job.iter_run(on_skip), 1):
            progress.update(task, advance=1, rate=rate(n, time.perf_counter() - start, "items", "item"))
    for line in job.summary():
        console.print(line)
    return job.done()


def _pct(summary: dict, name: str) -> str:
    v = summary[name]
    if v is None:
        return "-"
    lo, hi = summary[f"{name}_ci95"]
    return f"{100 * v:.1f}\n({100 * lo:.0f}-{100 * hi:.0f})"  # two lines: 7 columns fit 80


def _print_summary(summary: dict, schedule) -> None:
    from rich.table import Table

    from diffcls.runtime.evaluation.match import CHANCE

    out.print(f"{schedule.describe()}")
    table = Table(title="% of items correct (95% Wilson interval)", show_lines=True)
    for col in ("tag", "n", "text", "image", "img norm", "group", "evals"):
        table.add_column(col, justify="left" if col == "tag" else "right", no_wrap=True)
    rows = list(summary["by_tag"].items()) if len(summary["by_tag"]) > 1 else []
    for tag, s in rows + [("overall", summary["overall"])]:
        cells = (_pct(s, k) for k in ("text", "image", "image_normalised", "group"))
        table.add_row(tag or "(no tag)", str(s["n"]), *cells, f"{s['evals_per_item']:.0f}")
    out.print(table)
    out.print("img norm: the image score with each image's error under the empty prompt subtracted; evals: UNet evaluations per item")
    o = summary["overall"]
    if o["text_ties"] or o["image_ties"]:
        out.print(f"ties (counted as not correct): {o['text_ties']} item(s) with identical captions, {o['image_ties']} with identical images")
    out.print(f"chance: text {100 * CHANCE['text']:.0f}%, image {100 * CHANCE['image']:.0f}%, group {100 * CHANCE['group']:.1f}%")


def _print_agreement(a: dict, path: Path) -> None:
    if not a["n_items"]:
        out.print(f"--compare {path}: no item in common")
        return
    out.print(
        f"agreement with {path}: {100 * a['agreement']:.2f}% of {a['comparisons']} comparisons on {a['n_items']} items, "
        f"at {a['evals_per_item']:.0f} vs {a['reference_evals_per_item']:.0f} UNet evals/item ({100 * a['evals_fraction']:.1f}%)"
    )
