"""`--adaptive` through the CLI: flags, evaluations per image in every report, resume settings."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.cli.settings import RunSettings
from conftest import assert_one_line_error

runner = CliRunner()
# no final stage here (--final-samples 0), so an image's budget is 3 prompts x 8 timesteps
ADAPTIVE = ["--adaptive", "--alpha", "0.5", "--min-samples", "3", "--max-samples", "8", "--final-samples", "0", "--batch-size", "8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_classify_adaptive_records_the_schedule_and_evals(tmp_path, tiny_dir, image_folder):
    out = tmp_path / "r.csv"
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog,bird", *ADAPTIVE, "--out", out, "--no-cache")
    assert r.exit_code == 0, r.output
    assert "UNet evals/image" in r.output
    rows = list(csv.DictReader(open(out, newline="")))
    assert len(rows) == 6
    n_evals = [int(row["n_evals"]) for row in rows]
    assert all(3 * 3 <= n <= 3 * 8 for n in n_evals)  # the first stage at least, the budget at most
    settings = json.loads((tmp_path / "r.csv.settings.json").read_text())
    sched = settings["schedule"]  # bound by value, not by a description
    assert (sched["kind"], sched["rule"], sched["alpha"], sched["min_samples"], sched["max_samples"]) == ("adaptive", "mixture", 0.5, 3, 8)
    # the same --out with the fixed schedule is refused, not mixed
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog,bird", "--n-samples", "4,8", "--to-keep", "2,1", "--out", out, "--no-cache")
    assert r.exit_code == 2 and "schedule" in r.output


def test_evaluate_json_reports_evals_per_image(tmp_path, tiny_dir, image_folder):
    metrics = tmp_path / "m.json"
    r = invoke("evaluate", image_folder, "--model", tiny_dir, *ADAPTIVE, "--json", metrics, "--out", tmp_path / "r.csv", "--no-cache")
    assert r.exit_code == 0, r.output
    m = json.loads(metrics.read_text())
    rows = list(csv.DictReader(open(tmp_path / "r.csv", newline="")))
    assert m["evals_per_image"] == sum(int(row["n_evals"]) for row in rows) / len(rows)
    assert "top1" in m and m["schedule"].startswith("adaptive")
    assert f"UNet evaluations per image: {m['evals_per_image']:.1f}" in r.output


def test_profile_shows_the_distribution_of_evals(tmp_path, tiny_dir, image_folder):
    out_json = tmp_path / "p.json"
    r = invoke("profile", image_folder, "--model", tiny_dir, "--classes", "cat,dog,car", *ADAPTIVE, "--limit", "4", "--no-cache", "--json", out_json)
    assert r.exit_code == 0, r.output
    ev = json.loads(out_json.read_text())["evals_per_image"]
    assert ev["p50"] <= ev["p90"] <= ev["max"] <= 3 * 8 and ev["mean"] * 4 == json.loads(out_json.read_text())["unet_evals"]
    assert "UNet evaluations per image: mean" in r.output and "p90" in r.output


def test_adaptive_flags_are_checked_before_any_work(tmp_path, image_folder):
    assert_one_line_error(invoke("classify", image_folder, "--adaptive", "--n-samples", "4,8", "--to-keep", "2,1"), "--adaptive replaces")
    assert_one_line_error(invoke("classify", image_folder, "--error-rate", "0.1"), "--error-rate applies to adaptive evaluation only", "add --adaptive")
    assert_one_line_error(invoke("classify", image_folder, "--adaptive", "--error-rate", "2"), "--error-rate 2 must be between 0 and 1")
    assert_one_line_error(invoke("classify", image_folder, "--adaptive", "--min-samples", "1"), "--min-samples 1")
    assert_one_line_error(invoke("classify", image_folder, "--adaptive", "--max-samples", "5000"), "--max-samples 5000")


def test_settings_build_the_adaptive_schedule():
    from diffcls.runtime.algorithm.schedule import KNOB_TO_ALPHA

    s = RunSettings.from_options(adaptive=True, error_rate=0.2, max_samples=100)
    sched = s.adaptive_schedule()
    assert (sched.error_rate, sched.alpha, sched.max_samples, sched.rule) == (0.2, None, 100, "mixture")
    assert sched.resolved_alpha == KNOB_TO_ALPHA[-1][1]  # the knob picks alpha from the measured table
    # the final stage is on by default, every survivor goes on, half of alpha is its share
    assert (sched.final_keep, sched.final_error_rate) == (0, None) and sched.final_samples > 0
    assert sched.stage_alphas == (sched.resolved_alpha / 2, sched.resolved_alpha / 2)
    sched = RunSettings.from_options(adaptive=True, alpha=0.3, final_error_rate=0.1, look_every=4).adaptive_schedule()
    assert (sched.resolved_alpha, sched.stage_alphas, sched.look_every) == (0.3, (0.3 - 0.1, 0.1), 4)
    assert RunSettings.from_options(adaptive=True, alpha=0.3, final_samples=0).adaptive_schedule().stage_alphas == (0.3, 0.0)


def test_final_stage_flags_reach_the_schedule_and_bind_the_results(tmp_path, tiny_dir, image_folder):
    out = tmp_path / "f.csv"
    strict = ["--adaptive", "--alpha", "0.5", "--min-samples", "3", "--max-samples", "4", "--batch-size", "8"]
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog,bird", *strict,
               "--final-samples", "5", "--final-keep", "2", "--final-error-rate", "0.2", "--out", out, "--no-cache")
    assert r.exit_code == 0, r.output
    n_evals = [int(row["n_evals"]) for row in csv.DictReader(open(out, newline=""))]
    assert all(n <= 3 * 4 + 2 * 5 for n in n_evals) and max(n_evals) > 3 * 4  # some image went on
    settings = json.loads((tmp_path / "f.csv.settings.json").read_text())
    sched = settings["schedule"]
    assert (sched["final_samples"], sched["final_keep"], sched["final_error_rate"]) == (5, 2, 0.2)
    # another final stage is another schedule: the same --out refuses it
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog,bird", *strict,
               "--final-samples", "9", "--out", out, "--no-cache")
    assert r.exit_code == 2 and "schedule" in r.output
    assert_one_line_error(invoke("classify", image_folder, "--model", tiny_dir, "--final-samples", "5"), "--final-samples applies to adaptive")
    assert_one_line_error(invoke("classify", image_folder, "--model", tiny_dir, "--adaptive", "--final-samples", "5", "--final-keep", "1"), "--final-keep 1 must be 0 (every survivor) or >= 2")
    assert_one_line_error(invoke("classify", image_folder, "--model", tiny_dir, "--adaptive", "--final-error-rate", "1.5"), "--final-error-rate 1.5 must be between 0 and the test's alpha")
    assert_one_line_error(invoke("classify", image_folder, "--model", tiny_dir, "--final-error-rate", "0.5"), "--final-error-rate applies to adaptive")


def test_evaluate_compare_counts_answers_that_differ(tmp_path, tiny_dir, image_folder):
    """--compare FULL.csv: how many answers differ from another run's (the full-budget answer's),
    with a 95% interval; a run against itself differs nowhere, against a doctored file where told."""
    base = ["evaluate", image_folder, "--model", tiny_dir, "--no-cache"]
    full = tmp_path / "full.csv"
    assert invoke(*base, "--n-samples", "8", "--to-keep", "1", "--batch-size", "8", "--out", full).exit_code == 0
    rows = list(csv.DictReader(open(full, newline="")))
    js = tmp_path / "m.json"
    r = invoke(*base, *ADAPTIVE, "--compare", full, "--json", js)
    assert r.exit_code == 0, r.output
    d = json.loads(js.read_text())["disagreement"]
    assert d["n"] == len(rows) and 0 <= d["differ"] <= d["n"] and d["ci95"][0] <= d["rate"] <= d["ci95"][1]
    flipped = tmp_path / "flipped.csv"
    with open(flipped, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for i, row in enumerate(rows):
            w.writerow({**row, "prediction": "nothing"} if i < 2 else row)
    r = invoke(*base, "--n-samples", "8", "--to-keep", "1", "--batch-size", "8", "--compare", flipped)
    assert r.exit_code == 0 and f"answers that differ from {flipped}: 2 of {len(rows)}" in r.output.replace("\n", "")
    assert_one_line_error(invoke(*base, *ADAPTIVE, "--compare", tmp_path / "none.csv"), "--compare", "is not a results CSV")
