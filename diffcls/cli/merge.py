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

    from diffcls.runtime.results.writer import printable
    from diffcls.runtime.results.shards import check_shards, expected_images, read_shard, write_merged

    with user_errors():
        if out_csv is None:
            if len(shards) < 2:
                raise DiffclsError("pass the merged file with --out, e.g. diffcls merge --out all.csv part0.csv part1.csv")
            out_csv, shards = shards[0], shards[1:]
        if (save_errors is None) != (not errors):
            raise DiffclsError("--save-errors MERGED.jsonl and --errors SHARD.jsonl (once per shard) go together; give both or neither")
        parts = [read_shard(p) for p in shards]
        images = expected_images(parts[0].settings, folder)
        report = check_shards(parts, images)
        for line in report.skipped:
            console.print(f"no row, as classify skipped it: {escape(printable(line))}")
        for line in report.problems:
            console.print(f"[yellow]{line}[/]")
        if report.duplicated:
            raise DiffclsError(f"{len(report.duplicated)} images have more than one row in the shard files (see above); pass each shard's file once; {out_csv} was not written")
        if report.problems and not allow_missing:
            raise DiffclsError(f"the shards do not cover every image (see above); finish the missing shards, or pass --allow-missing; {out_csv} was not written")
        if images is None:
            console.print("[yellow]the folder is unknown, so coverage was checked by shard only; pass --folder to check every image[/]")
        n = write_merged(out_csv, parts, save_errors, errors)
        console.print(f"merged {len(parts)} shards: {n} images" + (f" of {report.n_images}" if report.n_images is not None else "") + f" in {out_csv}" + (f", errors in {save_errors}" if save_errors else ""))
