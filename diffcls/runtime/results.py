"""Results files that survive being killed: append-only CSV (+ JSONL errors), resumable.

Each finished image is one line written with a single `write` on an O_APPEND descriptor and
fsync'ed, JSONL first and CSV second; the CSV is the record of what is done. On resume a torn
last line is cut off, JSONL records of images missing from the CSV are dropped (they are
recomputed), and the settings the file was written with must match the current ones, stored
beside it in `<out>.settings.json`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from diffcls.errors import DiffclsError

TOP_K = 5
BASE_COLUMNS = ["path", "prediction", "classidx", "score", "n_evals"] + [
    f"top{i}{suffix}" for i in range(1, TOP_K + 1) for suffix in ("", "_score")
]
# Scores that compare (mean error over the samples all listed classes share; lower is better)
# and probabilities (empty without --calibration); see runtime.calibration.
SHARED_COLUMNS = ["n_shared", "probability"] + [
    f"top{i}{suffix}" for suffix in ("_mean_error", "_probability") for i in range(1, TOP_K + 1)
]
COLUMNS = BASE_COLUMNS + SHARED_COLUMNS


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _complete_lines(path: Path) -> tuple[list[str], bool]:
    """The file's complete lines and whether a torn last line was found."""
    data = path.read_bytes().decode("utf-8", errors="replace")
    if not data:
        return [], False
    torn = not data.endswith("\n")
    lines = data.split("\n")
    lines = lines[:-1]  # the part after the last newline: '' or a torn line
    return lines, torn


class ResultsWriter:
    """Writes one CSV row (and optionally one JSONL record) per finished image."""

    def __init__(
        self, out: str | Path, settings: dict, errors_path: str | Path | None = None, temperature: float | None = None
    ):
        self.out = Path(out)
        self.temperature = temperature  # from --calibration: fills the probability columns
        self.errors_path = Path(errors_path) if errors_path else None
        self.settings = settings
        self.settings_path = self.out.with_name(self.out.name + ".settings.json")
        self.done: dict[str, dict] = {}  # path -> CSV row of images already finished
        self._csv_fd = None
        self._err_fd = None

    def open(self) -> dict[str, dict]:
        """Check/prepare the files; returns the rows already done (for resume)."""
        if self.out.exists() and self.out.stat().st_size > 0:
            self._check_settings()
            self._load_csv()
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out, ",".join(COLUMNS) + "\n")
            atomic_write_text(self.settings_path, json.dumps(self.settings, indent=2, sort_keys=True))
        if self.errors_path is not None:
            self._reconcile_errors()
        self._csv_fd = os.open(self.out, os.O_WRONLY | os.O_APPEND)
        if self.errors_path is not None:
            self._err_fd = os.open(self.errors_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self.done

    def _check_settings(self) -> None:
        try:
            old = json.loads(self.settings_path.read_text())
        except FileNotFoundError:
            raise DiffclsError(
                f"{self.out} exists but has no {self.settings_path.name}, so it cannot be resumed safely; "
                "pass another --out or delete it"
            ) from None
        except (OSError, json.JSONDecodeError) as e:
            raise DiffclsError(f"cannot read {self.settings_path} ({e}); pass another --out or delete both files") from None
        changed = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
        if changed:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {self.settings.get(k)!r}" for k in changed[:3])
            raise DiffclsError(
                f"{self.out} was written with other settings ({detail}); rerun with the same settings to "
                "resume, or pass another --out"
            )

    def _load_csv(self) -> None:
        lines, torn = _complete_lines(self.out)
        if not lines or lines[0].split(",")[: len(BASE_COLUMNS)] != BASE_COLUMNS:
            raise DiffclsError(f"{self.out} is not a diffcls results file (unexpected header); pass another --out")
        if torn:  # killed mid-write: drop the partial row, it will be recomputed
            with open(self.out, "r+b") as f:
                f.truncate(len(("\n".join(lines) + "\n").encode("utf-8")))
        for row in csv.DictReader(io.StringIO("\n".join(lines) + "\n")):
            if row.get("path"):
                self.done[row["path"]] = row

    def _reconcile_errors(self) -> None:
        path = self.errors_path
        if not path.exists():
            return
        lines, torn = _complete_lines(path)
        keep = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("path") in self.done and rec["path"] not in {k for k, _ in keep}:
                keep.append((rec["path"], line))
        if torn or len(keep) != len(lines):
            atomic_write_text(path, "".join(line + "\n" for _, line in keep))

    @staticmethod
    def _append(fd: int, text: str) -> None:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)

    def write(self, key: str, result) -> None:
        """Record one finished image (`result`: runtime.classifier.ImageResult)."""
        if self._err_fd is not None:
            rec = result.to_json(self.temperature, TOP_K)
            rec["path"] = key
            self._append(self._err_fd, json.dumps(rec, separators=(",", ":")) + "\n")
        top = result.top_classes(TOP_K)
        row = [key, result.classname, result.prediction, f"{result.scores[result.prompt]:.6g}", result.n_evals]
        for i in range(TOP_K):
            row += [top[i][1], f"{top[i][2]:.6g}"] if i < len(top) else ["", ""]
        shared, n_shared = result.shared_scores(TOP_K)
        probs = result.probabilities(self.temperature, TOP_K) if self.temperature is not None else []
        row += [n_shared, f"{probs[0][2]:.6g}" if probs else ""]
        row += [f"{shared[i][2]:.6g}" if i < len(shared) else "" for i in range(TOP_K)]
        row += [f"{probs[i][2]:.6g}" if i < len(probs) else "" for i in range(TOP_K)]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(row)
        self._append(self._csv_fd, buf.getvalue())
        self.done[key] = dict(zip(COLUMNS, map(str, row)))

    def close(self) -> None:
        for fd in (self._csv_fd, self._err_fd):
            if fd is not None:
                os.close(fd)
        self._csv_fd = self._err_fd = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
