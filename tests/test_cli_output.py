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


def test_default_threads_are_the_cores_torch_sees(engine_dir, image_folder, monkeypatch, restore_threads):
    torch.set_num_threads(2)
    seen = _spy_ort_threads(monkeypatch)
    r = invoke("classify", image_folder / "cat" / "0.png", "--engines", engine_dir, "--classes", "cat,dog",
               "--n-samples", "2,4", "--to-keep", "2,1", "--batch-size", "4", "--image-size", "16", "--no-cache")
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 2 and seen == [2, 2, 2]  # not ORT's own default (0: all cores)


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
