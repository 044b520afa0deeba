"""What the CLI prints is the library's: a script or a notebook gets the same tables with
`rich.print(...)` (diffcls.render and the views beside each result), no CLI involved."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.runtime.evaluation.evaluate import LabelKind, evaluation, metrics_view
from diffcls.runtime.execution.job import ClassifyJob
from diffcls.runtime.execution.profiling import profile_job, report_view
from diffcls.runtime.execution.spec import JobSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits"
SPEC = JobSpec(n_samples=(2, 4), to_keep=(2, 1), no_cache=True, backend="torch")
FAST = ["--n-samples", "2,4", "--to-keep", "2,1", "--no-cache", "--backend", "torch"]


def shown(renderable, width: int = 200) -> str:
    con = Console(width=width, file=io.StringIO(), record=True, highlight=False, soft_wrap=True)
    con.print(renderable)
    return con.export_text()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("render") / "digits"
    shutil.copytree(EXAMPLES, folder)
    return folder


@pytest.fixture(scope="module")
def job(digits):
    with ClassifyJob(SPEC, [digits], labels=LabelKind.name) as job:
        job.run()
    return job


def test_a_job_prints_one_row_per_image_with_its_prediction_and_runner_up(job):
    text = shown(job)  # rich.print(job)
    assert "runner-up" in text.splitlines()[1] and "probability" not in text
    body = [line for line in text.splitlines() if "/heldout_" in line]
    assert len(body) == len(job.results) == 10
    for line in body:
        key = line.split("│")[1].strip()
        r = job.results[key]
        assert line.split("│")[2].strip() == r.prediction and f"{r.ranked[0].mean_error:.4g}" in line
        assert r.ranked[1].classname in line.split("│")[4]


def test_one_image_prints_its_ranking_as_classify_prints_it(digits):
    image = digits / "three" / "heldout_0003.png"
    with ClassifyJob(SPEC, [image]) as one:
        one.run()
    text = shown(one.table(3), width=80)
    rows = [line for line in text.splitlines() if line.startswith("│ ") and line[2].isdigit()]
    assert [line.split("│")[2].strip() for line in rows] == [c.classname for c in one.results["heldout_0003.png"].ranked[:3]]
    assert "heldout_0003.png" in text.splitlines()[0] and "--calibration FILE adds probabilities" in text
    cli = CliRunner().invoke(app, ["classify", str(image), *FAST, "--top-k", "3"], env={"COLUMNS": "80"})
    assert cli.exit_code == 0, cli.output
    assert text in cli.stdout  # the CLI prints exactly this table


def test_evaluation_metrics_render_with_a_row_per_class(job):
    m, _ = evaluation(job)
    text = shown(metrics_view(m, job.prompts.classes))
    assert text.startswith(f"top-1 accuracy: {100 * m['top1']:.2f}% ({m['correct']}/10)")
    for i, name in job.prompts.classes.items():
        assert sum(line.lstrip("│ ").startswith(f"{i} {name} ") for line in text.splitlines()) == 2  # per class and confusion
    assert "confusion (rows: true, columns: predicted class id)" in text


def test_a_profile_report_renders_its_stages(digits):
    job = ClassifyJob(JobSpec(n_samples=(2,), to_keep=(1,), no_cache=True, backend="torch", limit=1), [digits]).open()
    report = profile_job(job)
    text = shown(report_view(report))
    assert "diffcls profile (1 images)" in text and "UNet, all calls" in text


def test_a_model_renders_its_components():
    from diffcls.models.describe import model_view

    text = shown(model_view("demo"))
    assert "model directory" in text and "unet" in text and "export engines with: diffcls export --model demo" in text


def test_an_export_reporter_shows_a_line_per_finished_step():
    """`export_model`'s events through `SpinnerReporter`: a step's spinner is gone when it ends;
    finished and cached steps leave one line each, an info event its message."""
    from diffcls.export import SpinnerReporter, StepEvent

    con = Console(width=120, file=io.StringIO(), record=True)
    with SpinnerReporter(con) as report:
        report(StepEvent("start", "unet onnx"))
        assert [t.description for t in report.progress.tasks] == ["unet onnx"]
        report(StepEvent("done", "unet onnx", "export success 1.0 s"))
        report(StepEvent("cached", "vae_encoder onnx", "found cached vae_encoder.onnx"))
        report(StepEvent("info", "manifest", "written"))
        assert report.progress.tasks == [] and report.tasks == {}
    assert con.export_text().strip().splitlines() == ["unet onnx: export success 1.0 s", "vae_encoder onnx: found cached vae_encoder.onnx", "manifest: written"]
