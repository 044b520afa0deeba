"""`diffcls match`: Winoground-style image-text matching (text, image and group scores)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import LineProgress, app, console, interactive, out, rate, user_errors
from diffcls.cli.settings import RunSettings, run_options
from diffcls.runtime.execution.resolve import load_noise, model_defaults_of, open_classifier
from diffcls.errors import DiffclsError

# the shared options that do not apply (class prompts, image lists, the fixed rounds) and the
# adaptive ones, which match declares with its own defaults (one two-sided test per comparison,
# up to the whole grid, no final stage)
EXCLUDED = ("prompts", "classes", "template", "list_file", "limit", "sample", "n_samples", "to_keep", "adaptive", "error_rate", "min_samples",
            "max_samples", "rule", "rel_delta", "final_samples", "final_keep", "final_error_rate")
_MATCH = "Matching"
_ADAPTIVE = "Adaptive evaluation"
MATCH_ALPHA, MATCH_N0 = 0.05, 8  # runtime.evaluation.match.adaptive_for_match's defaults


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
    error_rate: Annotated[Optional[float], typer.Option("--error-rate", help=f"--adaptive: the chance a comparison is settled the wrong way, alpha (default {MATCH_ALPHA:g}).", rich_help_panel=_ADAPTIVE)] = None,
    min_samples: Annotated[Optional[int], typer.Option("--min-samples", help=f"--adaptive: timesteps every comparison gets before it may stop, n0 (default {MATCH_N0}).", rich_help_panel=_ADAPTIVE)] = None,
    max_samples: Annotated[Optional[int], typer.Option("--max-samples", help="--adaptive: timesteps per comparison at most (default: the whole grid, where an unsettled comparison is the full grid's decision).", rich_help_panel=_ADAPTIVE)] = None,
    *,
    settings: RunSettings,
) -> None:
    """Score image-text matching items the Winoground way: all four (caption, image) pairs of an
    item on the same timesteps and noise; text, image (raw and normalised by the empty prompt)
    and group scores, overall and per tag, with 95% Wilson intervals."""
    with user_errors():
        from diffcls.runtime.evaluation.match import read_items, summarize
        from diffcls.runtime.results.outputs import check_distinct, check_output, output_errors

        s = settings
        check_output(json_out, "--json", "match")  # before the run, not after it finished
        check_output(plot, "--plot", "png")
        check_distinct(("ITEMS", items_file), ("--out", out_csv), ("--json", json_out), ("--plot", plot), ("--compare", compare))
        items = read_items(items_file)[:limit]
        reference = _read_results(compare) if compare is not None else None
        given = {k: v for k, v in (("error_rate", error_rate), ("min_samples", min_samples), ("max_samples", max_samples)) if v is not None}
        if given and not adaptive:
            raise DiffclsError(f"--{next(iter(given)).replace('_', '-')} applies to --adaptive only; add --adaptive or drop it")
        clf, schedule = _open(s, t_interval, given if adaptive else None)
        noise = load_noise(s.noise)
        if save_errors is not None and out_csv is None:
            raise DiffclsError("--save-errors needs --out too (the CSV records which items are done)")
        results, skipped = _run(clf, items, schedule, s, noise, items_file, out_csv, save_errors)
        done = [results[it.key] for it in items if it.key in results]
        if not done:
            raise DiffclsError(f"no item of {items_file} could be scored; {len(skipped)} skipped")
        summary = summarize(done)
        _print_summary(summary, schedule)
        agree = None
        if reference is not None:
            from diffcls.runtime.evaluation.match import agreement

            agree = agreement(done, reference)
            _print_agreement(agree, compare)
        if json_out is not None:
            from diffcls.runtime.results.writer import atomic_write_text

            report = {**summary, "schedule": schedule.describe(), "n_items": len(items), "n_skipped": len(skipped),
                  "settings": {**_record(s, clf, items_file, t_interval), "adaptive": adaptive, **given}}
            if agree is not None:
                report["agreement"] = agree
            with output_errors("--json", json_out):
                atomic_write_text(json_out, json.dumps(report, indent=2))
        if plot is not None:
            from diffcls.runtime.evaluation.match import plot_scores

            with output_errors("--plot", plot):
                plot_scores(summary, plot, title=f"{items_file.name}: {schedule.describe()}")
            console.print(f"score chart in {plot}")


def _open(s: RunSettings, t_interval: int, adaptive_flags: dict | None):
    """Check the model cheaply, open the engines, build the schedule for their timesteps."""
    from diffcls.runtime.evaluation.match import MatchSchedule, adaptive_for_match

    defaults = model_defaults_of(s)
    if defaults.get("labels"):
        raise DiffclsError("match needs a text-conditioned model (captions); a class-conditional model (DiT) has no text encoder")
    clf = open_classifier(s, s.image_size or defaults.get("image_size"))
    T = clf.engines.num_train_timesteps
    grid = len(range(t_interval // 2, T, t_interval))
    adaptive = None
    if adaptive_flags is not None:
        adaptive = adaptive_for_match(grid, **adaptive_flags, n_trials=s.n_trials, loss=s.loss.value)
    schedule = MatchSchedule(t_interval=t_interval, n_trials=s.n_trials, loss=s.loss.value, num_train_timesteps=T, adaptive=adaptive)
    return clf, schedule.validate(1, T)


def _read_results(path: Path) -> dict:
    """{item: ItemResult} of a match results CSV (for --compare)."""
    import csv

    from diffcls.runtime.evaluation.match import MATCH_COLUMNS, ItemResult, MatchResultsWriter

    try:
        rows = list(csv.DictReader(path.open(encoding="utf-8", errors="surrogateescape", newline="")))
    except OSError as e:
        raise DiffclsError(f"--compare {path} cannot be read ({e.strerror or e}); pass a match --out file") from None
    if rows and list(rows[0])[: len(MATCH_COLUMNS)] != list(MATCH_COLUMNS):
        raise DiffclsError(f"--compare {path} is not a match results file (unexpected columns); pass a match --out file")
    return {r["item"]: ItemResult.from_row(r) for r in rows if MatchResultsWriter.valid_row(r)}


def _run(clf, items, schedule, s: RunSettings, noise, items_file: Path, out_csv: Path | None, save_errors: Path | None = None):
    """Score the items not yet in `out_csv` (resuming it); returns ({key: ItemResult}, skipped)."""
    from rich.markup import escape

    from diffcls.runtime.evaluation.match import ItemResult, MatchResultsWriter, iter_match
    from diffcls.runtime.results.writer import printable

    by_key = {it.key: it for it in items}
    e = clf.engines
    record = {
        "model": e.fingerprint,
        "backend": e.backend,
        "precision": e.precision,
        "schedule": schedule.to_dict(),
        "seed": s.seed if noise is None else None,
        "noise": None if noise is None else _digest(noise),
        "image_size": e.image_size,
        "interpolation": s.interpolation.value,
        "items": os.fsdecode(os.path.abspath(items_file)),
    }
    writer, results = None, {}
    if out_csv is not None:
        writer = MatchResultsWriter(out_csv, record, errors_path=save_errors)
        done = writer.open(current=lambda key, sha: key not in by_key or by_key[key].sha256 == sha)
        results = {k: ItemResult.from_row(r) for k, r in done.items() if k in by_key}
        for why, n in writer.dropped.items():
            console.print(escape(f"{out_csv}: {n} {why} row(s) dropped; those items are scored again"))
        if results:
            console.print(f"resuming {out_csv}: {len(results)} of {len(items)} items already done")
    todo = [it for it in items if it.key not in results]
    skipped = []
    start = time.perf_counter()
    try:
        with _progress() as progress:
            task = progress.add_task("match", total=len(todo), rate="-")

            def on_skip(item, msg):
                skipped.append((item.key, msg))
                console.print(f"[yellow]skipped[/] item {escape(printable(item.key))}: {escape(printable(msg))}")
                progress.advance(task)

            for n, r in enumerate(iter_match(clf, todo, schedule, seed=s.seed, noise=noise, batch_size=s.batch_size,
                                             interpolation=s.interpolation.value, workers=s.workers, on_skip=on_skip), 1):
                if writer is not None:
                    writer.write_item(r)
                results[r.key] = r
                progress.update(task, advance=1, rate=rate(n, time.perf_counter() - start, "items", "item"))
    finally:
        if writer is not None:
            writer.close()
    n_new = len(todo) - len(skipped)
    if todo and n_new:
        elapsed = time.perf_counter() - start
        evals = sum(results[it.key].n_evals for it in todo if it.key in results)
        console.print(f"scored {n_new} items in {elapsed:.1f} s ({rate(n_new, elapsed, 'items', 'item')}, {evals / n_new:.0f} UNet evals/item)")
    return results, skipped


def _progress():
    if not interactive(console):
        return LineProgress(console, unit="items")
    from diffcls.cli.classify import _progress as bar

    return bar()


def _digest(t) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


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


def _record(s: RunSettings, clf, items_file: Path, t_interval: int) -> dict:
    from dataclasses import asdict
    from enum import Enum

    def plain(v):
        return v.value if isinstance(v, Enum) else (str(v) if isinstance(v, Path) else v)

    e = clf.engines
    return {
        "items": str(items_file),
        "t_interval": t_interval,
        **{k: plain(v) for k, v in asdict(s).items() if k not in EXCLUDED},
        "resolved": {"backend": e.backend, "device": str(e.device), "precision": e.precision, "image_size": e.image_size, "model_fingerprint": e.fingerprint},
    }
