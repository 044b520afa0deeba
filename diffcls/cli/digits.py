"""`diffcls digits`: write scikit-learn's digits as PNG class folders (the demo model's data)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, out, user_errors


class Split(str, Enum):
    heldout = "heldout"
    train = "train"


@app.command()
def digits(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write into; one subfolder per class (zero .. nine).")],
    split: Annotated[Split, typer.Option("--split", help="heldout: the 20% the demo model never saw in training; train: the rest.")] = Split.heldout,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Write only the first N images (class-balanced).")] = None,
    corrupt: Annotated[int, typer.Option("--corrupt", help="Corruption severity 1-5 (seeded rotation, shift and pixel noise; harder for the classifier); 0: clean.")] = 0,
) -> None:
    """Write scikit-learn's handwritten digits as 32x32 PNGs, one folder per class (needs scikit-learn)."""
    from diffcls.models.digits import write_digits

    with user_errors():
        paths = write_digits(out_dir, split.value, limit, severity=corrupt)
    classes = len({p.parent.name for p in paths})
    kind = f"{split.value} digits (corruption severity {corrupt})" if corrupt else f"{split.value} digits"
    out.print(f"wrote {len(paths)} {kind} in {classes} class folders under {out_dir}")
