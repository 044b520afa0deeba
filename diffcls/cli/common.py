"""What every command shares: the app, the error contract, the consoles."""

from __future__ import annotations

import contextlib
import sys

import typer
from rich.console import Console

from diffcls.errors import DiffclsError

# the one Typer app: command modules add their commands to it; `diffcls.cli.app` imports them all
# and adds the global flags (keeping the app here lets a command module import another's options)
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Zero-shot image classification with Stable Diffusion (Diffusion Classifier), made fast.",
    pretty_exceptions_enable=False,
)

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def quiet_third_party_logs() -> None:
    """The CLI's choice, not the library's: diffusers/transformers advice and progress bars off
    (their own loggers; DIFFCLS_VERBOSE=1 keeps them). Nothing else in the process changes."""
    import os

    if os.environ.get("DIFFCLS_VERBOSE"):
        return
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - logging knobs only
        pass


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


def rate(count: float, seconds: float, unit: str, per_unit: str | None = None, digits: int = 2) -> str:
    """'3.91 img/s', or '4.20 s/img' when it is below one per second (a large model on a CPU).

    `unit` is the plural written before "/s" ("img", "UNet evals"); `per_unit` the singular
    written after "s/" (default: `unit`).
    """
    if count <= 0 or seconds <= 0:
        return f"0 {unit}/s"
    return per_second(count / seconds, unit, per_unit, digits)


def per_second(value: float, unit: str, per_unit: str | None = None, digits: int = 2) -> str:
    """A rate `value` (per second) as `rate` writes it: seconds per item when below 1/s."""
    if value >= 1:
        return f"{value:.{digits}f} {unit}/s"
    if value <= 0:
        return f"0 {unit}/s"
    return f"{1 / value:.2f} s/{per_unit or unit}"
