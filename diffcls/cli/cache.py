"""`diffcls cache`: where the embedding/latent cache is, how big, and clearing it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, out, user_errors


@app.command()
def cache(
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache directory (default: ~/.cache/diffcls or $DIFFCLS_CACHE).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Delete every cached text embedding and latent (only files diffcls wrote; nothing else under the directory).")] = False,
) -> None:
    """Show the text-embedding/latent cache, or clear it with --clear."""
    from diffcls.runtime.cache import DiskCache

    with user_errors():
        c = DiskCache(cache_dir)
        if clear:
            n = c.clear()
            out.print(f"removed {n} cached entries from {c.root}")
            return
        files, size = c.size()
        out.print(f"{c.root}: {files} entries, {size / 1e6:.1f} MB")
