"""What every command shares: the app, the error contract, the consoles, running a job with its progress shown."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

from diffcls.errors import DiffclsError, DiffclsWarning
from diffcls.runtime.execution.timing import ProgressLines, about, rate
from diffcls.runtime.results.writer import printable

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


class LineProgress(ProgressLines):
    """Progress lines (`runtime.execution.timing.ProgressLines`) on a console, every
    $DIFFCLS_PROGRESS_INTERVAL seconds unless `interval` is given, e.g.

        classify: 120/1000 images (12%), 3.41 img/s, elapsed 0:00:35, ETA 0:04:18
    """

    def __init__(self, console: Console, interval: float | None = None, unit: str = "images"):
        super().__init__(lambda line: console.print(line, markup=False, highlight=False), progress_interval() if interval is None else interval, unit)


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


def say(text: str) -> None:
    """The library's plain text on stderr (no markup, whatever brackets it holds)."""
    console.print(text, markup=False)


def run_job(job, name: str, unit: str = "images", per: tuple[str, str | None] = ("img", None), *, estimate: bool = True,
            skipped: Callable[[object, str], str] = lambda key, msg: msg):
    """Open `job` (a ClassifyJob or MatchJob), run it with a progress bar and print what it says:
    skipped inputs (`skipped(key, msg)`), notes, once early an `estimate:` of the rest, its summary."""
    job.open()
    for key, msg in job.skipped:  # folders that could not be listed or entered
        console.print("[yellow]skipped[/] " + escape(printable(skipped(key, msg))))
    for note in job.notes:
        say(note)
    start = time.perf_counter()
    with progress_bar(unit) as progress:
        task = progress.add_task(name, total=len(job.todo), rate="-")

        def on_skip(key, msg):
            console.print("[yellow]skipped[/] " + escape(printable(skipped(key, msg))))
            progress.advance(task)

        for n, _ in enumerate(job.iter_run(on_skip=on_skip), 1):
            elapsed = time.perf_counter() - start
            progress.update(task, advance=1, rate=rate(n, elapsed, *per))
            left = len(job.todo) - n
            if estimate and left > 0 and (elapsed >= 10 or n >= max(3, len(job.todo) // 20)):
                estimate = False  # once, early: what the whole run will take at this pace
                console.print(f"estimate: about {about(left * elapsed / n)} more for {left} {unit} at {rate(n, elapsed, *per)}")
    for line in job.summary():
        say(line)
    return job


@contextlib.contextmanager
def quieted(on: bool):
    """--quiet: the stderr console (progress, speed lines, notices) says nothing meanwhile."""
    old = console.quiet
    console.quiet = on or old
    try:
        yield
    finally:
        console.quiet = old

