"""What every command shares: the error contract, the console, and shared options."""

from __future__ import annotations

import contextlib
import sys

import typer
from rich.console import Console

from diffcls.errors import DiffclsError

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


class _State:
    debug: bool = False


state = _State()


@contextlib.contextmanager
def user_errors():
    """User errors -> one line on stderr and exit code 2 (the traceback only with --debug)."""
    try:
        yield
    except DiffclsError as e:
        if state.debug:
            raise
        msg = " ".join(str(e).split())  # always one line
        print(f"error: {msg}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print("interrupted; finished results were kept, rerun the same command to resume", file=sys.stderr)
        raise typer.Exit(130) from None
