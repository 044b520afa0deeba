"""`diffcls shapes`: write the compositional shapes world (the demo-shapes model's data)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, interactive, out, user_errors


class ShapesSplit(str, Enum):
    heldout = "heldout"
    train = "train"
    novel = "novel"


@app.command()
def shapes(
    out_dir: Annotated[Path, typer.Argument(help="New or empty folder (or an earlier shapes output, replaced) to write classes/, quadruples.csv and scenes.csv into.")],
    split: Annotated[ShapesSplit, typer.Option("--split", help="heldout: new scenes of compositions seen in training; novel: colour-shape pairs and arrangements training never shows; train: the training scenes.")] = ShapesSplit.heldout,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Write at most N single-object images (class-balanced) and N quadruples (default: 20 per class and 600).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Draws the scenes; the splits stay fixed.")] = 0,
) -> None:
    """Write seeded 32x32 scenes of coloured shapes: class folders of single objects, Winoground-style quadruples of two."""
    from diffcls.models.shapes import image_count, write_shapes, written_line

    with user_errors():
        if interactive(console):  # a few seconds at the defaults: a bar on a terminal only
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            with Progress(TextColumn("drawing scenes"), BarColumn(), MofNCompleteColumn(), console=console, transient=True) as bar:
                task = bar.add_task("shapes", total=image_count(split.value, limit))
                m = write_shapes(out_dir, split.value, limit, seed, progress=lambda n: bar.advance(task, n))
        else:
            m = write_shapes(out_dir, split.value, limit, seed)
    out.print(written_line(m, out_dir))
