"""`diffcls cache`: where the embedding/latent cache is, how big, and clearing it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, out, user_errors


@app.command()
def cache(
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="Cache directory (default: ~/.cache/diffcls or $DIFFCLS_CACHE).")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Delete every cached text embedding and latent, and the bundled models' exported engines (only files diffcls wrote; nothing else under the directory).")] = False,
) -> None:
    """Show the text-embedding/latent cache and the bundled models' engines, or clear them with --clear."""
    from diffcls.engines.fastpath import ENGINES_SUBDIR
    from diffcls.export.cached import cached_engines_size, clear_cached_engines
    from diffcls.runtime.data.cache import DiskCache

    with user_errors():
        c = DiskCache(cache_dir)
        engines = c.root / ENGINES_SUBDIR
        if clear:
            n = c.clear()
            k = clear_cached_engines(engines)
            out.print(f"removed {n} cached entries and {k} engine directories from {c.root}")
            return
        files, size = c.size()
        dirs, esize = cached_engines_size(engines)
        out.print(f"{c.root}: {files} entries, {size / 1e6:.1f} MB; {dirs} engine directories, {esize / 1e6:.1f} MB")
