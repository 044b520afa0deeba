"""One folder across many processes: `classify --shard I/N` + `diffcls merge`, and `classify --ray`.

The Ray tests start one local cluster (2 CPUs) for the module and shut it down at the end; they
run the bundled demo model on a few held-out digits with a short schedule.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.runtime.results.shards import parse_shard, shard_of
from conftest import assert_one_line_error

runner = CliRunner()
FAST = ["--n-samples", "4,8", "--to-keep", "2,1", "--batch-size", "8", "--no-cache"]
DEMO_FAST = ["--n-samples", "2,4", "--to-keep", "2,1", "--no-cache"]
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def rows(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def assert_same_results(got: dict, want: dict):
    """Row for row: the same images, predictions, rankings and evaluation counts; scores equal up
    to float32 rounding (the UNet batches group different images, which moves the 7th digit)."""
    assert sorted(got) == sorted(want)
    for key, w in want.items():
        g = got[key]
        for col, value in w.items():
            # every number computed from the errors: scores, shared-sample mean errors, probabilities
            if col.endswith(("_mean_error", "_probability")) and value:
                assert float(g[col]) == pytest.approx(float(value), rel=1e-5, abs=1e-7), (key, col)
            else:
                assert g[col] == value, (key, col)


@pytest.fixture
def digits(tmp_path):
    """Four held-out digits from examples/digits (class subfolders)."""
    root = tmp_path / "digits"
    for name in ("one", "four", "seven", "zero"):
        src = next((EXAMPLES / name).glob("*.png"))
        (root / name).mkdir(parents=True)
        shutil.copy(src, root / name / src.name)
    return root


# --- the split ------------------------------------------------------------------------------
def test_parse_shard():
    assert parse_shard("1/4") == (1, 4) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(Exception, match="--shard"):
            parse_shard(bad)


def test_shards_partition_and_do_not_move_when_files_are_added():
    keys = [f"class{c}/img_{i}.png" for c in range(5) for i in range(40)]
    n = 4
    parts = [[k for k in keys if shard_of(k, n) == i] for i in range(n)]
    assert sorted(sum(parts, [])) == sorted(keys)  # each image in exactly one shard
    assert all(25 <= len(p) <= 75 for p in parts), [len(p) for p in parts]  # roughly even
    before = {k: shard_of(k, n) for k in keys}
    more = keys + [f"new/{i}.png" for i in range(100)]
    assert {k: shard_of(k, n) for k in more if k in before} == before


# --- shards + merge ---------------------------------------------------------------------------
def test_shards_merge_equals_single_process(tmp_path, tiny_dir, image_folder):
    common = ["--model", tiny_dir, "--classes", "cat,dog,bird", *FAST]
    single = tmp_path / "single.csv"
    assert invoke("classify", image_folder, *common, "--out", single, "--save-errors", tmp_path / "single.jsonl").exit_code == 0
    for i in range(2):
        r = invoke("classify", image_folder, *common, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}.csv",
                   "--save-errors", tmp_path / f"s{i}.jsonl")
        assert r.exit_code == 0, r.output
    s0, s1 = rows(tmp_path / "s0.csv"), rows(tmp_path / "s1.csv")
    assert s0 and s1 and not set(s0) & set(s1)
    assert all(shard_of(k, 2) == 0 for k in s0) and all(shard_of(k, 2) == 1 for k in s1)

    merged, merged_errors = tmp_path / "merged.csv", tmp_path / "merged.jsonl"
    r = invoke("merge", "--out", merged, tmp_path / "s0.csv", tmp_path / "s1.csv", "--folder", image_folder,
               "--save-errors", merged_errors, "--errors", tmp_path / "s0.jsonl", "--errors", tmp_path / "s1.jsonl")
    assert r.exit_code == 0, r.output
    assert "merged 2 shards: 6 images of 6" in r.output
    assert_same_results(rows(merged), rows(single))
    recs = [json.loads(line) for line in merged_errors.read_text().splitlines()]
    assert sorted(rec["path"] for rec in recs) == sorted(rows(single))
    # the merged file is what one process would have written: resuming it has nothing left to do
    assert json.loads((tmp_path / "merged.csv.settings.json").read_text()) == json.loads((tmp_path / "single.csv.settings.json").read_text())
    r = invoke("classify", image_folder, *common, "--out", merged, "--save-errors", merged_errors)
    assert r.exit_code == 0 and "6 of 6 images already done" in r.output, r.output


def test_a_shard_resumes_only_as_the_same_shard(tmp_path, tiny_dir, image_folder):
    common = ["--model", tiny_dir, "--classes", "cat,dog", *FAST]
    out = tmp_path / "s0.csv"
    assert invoke("classify", image_folder, *common, "--shard", "0/2", "--out", out).exit_code == 0
    n = len(rows(out))
    r = invoke("classify", image_folder, *common, "--shard", "0/2", "--out", out)
    assert r.exit_code == 0 and f"{n} of {n} images already done" in r.output, r.output
    assert_one_line_error(invoke("classify", image_folder, *common, "--shard", "1/2", "--out", out), "shard")


@pytest.fixture
def two_shards(tmp_path, tiny_dir, image_folder):
    common = ["--model", tiny_dir, "--classes", "cat,dog", *FAST]
    for i in range(2):
        assert invoke("classify", image_folder, *common, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}.csv").exit_code == 0
    return common, tmp_path / "s0.csv", tmp_path / "s1.csv"


def test_merge_refuses_a_shard_with_other_settings(tmp_path, image_folder, two_shards):
    common, s0, _ = two_shards
    other = tmp_path / "other1.csv"
    assert invoke("classify", image_folder, *common, "--seed", "7", "--shard", "1/2", "--out", other).exit_code == 0
    r = invoke("merge", tmp_path / "m.csv", s0, other, "--folder", image_folder)
    assert_one_line_error(r, "other1.csv was written with other settings", "seed")
    assert not (tmp_path / "m.csv").exists()


def test_merge_reports_a_missing_shard_and_missing_images(tmp_path, image_folder, two_shards):
    _, s0, s1 = two_shards
    out = tmp_path / "m.csv"
    r = invoke("merge", out, s0, "--folder", image_folder)
    assert_one_line_error(r, "do not cover every image")
    assert "shard 1/2 missing" in r.output and not out.exists()
    # an interrupted shard: its last row is gone, so that image is reported by name
    lines = s1.read_text().splitlines(keepends=True)
    lost = next(csv.reader([lines[-1]]))[0]
    s1.write_text("".join(lines[:-1]))
    r = invoke("merge", out, s0, s1, "--folder", image_folder)
    assert_one_line_error(r, "do not cover every image")
    assert "shard 1/2" in r.output and "lacks 1 images" in r.output and lost in r.output
    r = invoke("merge", out, s0, s1, "--folder", image_folder, "--allow-missing")
    assert r.exit_code == 0, r.output
    assert len(rows(out)) == 5


def test_merge_refuses_duplicates(tmp_path, image_folder, two_shards):
    _, s0, s1 = two_shards
    assert_one_line_error(invoke("merge", tmp_path / "m.csv", s0, s1, s0, "--folder", image_folder), "shard 0/2 is given 2 times")
    # the same image twice inside one shard file (e.g. concatenated by hand)
    lines = s0.read_text().splitlines(keepends=True)
    s0.write_text("".join(lines) + lines[1])
    r = invoke("merge", tmp_path / "m.csv", s0, s1, "--folder", image_folder)
    assert_one_line_error(r, "1 images have more than one row")
    assert "more than one row: " + next(csv.reader([lines[1]]))[0] in r.output


def test_merge_needs_shard_files(tmp_path, tiny_dir, image_folder):
    out = tmp_path / "whole.csv"
    assert invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out).exit_code == 0
    assert_one_line_error(invoke("merge", tmp_path / "m.csv", out), "was not written with --shard")


# --- Ray: options and packaging (no cluster needed) ---------------------------------------------
def test_ray_options_need_ray(tiny_dir, image_folder):
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", "--ray-workers", "2")
    assert_one_line_error(r, "--ray-workers only apply with --ray")


def test_ray_missing_extra(monkeypatch, tiny_dir, image_folder):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--ray")
    assert_one_line_error(r, 'pip install -e ".[ray]"')


def test_worker_that_cannot_open_engines_reports_one_line():
    """The actor's constructor never raises: its batches come back as 'fatal' rows naming it."""
    import numpy as np

    from diffcls.runtime.execution.distributed import ScoreWorker, WorkerSpec
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule

    spec = WorkerSpec(classifier={"backend": "torch", "device": "cuda:7"}, prompts=PromptSet.from_classes("a,b", "{}"),
                      schedule=Schedule((2, 4), (2, 1)))
    w = ScoreWorker(spec)
    out = w({"i": np.array([3, 5]), "path": np.array([b"/x/a.png", b"/x/b.png"], dtype=object)})
    assert list(out["i"]) == [3, 5] and set(out["kind"]) == {"fatal"}
    assert out["payload"][0].startswith("cannot open the engines: ") and "cuda" in out["payload"][0].lower()
    assert str(os.getpid()) in out["worker"][0]


def test_classifier_encodes_the_same_prompts_once(tiny):
    """A Ray worker scores one small batch after another: the prompts are encoded once."""
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.data.prompts import PromptSet

    clf = Classifier.from_pretrained(tiny, use_cache=False)
    calls = []
    encoder = clf.engines.text_encoder

    class Counting:
        batch_sizes = encoder.batch_sizes
        spec = encoder.spec  # the runtime reads the input's name from the component's spec

        def __call__(self, feed):
            calls.append(len(feed["input_ids"]))
            return encoder(feed)

    clf.engines.text_encoder = Counting()
    first = clf.encode_prompts(PromptSet.from_classes("cat,dog", "a {}"))
    again = clf.encode_prompts(PromptSet.from_classes("cat,dog", "a {}"))
    assert len(calls) == 1 and again is first
    other = clf.encode_prompts(PromptSet.from_classes("cat,bird", "a {}"))  # other prompts: encoded
    assert len(calls) == 2 and not other.equal(first)


# --- Ray: a local cluster -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield ray
    ray.shutdown()


def test_ray_equals_single_process_and_resumes(tmp_path, digits, ray_cluster):
    single = tmp_path / "single.csv"
    r = invoke("classify", digits, *DEMO_FAST, "--out", single)
    assert r.exit_code == 0, r.output
    out = tmp_path / "ray.csv"
    r = invoke("classify", digits, *DEMO_FAST, "--ray", "--ray-workers", "2", "--out", out, "--save-errors", tmp_path / "ray.jsonl")
    assert r.exit_code == 0, r.output
    assert "classified 4 images" in r.output and "per worker: " in r.output
    assert_same_results(rows(out), rows(single))
    assert json.loads((tmp_path / "ray.csv.settings.json").read_text()) == json.loads((tmp_path / "single.csv.settings.json").read_text())
    assert len((tmp_path / "ray.jsonl").read_text().splitlines()) == 4

    # a driver killed after two images: the rerun dispatches only the other two
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))
    r = invoke("classify", digits, *DEMO_FAST, "--ray", "--ray-workers", "2", "--out", out)
    assert r.exit_code == 0, r.output
    assert "2 of 4 images already done" in r.output and "classified 2 images" in r.output
    assert_same_results(rows(out), rows(single))


def test_ray_worker_killed_mid_run_loses_and_duplicates_nothing(tmp_path, digits, ray_cluster):
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.execution.distributed import RayRunner, WorkerSpec
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule

    paths = [str(p) for p in sorted(digits.rglob("*.png"))]
    prompts = PromptSet.from_classes("zero,one,two,three,four,five,six,seven,eight,nine", "{}")
    schedule = Schedule((2, 4), (2, 1))
    want = {r.source: r for r in Classifier.from_pretrained(use_cache=False).classify(paths, prompts, schedule)}
    spec = WorkerSpec(classifier={"use_cache": False}, prompts=prompts, schedule=schedule)
    got, killed = [], []
    with RayRunner(spec, workers=2) as ray_runner:
        for r in ray_runner.iter_classify(paths):
            got.append(r)
            if not killed:  # kill the worker that just answered (it has moved on to its next image)
                name = next(iter(ray_runner.worker_stats))
                pid = int(name.rsplit(":", 1)[1])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    assert killed
    assert sorted(r.source for r in got) == sorted(paths)  # every image exactly once
    for r in got:
        w = want[r.source]
        assert (r.prediction, r.ranking, r.n_evals) == (w.prediction, w.ranking, w.n_evals)
        assert r.scores == pytest.approx(w.scores, rel=1e-5)


def test_ray_worker_that_cannot_open_engines_stops_the_run(tmp_path, digits, ray_cluster):
    r = invoke("classify", digits, *DEMO_FAST, "--ray", "--device", "cuda", "--out", tmp_path / "r.csv")
    assert_one_line_error(r, "Ray worker ", "cannot open the engines", "--device cuda")


def test_evaluate_ray_json_matches_one_process(tmp_path, digits, ray_cluster):
    """--json records what ran whichever executor ran it (it once read a classifier Ray lacks)."""
    single, ray_json = tmp_path / "single.json", tmp_path / "ray.json"
    assert invoke("evaluate", digits, *DEMO_FAST, "--json", single).exit_code == 0
    r = invoke("evaluate", digits, *DEMO_FAST, "--ray", "--ray-workers", "2", "--json", ray_json)
    assert r.exit_code == 0, r.output
    want, got = json.loads(single.read_text()), json.loads(ray_json.read_text())
    for key in ("top1", "top5", "confusion", "evals_per_image", "schedule", "classes"):
        assert got[key] == want[key], key
    assert got["settings"]["resolved"]["executor"] == "ray" and want["settings"]["resolved"]["executor"] == "local"
    for key in ("backend", "precision", "image_size", "model_fingerprint", "schedule_settings"):
        assert got["settings"]["resolved"][key] == want["settings"]["resolved"][key], key


def test_ray_adaptive_matches_one_process(tmp_path, digits, ray_cluster):
    """Each worker scores its images in one Scorer; the adaptive schedule gives the same answers."""
    adaptive = ["--adaptive", "--min-samples", "2", "--max-samples", "6", "--final-samples", "4", "--no-cache"]
    single, out = tmp_path / "single.csv", tmp_path / "ray.csv"
    assert invoke("classify", digits, *adaptive, "--out", single).exit_code == 0
    r = invoke("classify", digits, *adaptive, "--ray", "--ray-workers", "2", "--out", out)
    assert r.exit_code == 0, r.output
    assert_same_results(rows(out), rows(single))


def test_ray_tasks_carry_many_images(tmp_path):
    """Several images per task (one Scorer's cross-image batches), several tasks per worker."""
    from diffcls.runtime.execution.distributed import RayRunner, WorkerSpec
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule

    spec = WorkerSpec(classifier={}, prompts=PromptSet.from_classes("a,b", "{}"), schedule=Schedule((2, 4), (2, 1)))
    assert isinstance(spec.prompts, dict) and isinstance(spec.schedule, dict)  # plain values travel
    runner = RayRunner(spec, workers=2)
    assert runner._per_task(4) == 1 and runner._per_task(400) == 50 and runner._per_task(100_000) == 64
