"""Results files under faults and odd input (issue 8): no lost, duplicated or stale row.

Most tests drive `ResultsWriter` directly with real `ImageResult`s (fast); a few go through
the CLI on the tiny model.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.errors import DiffclsError
from diffcls.runtime.results import writer as R
from diffcls.runtime.execution.classifier import ImageResult
from diffcls.runtime.data.prompts import PromptSet
from diffcls.runtime.results.writer import COLUMNS, ResultsWriter
from conftest import assert_one_line_error

runner = CliRunner()
FAST = ["--n-samples", "4,8", "--to-keep", "2,1", "--batch-size", "8"]
PROMPTS = PromptSet.from_classes("cat,dog")
SETTINGS = {"model": "m", "root": "/data"}


def invoke(*args):
    return runner.invoke(app, [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args], catch_exceptions=False)


def result(i: int, name: str = "x") -> ImageResult:
    s = {0: 0.5 + i, 1: 0.25 + i}
    r = ImageResult(index=i, source=name, prediction=1, classname="dog", prompt=1, scores=s,
                    errors=[(0, 10, 0, s[0]), (1, 10, 0, s[1])], ranking=[1, 0], n_evals=2, _prompts=PROMPTS)
    r.sha256 = hashlib.sha256(f"{name}{i}".encode("utf-8", "surrogateescape")).hexdigest()
    return r


def write_rows(out: Path, keys, errors: Path | None = None, settings=SETTINGS) -> None:
    with ResultsWriter(out, settings, errors) as w:
        for i, k in enumerate(keys):
            w.write(k, result(i, k))


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


# --- 7: one writer at a time; duplicates dropped ------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "r.csv"
    with ResultsWriter(out, SETTINGS) as w:
        w.write("a.png", result(0))
        with pytest.raises(DiffclsError, match=rf"in use by another diffcls process \(PID {os.getpid()}\)"):
            ResultsWriter(out, SETTINGS).open()
    with ResultsWriter(out, SETTINGS) as w:  # released on close
        assert list(w.done) == ["a.png"]
    assert not (tmp_path / "r.csv.lock").exists()  # the lock file goes with the lock


def test_classify_refuses_an_out_another_process_writes(tmp_path, tiny_dir, image_folder):
    out = tmp_path / "r.csv"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from diffcls.runtime.results.writer import ResultsWriter; "
         "w = ResultsWriter(sys.argv[1], {}); w.open(); print('locked', flush=True); time.sleep(60)", str(out)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out, "--no-cache")
        assert_one_line_error(r, "r.csv is in use", f"PID {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert out.read_text() == ",".join(COLUMNS) + "\n"  # the refused run wrote nothing


def test_duplicate_rows_are_dropped_on_load(tmp_path):
    out = tmp_path / "r.csv"
    write_rows(out, ["a.png", "b.png"])
    text = out.read_text()
    out.write_text(text + text.split("\n", 1)[1])  # what two unlocked writers left behind
    assert len(rows(out)) == 4
    with ResultsWriter(out, SETTINGS) as w:
        assert sorted(w.done) == ["a.png", "b.png"] and w.dropped == {"duplicate": 2}
    assert sorted(r["path"] for r in rows(out)) == ["a.png", "b.png"]


# --- 8: any file name, written and read back losslessly -----------------------------------------
ODD = [os.fsdecode(b"bad\xff\xfe.png"), "cr\r.png", "nl\n.png", 'q"uote,comma.png', "ünï.png", "sub/x.png"]


def test_odd_paths_round_trip(tmp_path):
    out, errs = tmp_path / "r.csv", tmp_path / "e.jsonl"
    write_rows(out, ODD, errs)
    with ResultsWriter(out, SETTINGS, errs) as w:
        assert list(w.done) == ODD and not w.dropped
    assert [r["path"] for r in rows(out)] == ODD
    assert [json.loads(l)["path"] for l in errs.read_text().splitlines()] == ODD
    assert b"bad\xff\xfe.png" in out.read_bytes()  # the name's own bytes


def test_classify_odd_file_names_and_resume(tmp_path, tiny_dir, image_folder):
    root = tmp_path / "odd"
    root.mkdir()
    src = (image_folder / "cat" / "0.png").read_bytes()
    for name in (b"bad\xff.png", b"cr\r.png", b"z.png"):
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(src)
    out = tmp_path / "r.csv"
    args = ["classify", root, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out, "--save-errors", tmp_path / "e.jsonl", "--no-cache"]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert sorted(r["path"] for r in rows(out)) == sorted(os.fsdecode(n) for n in (b"bad\xff.png", b"cr\r.png", b"z.png"))
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "3 of 3 images already done" in r.output and len(rows(out)) == 3


# --- 9: a full disk loses nothing and half-writes nothing ---------------------------------------
def test_disk_full_keeps_finished_rows_and_writes_no_half_image(tmp_path, monkeypatch):
    out, errs = tmp_path / "r.csv", tmp_path / "e.jsonl"
    w = ResultsWriter(out, SETTINGS, errs)
    w.open()
    w.write("a.png", result(0, "a.png"))
    before = out.read_bytes(), errs.read_bytes()
    real_write = os.write

    def full(fd, data):  # the JSONL record goes in, then the disk fills up half way into the CSV row
        if fd == w._csv_fd:
            real_write(fd, bytes(data)[:7])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(R.os, "write", full)
    with pytest.raises(DiffclsError, match="No space left on device.*1 images recorded so far are kept"):
        w.write("b.png", result(1, "b.png"))
    w.close()
    assert (out.read_bytes(), errs.read_bytes()) == before  # b.png: neither file holds any of it
    monkeypatch.setattr(R.os, "write", real_write)
    with ResultsWriter(out, SETTINGS, errs) as w2:
        assert list(w2.done) == ["a.png"] and not w2.dropped


def test_short_writes_are_completed(tmp_path, monkeypatch):
    out = tmp_path / "r.csv"
    real_write = os.write
    monkeypatch.setattr(R.os, "write", lambda fd, data: real_write(fd, bytes(data)[:5]))
    write_rows(out, ["a.png", "b.png"])
    monkeypatch.setattr(R.os, "write", real_write)
    assert [r["path"] for r in rows(out)] == ["a.png", "b.png"]
    assert rows(out)[1]["sha256"] == result(1, "b.png").sha256


def test_a_row_without_its_errors_record_is_recomputed(tmp_path):
    """Killed (or out of space) between the two writes of an older version: CSV row, no JSONL record."""
    out, errs = tmp_path / "r.csv", tmp_path / "e.jsonl"
    write_rows(out, ["a.png", "b.png", "c.png"], errs)
    lines = errs.read_text().splitlines()
    errs.write_text(lines[0] + "\n" + lines[2][:20])  # b's record lost, c's torn
    with ResultsWriter(out, SETTINGS, errs) as w:
        assert list(w.done) == ["a.png"] and w.dropped == {"no errors record": 2}
    assert [r["path"] for r in rows(out)] == ["a.png"]
    assert [json.loads(l)["path"] for l in errs.read_text().splitlines()] == ["a.png"]


def test_classify_disk_full_is_one_line_and_resumes(tmp_path, tiny_dir, image_folder, monkeypatch):
    out, errs = tmp_path / "r.csv", tmp_path / "e.jsonl"
    args = ["classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out, "--save-errors", errs, "--no-cache"]
    real_write, calls = os.write, []

    def fills_up(fd, data):
        calls.append(fd)
        if len(calls) == 6:  # the 3rd image: its JSONL record went in, its CSV row does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(R.os, "write", fills_up)
    r = invoke(*args)
    assert_one_line_error(r, "No space left on device", "r.csv", "rerun the same command")
    # rows are committed in groups by a writer thread: the failed group left nothing behind, in
    # either file, and every row that is there has its record
    kept = rows(out)
    assert len(kept) < 6 and sorted(json.loads(l)["path"] for l in errs.read_text().splitlines()) == sorted(g["path"] for g in kept)
    monkeypatch.setattr(R.os, "write", real_write)
    r = invoke(*args)
    assert r.exit_code == 0 and f"{len(kept)} of 6 images already done" in r.output, r.output
    got = rows(out)
    assert len(got) == 6 and sorted(json.loads(l)["path"] for l in errs.read_text().splitlines()) == sorted(g["path"] for g in got)


def test_background_writer_commits_groups_and_acknowledges_only_what_is_on_disk(tmp_path, monkeypatch):
    """The job's writer thread: rows in order, one write + fsync per file per group, a row
    acknowledged only once its group is on disk, a failed group taken back from both files."""
    out, errs = tmp_path / "r.csv", tmp_path / "e.jsonl"
    syncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(R.os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd))[1])
    w = ResultsWriter(out, SETTINGS, errs)
    w.open()
    bg = R.BackgroundWriter(w, max_group=8)
    keys = [f"{i}.png" for i in range(40)]
    acked = []
    for i, k in enumerate(keys):
        bg.submit(k, result(i, k))
        for a in bg.acknowledged():
            assert a in {r["path"] for r in rows(out)}  # on disk before it is acknowledged
            acked.append(a)
    acked += bg.close()
    assert acked == keys and [r["path"] for r in rows(out)] == keys
    assert [json.loads(l)["path"] for l in errs.read_text().splitlines()] == keys
    assert len(syncs) <= 2 * 40 and len(syncs) >= 2 * 5  # two files, groups of at most 8
    before = out.read_bytes(), errs.read_bytes()
    bg = R.BackgroundWriter(w)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(R.os, "write", full)
    bg.submit("late.png", result(99, "late.png"))
    with pytest.raises(DiffclsError, match="No space left on device"):
        bg.close()
    w.close()
    assert (out.read_bytes(), errs.read_bytes()) == before


# --- 10: rows bound to the image's bytes and to the input root ---------------------------------
def test_a_changed_image_is_classified_again(tmp_path, tiny_dir, image_folder):
    out = tmp_path / "r.csv"
    args = ["classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out, "--no-cache"]
    assert invoke(*args).exit_code == 0
    first = {g["path"]: g for g in rows(out)}
    assert first["cat/1.png"]["sha256"] == hashlib.sha256((image_folder / "cat/1.png").read_bytes()).hexdigest()
    (image_folder / "cat" / "1.png").write_bytes((image_folder / "dog" / "2.png").read_bytes())
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "1 image(s) changed" in r.output and "5 of 6 images already done" in r.output
    after = {g["path"]: g for g in rows(out)}
    assert len(rows(out)) == 6
    assert after["cat/1.png"]["sha256"] == first["dog/2.png"]["sha256"]
    assert after["cat/1.png"]["prediction"] == first["dog/2.png"]["prediction"]
    assert float(after["cat/1.png"]["top1_mean_error"]) == pytest.approx(float(first["dog/2.png"]["top1_mean_error"]), rel=1e-4)


def test_another_input_root_is_refused(tmp_path, tiny_dir, image_folder):
    out = tmp_path / "r.csv"
    base = ["--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out, "--no-cache"]
    assert invoke("classify", image_folder, *base).exit_code == 0
    r = invoke("classify", image_folder / "cat", *base)  # a sub-folder: its "0.png" is not "cat/0.png"
    assert_one_line_error(r, "r.csv holds results for the images under", str(image_folder.resolve()), "pass another --out")
    jan, feb = tmp_path / "jan", tmp_path / "feb"  # same relative names, other images
    for d, src in ((jan, "cat"), (feb, "dog")):
        d.mkdir()
        (d / "0.png").write_bytes((image_folder / src / "0.png").read_bytes())
    out2 = tmp_path / "r2.csv"
    assert invoke("classify", jan, *base[:-3], "--out", out2, "--no-cache").exit_code == 0
    assert_one_line_error(invoke("classify", feb, *base[:-3], "--out", out2, "--no-cache"), str(jan.resolve()))
    assert len(rows(out)) == 6 and len(rows(out2)) == 1


# --- 12: smaller ones ---------------------------------------------------------------------------
def test_save_errors_equal_to_out_is_refused(tmp_path):
    out = tmp_path / "r.csv"
    write_rows(out, ["a.png"])
    before = out.read_bytes()
    for errs in (out, tmp_path / "." / "r.csv", tmp_path / "r.csv.settings.json"):
        with pytest.raises(DiffclsError, match="--save-errors .* is the results file"):
            ResultsWriter(out, SETTINGS, errs).open()
    assert out.read_bytes() == before


def test_a_cut_row_in_the_middle_is_not_done(tmp_path):
    out = tmp_path / "r.csv"
    write_rows(out, ["a.png", "b.png", "c.png"])
    header, a, b, c = out.read_text().splitlines()
    out.write_text("\n".join([header, a, b[:25], c]) + "\n")  # b's row cut, then c written after it
    with ResultsWriter(out, SETTINGS) as w:
        assert list(w.done) == ["a.png", "c.png"] and w.dropped == {"malformed": 1}
    assert [r["path"] for r in rows(out)] == ["a.png", "c.png"]


def test_adding_save_errors_on_resume_computes_the_missing_records(tmp_path):
    out, errs = tmp_path / "r.csv", tmp_path / "e.jsonl"
    write_rows(out, ["a.png", "b.png"])
    with ResultsWriter(out, SETTINGS, errs) as w:
        assert w.done == {} and w.dropped == {"no errors record": 2}  # both are redone, with records


def test_results_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_rows(tmp_path / "r.csv", ["a.png"], tmp_path / "e.jsonl")
    finally:
        os.umask(old)
    for name in ("r.csv", "r.csv.settings.json", "e.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


# --- 13: unwritable outputs are one line, before any work ---------------------------------------
def test_unwritable_out_is_one_line(tmp_path, tiny_dir, image_folder, monkeypatch):
    base = ["classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--no-cache"]
    assert_one_line_error(invoke(*base, "--out", "/proc/foo.csv"), "--out /proc/foo.csv cannot be written")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open, real_mkstemp = os.open, tempfile.mkstemp

    def read_only(path, *a, **kw):  # what a read-only mount answers (chmod does not stop root)
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(R.os, "open", read_only)
    monkeypatch.setattr(tempfile, "mkstemp", lambda *a, dir=None, **kw: read_only(str(dir)) if str(dir).startswith(str(ro)) else real_mkstemp(*a, dir=dir, **kw))
    assert_one_line_error(invoke(*base, "--out", ro / "r.csv"), "--out", "Read-only file system")
    assert_one_line_error(invoke(*base, "--out", tmp_path / "r.csv", "--save-errors", ro / "e.jsonl"), "--save-errors", "Read-only file system")


def test_evaluate_and_profile_check_json_before_the_run(tmp_path, tiny_dir, image_folder, monkeypatch):
    from diffcls.runtime.execution import classifier as C

    def no_run(*a, **kw):
        raise AssertionError("the run started before --json was checked")

    monkeypatch.setattr(C.Classifier, "iter_classify", no_run)
    base = [image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--no-cache", "--json", "/proc/x/m.json"]
    assert_one_line_error(invoke("evaluate", *base), "--json /proc/x/m.json cannot be written")
    assert_one_line_error(invoke("profile", *base), "--json /proc/x/m.json cannot be written")
    assert_one_line_error(invoke("evaluate", *base[:-1], tmp_path), "is a folder")


def _scandir_with(monkeypatch, broken: dict[Path, OSError], stat_fails: set[Path]):
    from diffcls.runtime.data import preprocess as P

    real = os.scandir

    class Entry:
        def __init__(self, e):
            self._e, self.name, self.path = e, e.name, e.path

        def is_dir(self, follow_symlinks=True):
            return self._e.is_dir(follow_symlinks=follow_symlinks)

        def stat(self):
            if Path(self.path).parent in stat_fails:
                raise PermissionError(errno.EACCES, "Permission denied")
            return self._e.stat()

    class It:
        def __init__(self, path):
            self.it = real(path)

        def __enter__(self):
            return (Entry(e) for e in self.it)

        def __exit__(self, *a):
            self.it.close()

    def scandir(path):
        if Path(path) in broken:
            raise broken[Path(path)]
        return It(path)

    monkeypatch.setattr(P.os, "scandir", scandir)


def test_folders_that_cannot_be_listed_or_entered_are_skipped_with_a_message(tmp_path, tiny_dir, image_folder, monkeypatch):
    from diffcls.runtime.data.preprocess import find_images

    (image_folder / "locked").mkdir()
    (image_folder / "noexec").mkdir()
    (image_folder / "noexec" / "5.png").write_bytes((image_folder / "cat" / "0.png").read_bytes())
    # what chmod 0 / chmod a-x do for a non-root user (tests may run as root)
    _scandir_with(monkeypatch, {image_folder / "locked": PermissionError(errno.EACCES, "Permission denied")}, {image_folder / "noexec"})
    problems = []
    found = find_images(image_folder, on_problem=lambda d, m: problems.append(m))
    assert len(found) == 6
    assert [m.split(":")[0] for m in problems] == [str(image_folder / "locked"), str(image_folder / "noexec")]
    assert "cannot list" in problems[0] and "cannot enter" in problems[1]
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--no-cache")
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output and "locked: cannot list this folder (Permission denied)" in r.output
    assert "noexec: cannot enter this folder" in r.output
    with pytest.raises(DiffclsError, match="cannot list the folder .*locked"):
        find_images(image_folder / "locked")
