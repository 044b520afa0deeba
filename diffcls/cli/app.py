"""`diffcls`: export engines, classify image folders, evaluate, profile, inspect.

Each command lives in its own module and adds itself to the app (`diffcls.cli.common.app`); this
module imports them all and adds the global `--debug` / `--version` flags.
"""

from __future__ import annotations

from typing import Annotated

import typer

from diffcls.cli.common import app, quiet_third_party_logs, state


def _version(value: bool) -> None:
    if value:
        from diffcls import __version__

        typer.echo(f"diffcls {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    state.debug = debug
    quiet_third_party_logs()


# each command module adds its commands to `app` when imported
from diffcls.cli import cache, classify, digits, export, info, match, merge, profile, shapes  # noqa: E402, F401


def main() -> None:
    import sys

    from diffcls.cli.classify import join_list_flags

    sys.argv[1:] = join_list_flags(sys.argv[1:])
    app()

