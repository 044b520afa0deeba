"""The one exception type for user errors.

A `DiffclsError` is something the user can fix (a bad file, a bad option, a stale engine). The CLI
prints its message as one line and exits with code 2; anything else is a bug and keeps its
traceback.
"""


class DiffclsError(Exception):
    """A user-facing error: the message names the file or option and says how to fix it."""


def install_hint(extra: str, package: str) -> str:
    """How to install an optional extra, in a form that works from a clone as well."""
    return f"pip install -e \".[{extra}]\" in the diffcls folder (or pip install {package})"


class DiffclsWarning(UserWarning):
    """Something the run worked around and the user should hear of (the CLI prints it as one
    `warning:` line), e.g. a cache that could not be written."""


def missing_extra(package: str, extra: str) -> DiffclsError:
    return DiffclsError(f"{package} is not installed; install it with: {install_hint(extra, package)}")
