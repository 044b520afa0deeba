"""Output paths that never destroy a user's file: what a run may write, and how it writes it.

Every file a command writes (`--out`, `--save-errors`, `--json`, `--plot`, `calibrate --out`)
goes through three rules, checked before any work:

- an existing regular file is replaced only if it is diffcls's own file of that kind (a results
  CSV, an errors JSONL, a metrics or calibration JSON, a PNG); anything else (an input image, a
  CSV of the user's) is refused, one line naming the flag and the file;
- two outputs of one run may not be one file, after resolving symlinks and hard links;
- a target that is not a regular file (a character device such as /dev/null, a pipe, a socket,
  /dev/stdout) is never replaced by a regular file: outputs written in one piece are written
  through to it, resumable ones (the results CSV, the errors file) refuse it.

`write_atomic` writes one piece: through a symlink to its target (the link stays), straight into
a non-regular target, else a temp file beside the target, fsync'ed and renamed. `output_errors`
turns the OSError of a full disk (or a read-only one) into the one-line user error.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable

from diffcls.errors import DiffclsError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def target_kind(path: str | Path) -> str:
    """'new' (nothing there, or a dangling link), 'file', 'dir' or 'stream' (anything else)."""
    try:
        st = os.stat(path)  # follows symlinks: the kind of what a write would reach
    except FileNotFoundError:
        return "new"
    except OSError:
        return "new"  # e.g. a link loop; the write reports it
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "stream"


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace the file `path` names with `data` as a whole (see the module docstring); new
    files get 0666 & ~umask, an existing file keeps its mode."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if target_kind(path) == "stream":  # /dev/stdout, a pipe, a device: write through, never replace
        with open(path, "wb") as f:
            f.write(data)
        return
    path = Path(os.path.realpath(path))  # through a symlink: replace its target, keep the link
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def output_errors(flag: str, path):
    """An OSError while writing `path` becomes a one-line DiffclsError naming `flag`."""
    try:
        yield
    except OSError as e:
        raise cannot_write(flag, path, e) from None


def write_json(path, data, flag: str = "--json") -> None:
    """`data` as indented JSON at `path` in one piece (`write_atomic`); a failed write is the
    one-line error naming `flag`."""
    with output_errors(flag, path):
        write_atomic(path, json.dumps(data, indent=2))


def cannot_write(flag: str, path, e: OSError) -> DiffclsError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiffclsError(f"{flag} {path} cannot be written ({e.strerror}); free some space and rerun the same command")
    return DiffclsError(f"{flag} {path} cannot be written ({e.strerror or e}); pass a path in a writable folder")


# --- whose file is it -----------------------------------------------------------------------
def _head(path: Path, n: int = 1 << 16) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _json_object(path: Path, *keys: str) -> bool:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in keys)


def csv_starting_with(columns) -> "Callable[[Path], bool]":
    """Whether a file's header starts with `columns` (a results file of some diffcls version)."""
    return lambda path: _head(path).startswith(",".join(columns).encode())


# the first columns of every results CSV diffcls has written (runtime.results.writer builds on them)
RESULTS_KEY_COLUMNS = ("path", "prediction", "classidx")


def _results_csv(path: Path) -> bool:
    return csv_starting_with(RESULTS_KEY_COLUMNS)(path)


def _errors_jsonl(path: Path) -> bool:
    first = _head(path).split(b"\n", 1)[0]
    try:
        rec = json.loads(first)
    except ValueError:
        return False
    return isinstance(rec, dict) and "path" in rec


KINDS = {  # kind -> (what it is called, does an existing non-empty file look like one)
    "results": ("results CSV", _results_csv),
    "errors": ("--save-errors JSONL", _errors_jsonl),
    "metrics": ("metrics JSON", lambda p: _json_object(p, "top1")),
    "profile": ("profile JSON", lambda p: _json_object(p, "settings")),
    "match": ("match JSON", lambda p: _json_object(p, "settings")),
    "calibration": ("calibration JSON", lambda p: _json_object(p, "temperature")),
    "png": ("PNG", lambda p: _head(p, 8) == b"\x89PNG\r\n\x1a\n"),
}


def check_output(path, flag: str, kind, *, stream: bool = True) -> None:
    """Refuse, before any work, an output path diffcls must not write (module docstring).
    `kind`: a name in KINDS, or (what it is called, predicate); `stream`: whether the output may
    be written through to a device or pipe."""
    if path is None:
        return
    path = Path(path)
    what, ours = KINDS[kind] if isinstance(kind, str) else kind
    found = target_kind(path)
    if found == "dir":
        raise DiffclsError(f"{flag} {path} is a folder; pass a file path")
    if found == "stream":
        if not stream:
            raise DiffclsError(
                f"{flag} {path} is not a regular file (a device, pipe or socket); the {what} is resumed from disk, so pass a file path"
            )
        if not os.access(path, os.W_OK):
            raise DiffclsError(f"{flag} {path} cannot be written (permission denied); pass another path")
        return
    if found == "file":
        try:
            mine = os.path.getsize(path) == 0 or ours(path)
        except OSError as e:
            raise DiffclsError(f"{flag} {path} cannot be read ({e.strerror or e}); pass another path") from None
        if not mine:
            raise DiffclsError(
                f"{flag} {path} exists and is not a diffcls {what}; diffcls replaces only its own files: pass a new path"
            )
    check_writable(os.path.realpath(path) if path.is_symlink() else path, flag)


def check_writable(path: str | Path | None, flag: str) -> None:
    """Refuse, before any work, an output path that cannot be written (one-line DiffclsError).

    Creates and removes a temp file beside `path`: the only honest test (permissions, read-only
    mounts, /proc, a full disk's quota all show up here, also for root).
    """
    if path is None:
        return
    path = Path(path)
    if target_kind(path) == "stream":  # /dev/stdout, a pipe: written through, nothing created beside it
        if not os.access(path, os.W_OK):
            raise DiffclsError(f"{flag} {path} cannot be written (permission denied); pass another path")
        return
    if path.is_dir():
        raise DiffclsError(f"{flag} {path} is a folder; pass a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".check")
        os.close(fd)
        os.unlink(tmp)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise DiffclsError(f"{flag} {path} cannot be written ({e.strerror or e}); pass a path in a writable folder") from None


def _identity(path: Path):
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def check_distinct(*outputs: tuple[str, "str | Path | None"]) -> None:
    """Refuse two outputs of one run (`(flag, path)` pairs; None: not given) that are one file."""
    seen: dict = {}
    for flag, path in outputs:
        if path is None:
            continue
        key = _identity(Path(path))
        if key in seen:
            other_flag, other = seen[key]
            raise DiffclsError(
                f"{flag} {path} and {other_flag} {other} are the same file; one would overwrite the other: pass two different paths"
            )
        seen[key] = (flag, path)


def check_outputs(*outputs: tuple[str, "str | Path | None", "str | None"]) -> None:
    """One command's (flag, path, kind) outputs, before its run: `check_output` each that has a
    kind (a None kind: an input or a file checked elsewhere), then `check_distinct` over all."""
    for flag, path, kind in outputs:
        if kind is not None:
            check_output(path, flag, kind)
    check_distinct(*((flag, path) for flag, path, _ in outputs))


def save_figure(fig, path, dpi: int = 120) -> None:
    """A matplotlib figure to `path` in one piece (rendered in memory, then `write_atomic`): a full
    disk leaves no empty or torn image behind. The format follows the suffix (PNG without one)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=dpi)
    write_atomic(path, buf.getvalue())
