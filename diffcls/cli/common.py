"""What every command shares: the app, the error contract, the consoles."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings

import typer
from rich.console import Console

from diffcls.errors import DiffclsError, DiffclsWarning
from diffcls.runtime.execution.timing import per_second, rate  # noqa: F401 - the CLI's rate formatting lives in the runtime

_show_warning = warnings.showwarning

# the one Typer app: command modules add their commands to it; `diffcls.cli.app` imports them all
# and adds the global flags (keeping the app here lets a command module import another's options)
app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Zero-shot image classification with Stable Diffusion (Diffusion Classifier), made fast.",
    pretty_exceptions_enable=False,
)

def _hide_flag_types() -> None:
    """--help shows no type beside an on/off flag (Typer writes "<bool>" there, which reads as
    if the flag took a value). A display-only hook on Typer's own option class."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - another Typer layout: keep its default
        return
    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) and self.metavar is None else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_hide_flag_types()

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
    """User errors -> one line on stderr and exit code 2 (the traceback only with --debug);
    diffcls's warnings -> one `warning:` line each."""
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_line
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


def _warning_line(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, DiffclsWarning):
        print("warning: " + " ".join(str(message).split()), file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


def progress_interval() -> float:
    """Seconds between progress lines when no terminal is attached (`$DIFFCLS_PROGRESS_INTERVAL`)."""
    try:
        return max(0.0, float(os.environ.get("DIFFCLS_PROGRESS_INTERVAL", "5")))
    except ValueError:
        return 5.0


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LineProgress:
    """Progress for logs and pipes: rich's bar draws nothing there until the end, so this prints
    one plain line every `interval` seconds instead, e.g.

        classify: 120/1000 images (12%), 3.41 img/s, elapsed 0:00:35, ETA 0:04:18

    It has the part of `rich.progress.Progress`'s interface the commands use (add_task,
    advance, update, a context manager), so a command picks one or the other and runs the same.
    """

    def __init__(self, console: Console, interval: float | None = None, unit: str = "images"):
        self.console = console
        self.interval = progress_interval() if interval is None else interval
        self.unit = unit
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        now = time.monotonic()
        self.tasks[len(self.tasks)] = {"description": description, "total": total, "done": 0, "start": now, "last": now}
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, advance: float = 0, completed: float | None = None, total: float | None = None, **fields) -> None:
        t = self.tasks[task]
        if total is not None:
            t["total"] = total
        t["done"] = completed if completed is not None else t["done"] + advance
        now = time.monotonic()
        if now - t["last"] >= self.interval:
            t["last"] = now
            self.console.print(self.line(task, now), markup=False, highlight=False)

    def line(self, task: int, now: float | None = None) -> str:
        t = self.tasks[task]
        now = time.monotonic() if now is None else now
        elapsed = now - t["start"]
        done, total = t["done"], t["total"]
        text = f"{t['description']}: {done:g}/{total:g} {self.unit}" if total else f"{t['description']}: {done:g} {self.unit}"
        if total:
            text += f" ({100 * done / total:.0f}%)"
        per_s = done / elapsed if elapsed > 0 else 0.0
        if per_s > 0:
            text += ", " + per_second(per_s, "img")  # seconds per image below one a second
        text += f", elapsed {_duration(elapsed)}"
        if total and per_s > 0:
            text += f", ETA {_duration((total - done) / per_s)}"
        return text


def interactive(con: Console | None = None) -> bool:
    """Whether live displays (progress bars, spinners) show: a terminal or a notebook."""
    con = con or console
    return con.is_interactive or con.is_jupyter


def progress_bar(unit: str = "images"):
    """A progress bar on a terminal; plain progress lines every few seconds in a log or pipe."""
    if not interactive(console):
        return LineProgress(console, unit=unit)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False)
