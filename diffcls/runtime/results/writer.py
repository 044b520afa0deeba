"""Results files that survive being killed, a full disk and odd file names: resumable CSV (+ JSONL).

Each finished image is one CSV row (and, with `--save-errors`, one JSONL record), committed
together: the JSONL records are written first, then the CSV rows, each file with a single
`write` loop on an O_APPEND descriptor and fsync'ed, for one row (`write`) or a group of rows
(`commit_many`; `BackgroundWriter` commits every row waiting, on a thread); if either write
fails (disk full), both files are cut back to where they were, so an image is either wholly
recorded or not at all. The CSV is the record of what is done.

On resume (`open`), under an exclusive lock on `<out>.lock` (a second process is refused with
the holder's PID): the settings the file was written with must match the current ones (stored
in `<out>.settings.json`, the input root among them); a torn last row, a malformed row (wrong
field count, unparsable numbers) and all but the last row of a duplicated path are dropped (the
file is rewritten atomically); JSONL records that no CSV row vouches for are dropped, and CSV
rows whose JSONL record is missing are dropped so the image is recomputed. Each row carries the
sha256 of the image bytes it was computed from, and `open(current=...)` drops the rows of
images whose bytes changed, so they are recomputed.

Paths are stored losslessly: the path field is always quoted (a name may hold `\\r`, `\\n`,
`"` or `,`), and bytes that are not valid UTF-8 are written as they are on disk
(`surrogateescape`), so a row reads back to the very `str` that `os.fsdecode` gave.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import re
from pathlib import Path
from typing import Sequence

from diffcls.errors import DiffclsError
from diffcls.runtime.algorithm.ranking import TOP_K, class_columns, row_cells
from diffcls.runtime.results.outputs import (
    RESULTS_KEY_COLUMNS,
    check_distinct,
    check_output,
    csv_starting_with,
    write_atomic,
)

try:  # POSIX; elsewhere the results file is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# One row per image: what it is, what it was predicted, then its best classes in the one ranking
# of runtime.algorithm.ranking, each as topN, topN_mean_error, topN_pruned_after (and topN_probability
# with --calibration). Mean errors are written with full precision, so a resumed run computes
# exactly what a fresh one does.
BASE_COLUMNS = [*RESULTS_KEY_COLUMNS, "n_evals", "sha256"]  # sha256: of the image bytes the row was computed from


def columns(calibrated: bool) -> list[str]:
    """The results CSV's columns (before evaluate's label, correct)."""
    return BASE_COLUMNS + class_columns(calibrated)


COLUMNS = columns(False)

ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}  # file names are arbitrary bytes
_SHA256 = re.compile(r"[0-9a-f]{64}")


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` (temp file + fsync + rename; through a symlink to its target,
    straight into a device or pipe: runtime.results.outputs.write_atomic); new files get 0666 & ~umask."""
    write_atomic(path, text.encode(**ENCODING))


def _csv_line(fields: list, quote_first: bool = True) -> str:
    """One CSV record ending in '\\n'; the first field (the path) is always quoted."""
    parts = []
    for i, v in enumerate(fields):
        s = "" if v is None else str(v)
        if (i == 0 and quote_first) or any(c in s for c in ',"\r\n'):
            s = '"' + s.replace('"', '""') + '"'
        parts.append(s)
    return ",".join(parts) + "\n"


def _records(text: str) -> tuple[list[tuple[str, list[str] | None]], str]:
    """Split CSV text into complete records: ([(raw text, fields or None if unparsable)], torn tail)."""
    pieces = text.split("\n")
    tail = pieces.pop()  # after the last newline: '' or a torn line
    lines = [p + "\n" for p in pieces]
    out: list[tuple[str, list[str] | None]] = []
    reader = csv.reader(iter(lines))
    start = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error:  # a record runs past the end of the complete lines: torn
            return out, "".join(lines[start:]) + tail
        out.append(("".join(lines[start : reader.line_num]), fields))
        start = reader.line_num
    if start < len(lines):  # an unclosed quote swallowed the rest
        return out, "".join(lines[start:]) + tail
    return out, tail


def _valid_row(row: dict) -> bool:
    """A row that a finished image would have written (a cut or edited row is not done)."""
    try:
        int(row["classidx"])
        int(row["n_evals"])
        ok = math.isfinite(float(row["top1_mean_error"])) and row["top1"] == row["prediction"]
    except (KeyError, TypeError, ValueError):
        return False
    sha = row.get("sha256") or ""  # empty: a row not bound to file bytes (an in-memory image)
    return ok and bool(row.get("path")) and bool(row.get("prediction")) and (sha == "" or bool(_SHA256.fullmatch(sha)))


class ResultsWriter:
    """Writes one CSV row (and optionally one JSONL record) per finished image."""

    base_columns: list[str] | None = None  # None: columns(calibrated); a writer of other rows (match's items) sets its own; the first is the key

    def __init__(
        self, out: str | Path, settings: dict, errors_path: str | Path | None = None, extra_columns=(), temperature: float | None = None
    ):
        """`extra_columns`: names appended after COLUMNS (evaluate's label, correct); each
        `write` gives their values. `temperature` (from --calibration) fills the probability columns."""
        self.out = Path(out)
        self.temperature = temperature
        self.base = columns(temperature is not None) if self.base_columns is None else list(self.base_columns)
        self.columns = self.base + list(extra_columns)
        self.errors_path = Path(errors_path) if errors_path else None
        self.settings = settings
        self.settings_path = self.out.with_name(self.out.name + ".settings.json")
        self.lock_path = self.out.with_name(self.out.name + ".lock")
        self.errors_lock_path = self.errors_path.with_name(self.errors_path.name + ".lock") if self.errors_path else None
        self.done: dict[str, dict] = {}  # path -> CSV row of images already finished
        self.dropped: dict[str, int] = {}  # why rows were dropped on open -> how many
        self._records: dict[str, str] = {}  # path -> the row's raw CSV text
        self._csv_fd = None
        self._err_fd = None
        self._lock_fd = None
        self._err_lock_fd = None
        if self.errors_path is not None:
            own = {_same_key(p) for p in (self.out, self.settings_path, self.lock_path)}
            if _same_key(self.errors_path) in own:
                raise DiffclsError(
                    f"--save-errors {self.errors_path} is the results file itself (or one beside it); "
                    "pass another path, e.g. --save-errors errors.jsonl"
                )

    # --- opening ------------------------------------------------------------------------------
    def open(self, current=None) -> dict[str, dict]:
        """Lock, check and repair the files; returns the rows already done (for resume).

        `current(path, sha256) -> bool`, if given, says whether a done row still describes the
        image (e.g. the file's bytes are unchanged); rows it rejects are dropped and redone.
        """

        try:
            if self.out.is_dir():
                raise DiffclsError(f"--out {self.out} is a folder; pass a CSV file path")
            # never a user's file, a device, a pipe
            check_output(self.out, "--out", ("results CSV", csv_starting_with(self.base[:3])), stream=False)
            check_output(self.errors_path, "--save-errors", "errors", stream=False)
            check_distinct(("--out", self.out), ("--save-errors", self.errors_path))
            try:
                self.out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise self._os_error(e, self.out) from None
            self._lock_fd = self._lock(self.lock_path, "--out", self.out)
            if self.errors_path is not None:  # two runs appending to one errors file: refused like --out
                self._err_lock_fd = self._lock(self.errors_lock_path, "--save-errors", self.errors_path)
            try:
                if self.out.exists() and self.out.stat().st_size > 0:
                    self._check_settings()
                    self._load_csv()
                    if current is not None:
                        stale = [k for k, r in self.done.items() if not current(k, r["sha256"])]
                        if stale:
                            self._count("changed", len(stale))
                            self._drop(stale)
                else:
                    atomic_write_text(self.out, ",".join(self.columns) + "\n")
                    atomic_write_text(self.settings_path, json.dumps(self.settings, indent=2, sort_keys=True))
            except OSError as e:
                raise self._os_error(e, self.out) from None
            if self.errors_path is not None:
                try:
                    self._reconcile_errors()
                except OSError as e:
                    raise self._os_error(e, self.errors_path, "--save-errors") from None
            try:
                self._csv_fd = os.open(self.out, os.O_WRONLY | os.O_APPEND)
            except OSError as e:
                raise self._os_error(e, self.out) from None
            if self.errors_path is not None:
                try:
                    self._err_fd = os.open(self.errors_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
                except OSError as e:
                    raise self._os_error(e, self.errors_path, "--save-errors") from None
        except BaseException:
            self.close()
            raise
        return self.done

    def _os_error(self, e: OSError, path: Path, flag: str = "--out") -> DiffclsError:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiffclsError(f"{flag} {path} cannot be written ({e.strerror}); free some space and rerun the same command")
        return DiffclsError(f"{flag} {path} cannot be written ({e.strerror or e}); pass a path in a writable folder")

    def _lock(self, lock_path: Path, flag: str, target: Path) -> int:
        """flock `lock_path` (holding our PID) for as long as the writer is open; returns its fd.

        The holder removes the file when it closes; a process that locked a file that was
        removed meanwhile (it opened it just before) notices that the path now names another
        file, or none, and tries again, so two processes never both hold "the" lock.
        """
        if fcntl is None:
            return None
        while True:
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise self._os_error(e, target, flag) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                except OSError:
                    holder = "unknown"
                os.close(fd)
                raise DiffclsError(
                    f"{flag} {target} is in use by another diffcls process (PID {holder}); wait for it to "
                    f"finish or pass another {flag}"
                ) from None
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _check_settings(self) -> None:
        try:
            stored = json.loads(self.settings_path.read_text(**ENCODING))
            old = normalised_settings(stored)
        except FileNotFoundError:
            raise DiffclsError(
                f"{self.out} exists but has no {self.settings_path.name}, so it cannot be resumed safely; "
                "pass another --out or delete it"
            ) from None
        except (OSError, json.JSONDecodeError) as e:
            raise DiffclsError(f"cannot read {self.settings_path} ({e}); pass another --out or delete both files") from None
        if "root" in self.settings and "root" not in old:
            raise DiffclsError(
                f"{self.out} was written by an earlier diffcls version, which did not record the input folder; "
                "pass another --out to classify afresh"
            )
        if "root" in self.settings and old.get("root") != self.settings["root"]:
            raise DiffclsError(
                f"{self.out} holds results for the images under {_shown(old.get('root'))}, not "
                f"{_shown(self.settings['root'])}; pass another --out (or classify {_shown(old.get('root'))} to resume it)"
            )
        changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        if changed:
            detail = "; ".join(_difference(k, old.get(k), self.settings.get(k)) for k in changed[:3])
            raise DiffclsError(
                f"{self.out} was written with other settings ({detail}); rerun with the same settings to "
                "resume, or pass another --out"
            )
        if stored != old:  # an older file's settings, now in today's form
            atomic_write_text(self.settings_path, json.dumps(self.settings, indent=2, sort_keys=True))

    def _load_csv(self) -> None:
        text = self.out.read_bytes().decode(**ENCODING)
        records, tail = _records(text)
        header = records[0][1] if records and records[0][1] is not None else None
        if header is not None and "top1_score" in header:
            raise DiffclsError(
                f"{self.out} was written by an earlier diffcls version, whose top-5 scores and probabilities did not "
                "follow the prediction's ranking; it cannot be resumed: pass another --out (or delete it) to classify afresh"
            )
        n = len(self.base)
        if header is None or header[:n] != self.base:
            raise DiffclsError(
                f"{self.out} is not a results file of this diffcls version (unexpected header); pass another --out"
            )
        if header[n:] != self.columns[n:]:
            have = ",".join(header[n:]) or "none"
            raise DiffclsError(
                f"{self.out} has other extra columns ({have}) than this run writes "
                f"({','.join(self.columns[n:]) or 'none'}; evaluate adds label,correct); pass another --out"
            )
        rewrite = bool(tail)
        if tail:
            self._count("torn")
        for raw, fields in records[1:]:
            row = dict(zip(self.columns, fields)) if fields is not None and len(fields) == len(self.columns) else None
            if row is None or not self.valid_row(row):
                self._count("malformed")
                rewrite = True
                continue
            key = row[self.columns[0]]
            if key in self.done:  # two writers, or an old duplicate: keep the latest
                self._count("duplicate")
                rewrite = True
                del self.done[key], self._records[key]
            self.done[key] = row
            self._records[key] = raw
        if rewrite:
            self._rewrite_csv()

    @staticmethod
    def valid_row(row: dict) -> bool:
        """Whether a row read back is one a finished image would have written."""
        return _valid_row(row)

    def _rewrite_csv(self) -> None:
        atomic_write_text(self.out, ",".join(self.columns) + "\n" + "".join(self._records.values()))

    def _count(self, why: str, n: int = 1) -> None:
        self.dropped[why] = self.dropped.get(why, 0) + n

    def _reconcile_errors(self) -> None:
        """Keep one JSONL record per done row (same path and sha256); rows without one are redone."""
        path = self.errors_path
        keep: dict[str, str] = {}
        n_lines = 0
        torn = False
        if path.exists():
            data = path.read_bytes().decode(**ENCODING)
            torn = bool(data) and not data.endswith("\n")
            lines = data.split("\n")[:-1]
            n_lines = len(lines)
            for line in lines:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                key = rec.get("path") if isinstance(rec, dict) else None
                row = self.done.get(key) if isinstance(key, str) else None
                if row is not None and rec.get("sha256") == row["sha256"]:
                    keep.pop(key, None)
                    keep[key] = line
        missing = [k for k in self.done if k not in keep]
        if missing:  # e.g. a disk that filled between the two writes, or --save-errors added now
            self._count("no errors record", len(missing))
            self._drop(missing)
        if torn or len(keep) != n_lines:
            atomic_write_text(path, "".join(line + "\n" for line in keep.values()))

    def _drop(self, keys) -> None:
        """Forget the rows of `keys` (rewriting the CSV) so their images are computed anew."""
        keys = [k for k in keys if k in self.done]
        for k in keys:
            del self.done[k], self._records[k]
        if keys:
            self._rewrite_csv()

    # --- writing ------------------------------------------------------------------------------
    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            if n <= 0:  # pragma: no cover - os.write raises instead on every known system
                raise OSError(28, "No space left on device")
            view = view[n:]
        os.fsync(fd)

    def row(self, key: str, result, extra: Sequence = ()) -> dict:
        """The CSV row of one finished image, as {column: value}; `extra`: the values of the
        extra columns, in order (missing ones are left empty)."""
        row = {
            "path": key,
            "prediction": result.classname,
            "classidx": result.prediction,
            "n_evals": result.n_evals,
            "sha256": getattr(result, "sha256", None) or "",
            **row_cells(result.ranked(TOP_K), self.temperature),
        }
        row.update(zip(self.columns[len(self.base):], extra))
        return {c: str(row.get(c, "")) for c in self.columns}

    def write(self, key: str, result, extra: Sequence = ()) -> None:
        """Record one finished image (`result`: runtime.execution.classifier.ImageResult), all or nothing;
        `extra`: the values of the extra columns (evaluate's label, correct)."""
        self.commit_many([self.prepare(key, result, extra)])

    def commit(self, key: str, row: dict, record: dict | None = None) -> None:
        """Append one finished row ({column: text}) and its --save-errors `record`, all or nothing."""
        self.commit_many([(key, row, record)])

    def prepare(self, key: str, result, extra: Sequence = ()) -> tuple[str, dict, dict | None]:
        """(key, row, --save-errors record) of one finished image, as `write` commits them."""
        row = self.row(key, result, extra)
        rec = None
        if self._err_fd is not None:
            rec = result.to_json(self.temperature, TOP_K)
            rec["path"] = key
            rec["sha256"] = row["sha256"]
        return key, row, rec

    def commit_many(self, items: Sequence[tuple[str, dict, dict | None]]) -> None:
        """Append rows and their records with one write and one fsync per file, all or nothing:
        if either write fails, both files are cut back to where they were."""
        lines = [_csv_line([row[c] for c in self.columns]) for _, row, _ in items]
        parts = []
        if self._err_fd is not None:
            # ensure_ascii: a file name's undecodable bytes travel as \udcXX escapes and read back
            recs = "".join(json.dumps(rec, separators=(",", ":")) + "\n" for _, _, rec in items if rec is not None)
            if recs:
                parts.append((self._err_fd, self.errors_path, recs.encode("ascii")))
        parts.append((self._csv_fd, self.out, "".join(lines).encode(**ENCODING)))
        sizes = [(fd, os.fstat(fd).st_size) for fd, _, _ in parts]
        for fd, path, data in parts:
            try:
                self._write_all(fd, data)
            except OSError as e:
                for fd2, size in sizes:  # take back what was written: nothing half-recorded
                    try:
                        os.ftruncate(fd2, size)
                    except OSError:
                        pass
                raise DiffclsError(
                    f"cannot write to {path} ({e.strerror or e}); the {len(self.done)} images recorded so far are "
                    "kept: free some space and rerun the same command to resume"
                ) from None
        for (key, row, _), line in zip(items, lines):
            self.done[key] = row
            self._records[key] = line

    def close(self) -> None:
        for fd in (self._csv_fd, self._err_fd):
            if fd is not None:
                os.close(fd)
        for fd, path in ((self._err_lock_fd, self.errors_lock_path), (self._lock_fd, self.lock_path)):
            if fd is not None:
                try:
                    path.unlink()  # still holding the lock: see _lock
                except OSError:
                    pass
                os.close(fd)  # releases the lock
        self._csv_fd = self._err_fd = self._lock_fd = self._err_lock_fd = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()


class BackgroundWriter:
    """Commits a ResultsWriter's rows on a thread, so the scoring loop never waits for the disk.

        bg = BackgroundWriter(writer)
        bg.submit(key, result, extra)      # returns at once
        bg.acknowledged()                  # keys whose rows (and records) are on disk, in order
        bg.close()                         # commits what is left; raises a write's error

    The thread takes every row waiting (up to `max_group`), builds them, and commits them with
    `commit_many`: one write and one fsync per file per group, all or nothing. A row is
    acknowledged only after its group's fsync, so an acknowledged row survives a kill; a failed
    group is taken back from both files and its error raised in the caller's thread (on the
    next call, or by `close`).
    """

    def __init__(self, writer: ResultsWriter, max_group: int = 256):
        import queue
        import threading
        from collections import deque

        self.writer, self.max_group = writer, max_group
        self._queue: "queue.Queue" = queue.Queue()
        self._acked: deque = deque()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="diffcls-results", daemon=True)
        self._thread.start()

    def submit(self, key: str, result, extra: Sequence = ()) -> None:
        self._raise()
        self._queue.put((key, result, tuple(extra)))

    def acknowledged(self) -> list[str]:
        out = []
        while self._acked:
            out.append(self._acked.popleft())
        self._raise()
        return out

    def close(self) -> list[str]:
        """Commit every row submitted, stop the thread; the keys acknowledged since the last call."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        return self.acknowledged()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _loop(self) -> None:
        import queue

        stop = False
        while not stop:
            item = self._queue.get()
            group = []
            while item is not None:
                group.append(item)
                if len(group) >= self.max_group:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            stop = item is None
            if group and self._error is None:
                try:
                    self.writer.commit_many([self.writer.prepare(*it) for it in group])
                    self._acked.extend(key for key, _, _ in group)
                except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                    self._error = e


def _difference(key: str, old, new) -> str:
    """'seed: 0 -> 7'; for a dict (the schedule), only the entries that differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = [k for k in {**old, **new} if old.get(k) != new.get(k)]
        return f"{key}: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
    return f"{key}: {old!r} -> {new!r}"


# --- settings files written by earlier versions ---------------------------------------------------
_LEGACY_FIELD = re.compile(r"(\w+)=(\[[^\]]*\]|\S+)")


def legacy_schedule(text: str) -> dict | None:
    """The `to_dict` of a schedule that an earlier version stored as its description, e.g.
    "n_samples=[50, 500] to_keep=[5, 1] n_trials=1 loss=l2" or "adaptive rule=mixture
    error_rate=0.9 ... loss=l2" (these strings are frozen here: they are no longer written).
    None for text that is neither."""
    from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule

    values = {k: json.loads(v) if v.startswith("[") else v for k, v in _LEGACY_FIELD.findall(text)}
    try:
        if text.startswith("adaptive "):
            numbers = {"error_rate": float, "min_samples": int, "max_samples": int, "rel_delta": float, "n_trials": int,
                       "final_samples": int, "final_keep": int, "final_error_rate": float}
            kw = {k: numbers[k](v) for k, v in values.items() if k in numbers}
            kw.setdefault("final_samples", 0)  # described only when there was a final stage
            # the rule of these files (a bare cut, sums not restarted, two-sided) is gone: its
            # results must not be mixed with today's, so the stored rule names the old one
            return AdaptiveSchedule(rule=f"{values['rule']} (before round 4)", loss=values["loss"], **kw).to_dict()
        return Schedule(values["n_samples"], values["to_keep"], int(values["n_trials"]), values["loss"]).to_dict()
    except (KeyError, ValueError, TypeError):
        return None


def normalised_settings(settings: dict) -> dict:
    """A stored settings dict in today's form (an older file's schedule description -> its dict)."""
    sched = settings.get("schedule")
    if isinstance(sched, str):
        return {**settings, "schedule": legacy_schedule(sched) or sched}
    return settings


def _same_key(p: Path):
    try:
        return os.path.realpath(p)
    except OSError:  # pragma: no cover
        return str(p)


def _shown(s) -> str:
    """A path for a message: undecodable bytes and control characters made visible."""
    if s is None:
        return "(unknown)"
    return printable(str(s))


def printable(s: str) -> str:
    """`s` safe to print on any terminal: invalid bytes as U+FFFD, control characters escaped."""
    s = s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in s)
