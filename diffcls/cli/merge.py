"""`diffcls merge`: join the results files of `classify --shard I/N` runs into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, user_errors
from diffcls.errors import DiffclsError


@app.command()
def merge(
    shards: Annotated[list[Path], typer.Argument(help="The shards' --out files (one per shard I/N). Without --out, the first is the merged file to write (the older form).", metavar="SHARD.csv...", show_default=False)],
    out_csv: Annotated[Optional[Path], typer.Option("--out", help="The merged results CSV to write.", show_default=False)] = None,
    folder: Annotated[Optional[Path], typer.Option("--folder", help="The folder the shards classified (default: the one their settings name), to check that every image has a row.")] = None,
    save_errors: Annotated[Optional[Path], typer.Option("--save-errors", help="Also merge the shards' --save-errors files into this JSONL (pass them with --errors).")] = None,
    errors: Annotated[Optional[list[Path]], typer.Option("--errors", help="A shard's --save-errors file; repeat once per shard.")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Write the merged file even if images or shards are missing (they are still reported).")] = False,
) -> None:
    """Merge shard results: same settings, every image exactly once (missing and duplicated images are reported)."""
    from rich.markup import escape

    from diffcls.runtime.results.shards import merge_shards
    from diffcls.runtime.results.writer import printable

    def say(kind: str, line: str) -> None:
        text = escape(printable(line)) if kind == "skipped" else escape(line)
        console.print({"skipped": f"no row, as classify skipped it: {text}", "problem": f"[yellow]{text}[/]", "note": f"[yellow]{text}[/]"}[kind])

    with user_errors():
        if out_csv is None:
            if len(shards) < 2:
                raise DiffclsError("pass the merged file with --out, e.g. diffcls merge --out all.csv part0.csv part1.csv")
            out_csv, shards = shards[0], shards[1:]
        n, report = merge_shards(shards, out_csv, folder=folder, errors_out=save_errors, shard_errors=errors, allow_missing=allow_missing, say=say)
        console.print(f"merged {len(shards)} shards: {n} images" + (f" of {report.n_images}" if report.n_images is not None else "") + f" in {out_csv}" + (f", errors in {save_errors}" if save_errors else ""))
