"""Small settings every layer may read: where diffcls keeps its caches.

A leaf module (imports nothing from diffcls), so engines and runtime can both use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$DIFFCLS_CACHE`, else `$XDG_CACHE_HOME/diffcls`, else `~/.cache/diffcls`."""
    root = os.environ.get("DIFFCLS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffcls"
    )
    return Path(root)
