"""`diffcls digits`: write scikit-learn's digits as PNG class folders (the demo model's data)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, out, user_errors
from diffcls.errors import DiffclsError


class Split(str, Enum):
    heldout = "heldout"
    train = "train"


def _one_out(option: Path | None, positional: Path | None) -> Path:
    if option is not None and positional is not None:
        raise DiffclsError(f"give the folder once: --out {option} (the positional {positional} is the older form of the same)")
    if option is None and positional is None:
        raise DiffclsError("pass the folder to write into with --out DIR, e.g. diffcls digits --out digits/")
    return option if option is not None else positional


@app.command()
def digits(
    folder: Annotated[Optional[Path], typer.Argument(help="The same as --out (the older form).", metavar="DIR", show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="New or empty folder to write into; one subfolder per class (zero .. nine).", metavar="DIR", show_default=False)] = None,
    split: Annotated[Split, typer.Option("--split", help="heldout: the 20% the demo model never saw in training; train: the rest.")] = Split.heldout,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Write only the first N images (class-balanced).")] = None,
    corrupt: Annotated[int, typer.Option("--corrupt", help="Corruption severity 1-5 (seeded rotation, shift and pixel noise; harder for the classifier); 0: clean.")] = 0,
) -> None:
    """Write scikit-learn's handwritten digits as 32x32 PNGs, one folder per class (needs scikit-learn)."""
    from diffcls.models.digits import write_digits, written_line

    with user_errors():
        out_dir = _one_out(out_dir, folder)
        paths = write_digits(out_dir, split.value, limit, severity=corrupt)
    out.print(written_line(paths, split.value, corrupt, out_dir))
