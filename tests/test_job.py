"""The run as a library object: `ClassifyJob` / `JobSpec` do what the CLI does (resume, the
results file, the model's defaults), and results files written by earlier versions resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.runtime.execution.job import ClassifyJob
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule, schedule_from_dict
from diffcls.runtime.execution.spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "digits"
# results files (and a calibration) written by diffcls at commit 56e7f0d, which bound them to the
# schedule's description; the commands that wrote them are the ones the test resumes them with
LEGACY = Path(__file__).resolve().parent / "data" / "results-56e7f0d"
# torch named: on a CPU the CLI's default for the bundled model is its cached ONNX Runtime
# engines (diffcls.api.with_engines), the runtime's ClassifyJob's is torch; the fixtures were written with torch
FAST = ["--n-samples", "2,4", "--to-keep", "2,1", "--no-cache", "--backend", "torch"]
TORCH = ["--backend", "torch"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def assert_same_rows(got: dict, want: dict):
    """The same images, predictions, rankings and counts; numbers equal up to float32 rounding
    (a resumed run batches other images together, which moves the 7th digit)."""
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        for col, value in w.items():
            if value and (col in ("score", "probability") or col.endswith(("_score", "_mean_error", "_probability"))):
                assert float(got[key][col]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), (key, col)
            else:
                assert got[key][col] == value, (key, col)


@pytest.fixture
def digits(tmp_path):
    root = tmp_path / "digits"
    shutil.copytree(EXAMPLES, root)
    return root


def test_spec_and_schedules_round_trip_as_plain_values():
    spec = JobSpec(model="demo", n_samples=(10, 50), to_keep=(3, 1), backend="torch", loss="huber", seed=3)
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d and d["backend"] == "torch" and d["n_samples"] == [10, 50]
    assert JobSpec.from_dict(d) == spec
    for s in (Schedule((2, 4), (2, 1), 2, "l1"), AdaptiveSchedule(error_rate=0.2, rule="kim-nelson", final_samples=0)):
        assert schedule_from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(Exception, match="unknown settings"):
        JobSpec.from_dict({"n_sample": [1]})


def test_from_pretrained_carries_the_model_defaults():
    """The demo's diffcls.json (prompts, schedule, image size) travels with the Classifier, as
    the CLI applies it: classify() without prompts or schedule scores like `diffcls classify`."""
    from diffcls.runtime.execution.classifier import Classifier

    clf = Classifier.from_pretrained(use_cache=False)
    assert clf.engines.image_size == 32 and clf.defaults["n_samples"] == [10, 50]
    prompts = clf.default_prompts()
    assert len(prompts) == 10 and prompts.classnames[0] == "zero"
    assert clf.default_schedule(len(prompts)) == Schedule((10, 50), (3, 1))
    image = next(EXAMPLES.glob("seven/*.png"))
    (r,) = clf.classify([image], schedule=Schedule((2, 4), (2, 1)))
    (want,) = clf.classify([image], prompts, Schedule((2, 4), (2, 1)))
    assert (r.classname, r.ranking, r.scores) == (want.classname, want.ranking, want.scores)


_KILLED_RUN = """
import os, signal, sys
from diffcls.runtime.execution.job import ClassifyJob
from diffcls.runtime.execution.spec import JobSpec
spec = JobSpec(n_samples=(2, 4), to_keep=(2, 1), no_cache=True)
for i, _ in enumerate(ClassifyJob(spec, [sys.argv[1]], out=sys.argv[2], save_errors=sys.argv[3]), 1):
    if i == 4:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_python_api_resumes_a_killed_run_and_writes_what_the_cli_writes(tmp_path, digits):
    cli_out = tmp_path / "cli.csv"
    assert invoke("classify", digits, *FAST, "--out", cli_out, "--save-errors", tmp_path / "cli.jsonl").exit_code == 0
    out, errors = tmp_path / "api.csv", tmp_path / "api.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(digits), str(out), str(errors)], env=env, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr  # killed, not finished
    n_before = len(rows(out))
    assert 4 <= n_before < 10  # every acknowledged row is on disk (a writer thread may have done more)

    job = ClassifyJob(JobSpec(n_samples=(2, 4), to_keep=(2, 1), no_cache=True), [digits], out=out, save_errors=errors)
    results = job.run()
    assert any(n.startswith(f"resuming {out}: ") for n in job.notes)
    assert len(job.todo) == job.n_done == 10 - n_before and len(results) == 10
    assert_same_rows(rows(out), rows(cli_out))
    assert json.loads(out.with_name("api.csv.settings.json").read_text()) == json.loads((tmp_path / "cli.csv.settings.json").read_text())
    assert sorted(json.loads(line)["path"] for line in errors.read_text().splitlines()) == sorted(rows(cli_out))
    # and the CLI resumes the file the API wrote: nothing left to do
    r = invoke("classify", digits, *FAST, "--out", out, "--save-errors", errors)
    assert r.exit_code == 0 and "10 of 10 images already done" in r.output, r.output


@pytest.mark.parametrize(
    "name, command, args",
    [
        ("adaptive", "classify", ["--adaptive", "--min-samples", "2", "--max-samples", "4", "--final-samples", "2", "--final-keep", "2", "--no-cache", *TORCH]),
        ("evaluate", "evaluate", ["--adaptive", "--alpha", "0.5", "--rule", "kim-nelson", "--rel-delta", "0.1", "--min-samples", "2", "--max-samples", "4", "--final-samples", "0", "--no-cache", *TORCH]),
    ],
)
def test_adaptive_results_of_the_old_rule_are_not_mixed_with_todays(tmp_path, digits, name, command, args):
    """--adaptive's rule changed in round 4 (no bare cut, restarted final stage, one-sided): an
    older adaptive results file is refused with the reason, not resumed under another rule."""
    out = _legacy_copy(tmp_path, name, digits)
    r = invoke(command, digits, *args, "--out", out)
    assert r.exit_code == 2 and "was written with other settings" in r.output and "(before round 4)" in r.output


def _legacy_copy(tmp_path: Path, name: str, root: Path) -> Path:
    """The fixture files of `name`, with the input folder they record moved to `root`."""
    for f in LEGACY.glob(f"{name}.*"):
        shutil.copy(f, tmp_path / f.name)
    sp = tmp_path / f"{name}.csv.settings.json"
    settings = json.loads(sp.read_text())
    assert isinstance(settings["schedule"], str)  # the old form: a description
    sp.write_text(json.dumps({**settings, "root": os.path.abspath(root)}))
    return tmp_path / f"{name}.csv"


@pytest.mark.parametrize(
    "name, command, args",
    [
        ("fixed", "classify", FAST),
        ("calibrated", "classify", [*FAST, "--calibration", LEGACY / "calibration.json"]),
    ],
)
def test_results_files_of_earlier_versions_resume(tmp_path, digits, name, command, args):
    out = _legacy_copy(tmp_path, name, digits)
    before = rows(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-2]))  # killed two images before the end
    extra = ["--save-errors", tmp_path / f"{name}.jsonl"] if (tmp_path / f"{name}.jsonl").exists() else []
    r = invoke(command, digits, *args, "--out", out, *extra)
    assert r.exit_code == 0, r.output
    assert "8 of 10 images already done" in r.output and "classified 2 images" in r.output
    assert_same_rows(rows(out), before)
    settings = json.loads(out.with_name(out.name + ".settings.json").read_text())
    assert isinstance(settings["schedule"], dict)  # rewritten in today's form
    # another schedule is still refused, naming what differs
    other = [{"4": "6", "2,4": "2,6"}.get(a, a) for a in args]  # 4 timesteps -> 6
    r = invoke(command, digits, *other, "--out", out, *extra)
    assert r.exit_code == 2 and "schedule" in r.output, r.output  # (a calibration refuses it first)


def test_latents_come_ahead_in_order_errors_and_closing_included():
    """`ahead` runs the latent stream on a thread: same items in the same order, its errors
    raised where they are consumed, and a consumer that stops early stops and closes it."""
    import threading

    from diffcls.runtime.execution.classifier import ahead

    assert list(ahead(iter(range(100)), depth=4)) == list(range(100))

    def failing():
        yield 1
        raise ValueError("bad image")

    got = []
    with pytest.raises(ValueError, match="bad image"):
        for x in ahead(failing(), depth=2):
            got.append(x)
    assert got == [1]
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    stream = ahead(endless(), depth=3)
    assert [next(stream) for _ in range(5)] == [0, 1, 2, 3, 4]
    stream.close()
    assert closed.is_set()  # the producer closed its generator on its own thread


def test_adaptive_takes_the_models_own_timestep_weights(tmp_path, digits):
    """The demo's diffcls.json carries the timestep weights its --adaptive knob was measured with
    (fitted on the digits train split): --adaptive with the model's prompts uses them, says so,
    and binds them; --calibration or other prompts replace them."""
    from diffcls.models.loading import model_defaults

    want = tuple(model_defaults(None)["timestep_weights"])
    assert want and want[0] == 0.0  # t < 100 dropped: the fit's signature on the digits
    small = dict(adaptive=True, min_samples=2, max_samples=4, final_samples=2, no_cache=True)
    job = ClassifyJob(JobSpec(**small), [digits], out=tmp_path / "a.csv", save_errors=tmp_path / "e.jsonl")
    results = job.run()
    assert job.schedule.band_weights == want and len(results) == 10
    assert any("model's timestep weights" in n for n in job.notes)
    ts = [t for line in (tmp_path / "e.jsonl").read_text().splitlines() for _, t, *_ in json.loads(line)["errors"]]
    first_kept = 1000 // len(want) * next(b for b, w in enumerate(want) if w > 0)
    assert first_kept > 0 and ts and min(ts) >= first_kept  # the dropped bands (t below the first kept one) get no evaluation
    other = ClassifyJob(JobSpec(**small, classes=["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]), [digits])
    other.open()
    assert other.schedule.band_weights is None and not any("timestep weights" in n for n in other.notes)
    fixed = ClassifyJob(JobSpec(n_samples=(2, 4), to_keep=(2, 1), no_cache=True), [digits])
    fixed.open()
    assert fixed.schedule.band_weights is None  # the fixed default keeps the paper's unweighted rounds
