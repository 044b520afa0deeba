"""`diffcls`: export engines, classify image folders, evaluate, profile, inspect.

Each command lives in its own module and registers itself on `app`; this module only builds the
app and the global `--debug` flag.
"""

from __future__ import annotations

from typing import Annotated

import typer

from diffcls.cli.common import state

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Zero-shot image classification with Stable Diffusion (Diffusion Classifier), made fast.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
) -> None:
    state.debug = debug


def _register() -> None:
    # imported for their side effect: each module adds its commands to `app`
    import importlib

    for name in ("classify", "digits", "export", "profile", "info", "cache"):
        try:
            importlib.import_module(f"diffcls.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"diffcls.cli.{name}":
                raise


_register()


def main() -> None:
    import sys

    from diffcls.cli.classify import join_list_flags

    sys.argv[1:] = join_list_flags(sys.argv[1:])
    app()

