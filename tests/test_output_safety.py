"""No output destroys a user's file (issue 24, items 1-5, 9, 12): export's folder, outputs that
name inputs or each other, devices/pipes/symlinks as outputs, merge's rows, the --save-errors
lock, a run's own plot inside its input folder, a full disk at the end of a run."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.errors import DiffclsError
from diffcls.runtime.results.writer import COLUMNS, ResultsWriter, atomic_write_text
from conftest import assert_one_line_error, copy_of

runner = CliRunner()
FAST = ["--n-samples", "4,8", "--to-keep", "2,1", "--batch-size", "8", "--no-cache"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def classify_args(tiny_dir, folder, *extra):
    return ["classify", folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, *extra]


def evaluate_args(tiny_dir, folder, *extra):
    return ["evaluate", folder, "--model", tiny_dir, *FAST, *extra]


# --- 1: export owns only its own folder --------------------------------------------------------
def test_export_refuses_a_folder_of_the_users(tmp_path, tiny_dir):
    d = tmp_path / "mine"
    (d / "onnx").mkdir(parents=True)
    (d / "tokenizer").mkdir()
    files = {d / "onnx" / "my_other_model.onnx": b"mine", d / "tokenizer" / "my_vocab.txt": b"vocab", d / "diffcls.json": b'{"mine": 1}'}
    for p, data in files.items():
        p.write_bytes(data)
    r = invoke("export", "--out", d, "--model", tiny_dir, "--batch-sizes", "2", "--image-size", "16", "--device", "cpu")
    assert_one_line_error(r, f"--out {d}", "not an engine directory", "new or empty folder")
    assert {p: p.read_bytes() for p in files} == files
    assert sorted(p.name for p in d.iterdir()) == ["diffcls.json", "onnx", "tokenizer"]


def test_export_refuses_the_models_own_folder(tmp_path, tiny_dir):
    model = copy_of(tiny_dir, tmp_path / "model")
    before = sorted(p.relative_to(model) for p in model.rglob("*"))
    r = invoke("export", "--out", model, "--model", model, "--batch-sizes", "2", "--image-size", "16", "--device", "cpu")
    assert_one_line_error(r, f"--out {model}")
    assert sorted(p.relative_to(model) for p in model.rglob("*")) == before  # no manifest, .partial or .onnx left


def test_reexport_keeps_files_an_earlier_export_did_not_write(tmp_path, engine_dir, tiny_dir):
    from conftest import EXPORT_BATCH_SIZES, EXPORT_IMAGE_SIZE
    from diffcls.export import ExportConfig, export_model

    d = copy_of(engine_dir, tmp_path / "e")
    (d / "onnx").mkdir()
    (d / "onnx" / "my_other_model.onnx").write_bytes(b"mine")
    (d / "notes.txt").write_text("mine")
    res = export_model(ExportConfig(out=d, model=tiny_dir, batch_sizes=EXPORT_BATCH_SIZES, image_size=EXPORT_IMAGE_SIZE, device="cpu"))
    assert not res.built  # everything found cached
    assert (d / "onnx" / "my_other_model.onnx").read_bytes() == b"mine" and (d / "notes.txt").read_text() == "mine"


# --- 2: outputs never overwrite inputs or each other -------------------------------------------
def test_save_errors_naming_an_input_image_or_a_results_csv_is_refused(tmp_path, tiny_dir, image_folder):
    image = image_folder / "cat" / "0.png"
    before = image.read_bytes()
    r = invoke(*classify_args(tiny_dir, image_folder, "--out", tmp_path / "v2.csv", "--save-errors", image))
    assert_one_line_error(r, f"--save-errors {image}", "not a diffcls --save-errors JSONL")
    assert image.read_bytes() == before
    other = tmp_path / "other.csv"
    assert invoke(*classify_args(tiny_dir, image_folder / "dog", "--out", other)).exit_code == 0
    before = other.read_bytes()
    r = invoke(*classify_args(tiny_dir, image_folder, "--out", tmp_path / "v3.csv", "--save-errors", other))
    assert_one_line_error(r, f"--save-errors {other}", "not a diffcls --save-errors JSONL")
    assert other.read_bytes() == before


def test_two_outputs_of_one_run_may_not_be_one_file(tmp_path, tiny_dir, image_folder):
    jo = tmp_path / "jo.csv"
    r = invoke(*evaluate_args(tiny_dir, image_folder, "--out", jo, "--json", jo))
    assert_one_line_error(r, "are the same file")
    assert not jo.exists()
    (tmp_path / "link.json").symlink_to(jo)  # the same file through a link
    r = invoke(*evaluate_args(tiny_dir, image_folder, "--out", jo, "--json", tmp_path / "link.json"))
    assert_one_line_error(r, "are the same file")
    co = tmp_path / "co.csv"
    r = invoke("calibrate", image_folder, "--model", tiny_dir, *FAST, "--results", co, "--out", co)
    assert_one_line_error(r, "are the same file")
    assert not co.exists()


def test_a_json_output_refuses_a_file_that_is_not_its_own(tmp_path, tiny_dir, image_folder):
    config = tmp_path / "config.json"
    config.write_text('{"mine": true}')
    r = invoke(*evaluate_args(tiny_dir, image_folder, "--json", config))
    assert_one_line_error(r, f"--json {config}", "not a diffcls metrics JSON")
    r = invoke("calibrate", image_folder, "--model", tiny_dir, *FAST, "--out", config)
    assert_one_line_error(r, f"--out {config}", "not a diffcls calibration JSON")
    r = invoke("profile", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--json", config)
    assert_one_line_error(r, f"--json {config}", "not a diffcls profile JSON")
    assert config.read_text() == '{"mine": true}'


# --- 3: devices, pipes and symlinks are never replaced ------------------------------------------
def test_a_pipe_as_results_out_is_refused_and_stays_a_pipe(tmp_path, tiny_dir, image_folder):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = invoke(*classify_args(tiny_dir, image_folder, "--out", fifo))
    assert_one_line_error(r, f"--out {fifo}", "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    r = invoke(*classify_args(tiny_dir, image_folder, "--out", tmp_path / "r.csv", "--save-errors", fifo))
    assert_one_line_error(r, f"--save-errors {fifo}", "not a regular file")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_whole_output_is_written_through_a_pipe_and_a_symlink(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "stdout"  # what /dev/stdout -> /proc/self/fd/1 -> a pipe is
    link.symlink_to(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    atomic_write_text(link, '{"top1": 1}')
    reader.join(10)
    assert got == [b'{"top1": 1}'] and link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    from diffcls.runtime.results.outputs import check_output

    check_output(link, "--json", "metrics")  # accepted: written through
    target = tmp_path / "real.json"  # a link to a regular file: the target is replaced, the link stays
    target.write_text('{"top1": 0}')
    link2 = tmp_path / "link.json"
    link2.symlink_to(target)
    atomic_write_text(link2, '{"top1": 2}')
    assert link2.is_symlink() and target.read_text() == '{"top1": 2}'


def test_evaluate_plot_to_a_pipe_is_written_through(tmp_path, tiny_dir, image_folder):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    fifo = tmp_path / "plot"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    r = invoke(*evaluate_args(tiny_dir, image_folder, "--plot", fifo))
    reader.join(10)
    assert r.exit_code == 0, r.output
    assert got and got[0].startswith(b"\x89PNG") and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "plot"]  # no diagram beside a pipe


# --- 4: merge writes rows as classify does ------------------------------------------------------
def test_merge_quotes_a_name_with_cr_so_the_merged_file_resumes_whole(tmp_path):
    from test_results import result

    from diffcls.runtime.results.shards import read_shard, shard_of, write_merged

    keys = ["a\r.png", "b.png", "c\r\n.png", "d.png", "e.png", "f\r.png"]
    base = {"model": "m"}
    shards = []
    for i in range(2):
        path = tmp_path / f"s{i}.csv"
        with ResultsWriter(path, {**base, "shard": f"{i}/2"}) as w:
            for j, k in enumerate(keys):
                if shard_of(k, 2) == i:
                    w.write(k, result(j, k))
        shards.append(read_shard(path))
    merged = tmp_path / "all.csv"
    assert write_merged(merged, shards) == len(keys)
    with ResultsWriter(merged, base) as w:
        assert sorted(w.done) == sorted(keys) and not w.dropped


# --- 5: --save-errors is locked like --out ------------------------------------------------------
def test_two_runs_may_not_share_a_save_errors_file(tmp_path):
    errs = tmp_path / "e.jsonl"
    with ResultsWriter(tmp_path / "a.csv", {"model": "m"}, errs):
        with pytest.raises(DiffclsError, match=rf"--save-errors {errs} is in use by another diffcls process \(PID {os.getpid()}\)"):
            ResultsWriter(tmp_path / "b.csv", {"model": "m"}, errs).open()
    assert not (tmp_path / "b.csv").exists() or (tmp_path / "b.csv").read_text() == ",".join(COLUMNS) + "\n"
    with ResultsWriter(tmp_path / "b.csv", {"model": "m"}, errs):  # released on close
        pass
    assert not (tmp_path / "e.jsonl.lock").exists()


# --- 9: a run's own outputs are never its inputs ------------------------------------------------
def test_evaluate_plot_inside_the_input_folder_is_not_an_input_on_rerun(tmp_path, tiny_dir, image_folder):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    args = evaluate_args(tiny_dir, image_folder, "--out", tmp_path / "r.csv", "--plot", image_folder / "cat" / "cm.png")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert (image_folder / "cat" / "cm.png").exists() and (image_folder / "cat" / "cm-reliability.png").exists()
    again = invoke(*args)
    assert again.exit_code == 0, again.output
    assert "6 of 6 images already done" in again.output and "changed" not in again.output
    line = next(l for l in again.output.splitlines() if l.startswith("top-1 accuracy"))
    assert line in first.output and line.endswith("/6)")


# --- 12: a full disk at the end of a run is one line, and leaves no empty file ------------------
def _full_when_writing(monkeypatch, name_part: str):
    """fsync fails with ENOSPC for the temp file of the output whose name holds `name_part`
    (what a full disk does to a write the kernel had buffered)."""
    real = os.fsync

    def fsync(fd):
        if name_part in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_for_json_and_calibration_is_one_line(tmp_path, tiny_dir, image_folder, monkeypatch):
    _full_when_writing(monkeypatch, "m.json")
    r = invoke(*evaluate_args(tiny_dir, image_folder, "--json", tmp_path / "m.json"))
    assert_one_line_error(r, f"--json {tmp_path / 'm.json'}", "No space left on device", "free some space")
    assert not (tmp_path / "m.json").exists() and not list(tmp_path.glob(".m.json.*"))
    _full_when_writing(monkeypatch, "cal.json")
    r = invoke("calibrate", image_folder, "--model", tiny_dir, *FAST, "--out", tmp_path / "cal.json")
    assert_one_line_error(r, f"--out {tmp_path / 'cal.json'}", "No space left on device")
    assert not (tmp_path / "cal.json").exists()


def test_full_disk_for_the_plot_is_one_line_and_leaves_no_empty_png(tmp_path, tiny_dir, image_folder, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    from matplotlib.figure import Figure

    real_savefig = Figure.savefig

    def savefig(self, fname, *a, **kw):  # a file the figure writes itself fills the disk part-way
        if isinstance(fname, (str, os.PathLike)):
            Path(fname).write_bytes(b"")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savefig(self, fname, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    _full_when_writing(monkeypatch, "cm.png")
    r = invoke(*evaluate_args(tiny_dir, image_folder, "--plot", tmp_path / "cm.png"))
    assert_one_line_error(r, f"--plot {tmp_path / 'cm.png'}", "No space left on device")
    assert not (tmp_path / "cm.png").exists()


def test_full_disk_during_export_is_one_line(tmp_path, tiny_dir, monkeypatch):
    from diffcls.export import pipeline

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.mf, "write_manifest", full)
    r = invoke("export", "--out", tmp_path / "e", "--model", tiny_dir, "--batch-sizes", "2", "--image-size", "16", "--device", "cpu")
    assert_one_line_error(r, f"--out {tmp_path / 'e'}", "No space left on device")
