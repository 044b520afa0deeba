"""What a run prints and writes beyond the predictions: CPU threads, progress lines when no
terminal is attached, evaluate's per-image labels and metrics, JSON reports, help at 80 columns."""

from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from diffcls.cli.app import app

runner = CliRunner()
FAST = ["--n-samples", "4,8", "--to-keep", "2,1", "--batch-size", "8"]


def invoke(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kw)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _spy_ort_threads(monkeypatch) -> list[int]:
    """Record the intra-op thread count of every ONNX Runtime session diffcls opens."""
    import onnxruntime as ort

    seen: list[int] = []
    real = ort.InferenceSession

    def session(path, options=None, *a, **kw):
        seen.append(options.intra_op_num_threads)
        return real(path, options, *a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    return seen


def test_threads_reach_torch_and_onnxruntime(engine_dir, image_folder, monkeypatch, restore_threads):
    seen = _spy_ort_threads(monkeypatch)
    r = invoke("classify", image_folder / "cat", "--engines", engine_dir, "--classes", "cat,dog",
               "--n-samples", "2,4", "--to-keep", "2,1", "--batch-size", "4", "--image-size", "16",
               "--threads", "3", "--no-cache")
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 3
    assert seen == [3, 3, 3]  # text encoder, VAE, UNet


@pytest.mark.parametrize("load, want", [(0.1, 2), (1.6, 1)])
def test_default_threads_are_the_free_cores(engine_dir, image_folder, monkeypatch, restore_threads, load, want):
    """Without --threads or $OMP_NUM_THREADS: the cores minus the load average (engines.fastpath),
    for torch and for every ONNX Runtime session alike; the run says so."""
    from diffcls.engines import fastpath

    torch.set_num_threads(1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(fastpath, "free_cores", lambda: (2, load))
    seen = _spy_ort_threads(monkeypatch)
    r = invoke("classify", image_folder / "cat" / "0.png", "--engines", engine_dir, "--classes", "cat,dog",
               "--n-samples", "2,4", "--to-keep", "2,1", "--batch-size", "4", "--image-size", "16", "--no-cache")
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == want and seen == [want] * 3  # not ORT's own default (0: all cores)
    assert f"{want} thread{'s' if want > 1 else ''} (2 cores, load {load:.1f})" in r.output


def test_threads_on_the_torch_backend(tiny_dir, image_folder, restore_threads):
    r = invoke("classify", image_folder / "cat" / "0.png", "--model", tiny_dir, "--classes", "cat,dog",
               *FAST, "--threads", "2", "--no-cache")
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 2


def test_progress_lines_when_not_a_terminal(tiny_dir, image_folder):
    """CliRunner's output is no terminal: rich's bar would show nothing until the end."""
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--batch-size", "2",
               "--no-cache", env={"DIFFCLS_PROGRESS_INTERVAL": "0"})
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if l.startswith("classify: ")]
    assert len(lines) == 6, r.output  # one per image at interval 0
    assert re.fullmatch(r"classify: 1/6 images \(17%\), [\d.]+ (img/s|s/img), elapsed \d:\d\d:\d\d, ETA \d:\d\d:\d\d", lines[0])
    assert lines[-1].startswith("classify: 6/6 images (100%)")
    r = invoke("profile", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--limit", "2",
               "--no-cache", env={"DIFFCLS_PROGRESS_INTERVAL": "0"})
    assert r.exit_code == 0, r.output
    assert [l.split(" (")[0] for l in r.output.splitlines() if l.startswith("profile: ")] == ["profile: 1/2 images", "profile: 2/2 images"]


def test_progress_lines_wait_for_the_interval():
    from rich.console import Console

    from diffcls.cli.common import LineProgress

    con = Console(record=True, force_terminal=False, width=200)
    p = LineProgress(con, interval=3600)
    task = p.add_task("classify", total=10)
    for _ in range(10):
        p.advance(task)
    assert con.export_text() == ""  # nothing before the interval has passed
    assert p.line(task).startswith("classify: 10/10 images (100%)")


def test_evaluate_csv_metrics_and_json(tmp_path, tiny_dir, image_folder):
    """Per-image label/correct columns, top-5, per-class precision/recall as scikit-learn's
    classification_report computes them, and the run's settings in --json."""
    import csv
    import json

    from sklearn.metrics import classification_report

    out, js, png = tmp_path / "r.csv", tmp_path / "m.json", tmp_path / "cm.png"
    r = invoke("evaluate", image_folder, "--model", tiny_dir, "--classes", "cat,dog,bird,fish,cow,owl", *FAST,
               "--out", out, "--json", js, "--plot", png, "--no-cache", "--seed", "3")
    assert r.exit_code == 0, r.output
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        header, got = reader.fieldnames, list(reader)
    assert header[-2:] == ["label", "correct"]
    assert len(got) == 6
    for g in got:
        assert g["label"] == g["path"].split("/")[0]
        assert g["correct"] == ("1" if g["prediction"] == g["label"] else "0")
    m = json.loads(js.read_text())
    names = [m["classes"][str(i)] for i in m["class_ids"]]
    truth = [g["label"] for g in got]
    pred = [g["prediction"] for g in got]
    rep = classification_report(truth, pred, labels=names, output_dict=True, zero_division=0)
    for i, name in enumerate(names):
        if m["support"][i]:
            assert m["recall"][i] == pytest.approx(rep[name]["recall"])
        if m["precision"][i] is not None:
            assert m["precision"][i] == pytest.approx(rep[name]["precision"])
            assert m["f1"][i] == pytest.approx(rep[name]["f1-score"])
    top5 = sum(g["label"] in [g[f"top{k}"] for k in range(1, 6)] for g in got)
    assert m["top5"] == pytest.approx(top5 / 6) and m["correct_top5"] == top5
    assert f"top-5 accuracy: {100 * top5 / 6:.2f}% ({top5}/6)" in r.output
    assert re.search(r"0 cat\W+(\d+%|-)\W+\d+%\W+(\d+%|-)\W+3\W", r.output), r.output  # the per-class table
    s = m["settings"]
    assert s["n_samples"] == [4, 8] and s["to_keep"] == [2, 1] and s["seed"] == 3 and s["no_cache"] is True
    assert s["model"] == str(tiny_dir) and s["inputs"] == [str(image_folder)] and s["labels"] == "name"
    assert s["resolved"]["backend"] == "torch" and s["resolved"]["model_fingerprint"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # resuming into a classify CSV (no label columns) is refused, not mixed
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog,bird,fish,cow,owl", *FAST,
               "--out", out, "--no-cache", "--seed", "3")
    assert r.exit_code == 2 and "other extra columns (label,correct)" in r.output, r.output


def test_evaluate_resumed_rows_count_for_top5(tmp_path, tiny_dir, image_folder):
    import json

    args = ["evaluate", image_folder, "--model", tiny_dir, "--classes", "cat,dog,bird", *FAST, "--out", tmp_path / "r.csv", "--no-cache"]
    assert invoke(*args, "--json", tmp_path / "a.json").exit_code == 0
    r = invoke(*args, "--json", tmp_path / "b.json")  # everything from the CSV this time
    assert r.exit_code == 0 and "6 of 6 images already done" in r.output, r.output
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["top5"] == b["top5"] == 1.0 and a["confusion"] == b["confusion"]


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_bf16_on_a_cpu_is_one_line(tiny_dir, image_folder, device):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("auto picks the GPU here")
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--device", device,
               "--precision", "bf16", "--no-cache")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert [l for l in r.output.splitlines() if l.startswith("error:")] == [
        "error: --precision bf16 runs on a GPU only (torch backend); use --precision fp32 on a CPU"
    ]


@pytest.mark.parametrize("command", ["classify", "evaluate", "profile", "export", "info", "cache", "digits", "shapes"])
def test_help_fits_80_columns_without_cutting(command):
    r = invoke(command, "--help", env={"COLUMNS": "80", "TERM": "dumb"})
    assert r.exit_code == 0
    assert all(len(line) <= 80 for line in r.output.splitlines()), r.output
    assert "…" not in r.output  # rich marks cut text with an ellipsis
    if command not in ("classify", "evaluate", "profile"):
        return
    flat = " ".join(part.strip("│ ") for part in r.output.splitlines())
    flat = re.sub(r"\s+", " ", flat)
    assert "CSV with columns prompt,classname,classidx (several prompts may share a classidx)." in flat
    assert "[max(n_samples)*n_trials, C, h, w]" in flat
    assert "bf16 only with the torch backend on a GPU" in flat
