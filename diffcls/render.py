"""Rich renderables of the library's results, for a terminal or a notebook (`rich.print(...)`).

The CLI prints these; a script prints the same tables with `rich.print(job)` (a ClassifyJob's
predictions), `rich.print(metrics_view(m, classes))` (an evaluation) and the like. A leaf module:
each layer builds its own views from the helpers here.
"""

from __future__ import annotations

from typing import Iterable, Sequence


def table(columns: Sequence[str], rows: Iterable[Sequence[str]], *, left=(), wrap=(), **kw):
    """A rich Table: the `left` columns left-aligned, the rest (numbers) right-aligned; only the
    `wrap` columns may wrap. `kw` goes to `rich.table.Table` (title, caption, ...)."""
    from rich.table import Table

    t = Table(**kw)
    for c in columns:
        t.add_column(c, justify="left" if c in left else "right", no_wrap=c not in wrap)
    for row in rows:
        t.add_row(*row)
    return t


def lines(*parts):
    """Lines of plain text (no markup, whatever brackets they hold) and renderables, one below the other."""
    from rich.console import Group
    from rich.text import Text

    return Group(*(Text(p) if isinstance(p, str) else p for p in parts))


def pct(x: float | None, digits: int = 0) -> str:
    """A fraction as a percentage; None (nothing to divide) as '-'."""
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def human_size(n: int) -> str:
    """Bytes in B, KB, MB or GB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
