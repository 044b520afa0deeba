"""One ranking per image (issue 23 items 1-3): the prediction, the table, the results CSV's
top-5, the probabilities and the --save-errors record all agree; calibration is bound to what
it was fitted on; full-precision mean errors make a resumed calibration identical (issue 24 item 10)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from typer.testing import CliRunner

from conftest import EXAMPLES, FAST_DIGITS, assert_one_line_error, csv_rows, invoke_cli
from diffcls.runtime.evaluation.calibration import Calibration
from diffcls.runtime.algorithm.policy import FixedPolicy
from diffcls.runtime.algorithm.schedule import Schedule

FAST = FAST_DIGITS
runner = CliRunner()
invoke, rows = invoke_cli, csv_rows


def _fixed_run(error):
    """Run the paper's schedule (n_samples 2 4, to_keep 3 1) over `error(prompt, t)`; returns
    (errors, ranking, final) as the scoring loop records them."""
    policy = FixedPolicy(Schedule((2, 4), (3, 1)), 5, 1000)
    errors = []
    while not policy.done:
        for c, k, j in policy.next_block():
            e = error(c, policy.timesteps[k])
            errors.append((c, policy.timesteps[k], j, e))
            policy.feed(c, k, j, e)
    res = policy.result()
    return errors, res.ranking, res.final


def test_the_prediction_tops_every_number_even_when_round_one_favours_another():
    # prompt 1 has the lower errors on round 1's timesteps (t < 500 here), prompt 0 on the later
    # ones, by enough to win over all of them: the schedule predicts 0. The old shared means
    # (round 1 only, what the top-5 share) ranked 1 first.
    def error(c, t):
        base = {0: 0.30, 1: 0.29, 2: 0.33, 3: 0.40, 4: 0.45}[c]
        return base + (0.05 if c == 1 and t > 400 else 0.0)

    from diffcls.runtime.algorithm.ranking import probabilities, rank_classes, row_cells, rows_from_cells

    errors, ranking, final = _fixed_run(error)
    assert ranking[0] == 0 and sorted(final) == [0, 1, 2]
    names = ["zero", "one", "two", "three", "four"]
    rows_, n = rank_classes(errors, ranking, final, list(range(5)), names)
    assert [r.classname for r in rows_] == ["zero", "one", "two", "three", "four"]
    # the final decision's means are over the samples its three prompts share: all 4 timesteps
    assert n == 4
    by_hand = {c: sum(e for p, _, _, e in errors if p == c) / sum(1 for p, *_ in errors if p == c) for c in range(5)}
    assert [r.mean_error for r in rows_[:3]] == pytest.approx([by_hand[0], by_hand[1], by_hand[2]])
    assert rows_[0].mean_error <= rows_[1].mean_error <= rows_[2].mean_error
    # pruned after round 1 (2 timesteps): own means, probability 0
    assert [r.pruned_after for r in rows_] == [None, None, None, 2, 2]
    p = probabilities(rows_, 0.01)
    assert p[0] == max(p) and p[3] == p[4] == 0.0 and sum(p) == pytest.approx(1.0)
    # a results row reads back to the very same numbers (repr floats)
    back = rows_from_cells(row_cells(rows_, 0.01), {n_: i for i, n_ in enumerate(names)})
    assert back == rows_


def _check_row(row, calibrated=True):
    """The invariants of one results row: the ranking starts at the prediction, the final
    decision's classes come first with non-decreasing mean errors and the highest probability
    at the prediction; classes pruned before it have probability 0."""
    names = [row[f"top{i}"] for i in range(1, 6) if row[f"top{i}"]]
    assert names[0] == row["prediction"], row
    probs = [float(row[f"top{i}_probability"]) for i in range(1, len(names) + 1)] if calibrated else None
    if calibrated:
        assert probs[0] == max(probs), row  # the shown probabilities follow the prediction
    pruned = [row[f"top{i}_pruned_after"] != "" for i in range(1, len(names) + 1)]
    assert pruned == sorted(pruned), row  # final-decision classes first
    final = [float(row[f"top{i}_mean_error"]) for i in range(1, len(names) + 1) if not pruned[i - 1]]
    assert final == sorted(final), row  # lower is better, the prediction first
    if calibrated:
        assert all(p == 0.0 for p, out in zip(probs, pruned) if out), row


def test_every_shown_ranking_agrees_with_the_prediction(tmp_path, monkeypatch):
    """On the examples with --to-keep 3 1 (nine/heldout_0019 is predicted "nine" while "one"
    has the lower round-1 mean): CSV, table, errors record and probabilities all follow the prediction."""
    from diffcls.cli.common import out as out_console

    folder = tmp_path / "digits"
    shutil.copytree(EXAMPLES, folder)
    cal = tmp_path / "cal.json"
    r = invoke("calibrate", folder, "--out", cal, *FAST)
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(out_console, "width", 250)  # one table row per line
    out, errs = tmp_path / "r.csv", tmp_path / "e.jsonl"
    r = invoke("classify", folder, *FAST, "--calibration", cal, "--out", out, "--save-errors", errs)
    assert r.exit_code == 0, r.output
    got = {row["path"]: row for row in rows(out)}
    assert len(got) == 10
    recs = {json.loads(line)["path"]: json.loads(line) for line in errs.read_text().splitlines()}
    for key, row in got.items():  # first what any version's file shows: the prediction's probability is the highest
        probs = [float(row[f"top{i}_probability"]) for i in range(1, 6)]
        assert row["top1"] == row["prediction"] and probs[0] == max(probs), row
    for key, row in got.items():
        _check_row(row)
        rec = recs[key]
        assert [t["classname"] for t in rec["top"]] == [row[f"top{i}"] for i in range(1, 6)]
        assert rec["top"][0]["probability"] == max(t["probability"] for t in rec["top"])
        # a plain re-implementation from the errors: the final decision is between the prompts
        # scored at every timestep (to-keep 3 1: the three that survived round 1), by their means
        per = {}
        for p, t, j, e in rec["errors"]:
            per.setdefault(p, []).append(e)
        most = max(len(v) for v in per.values())
        means = sorted((sum(v) / len(v), p) for p, v in per.items() if len(v) == most)
        assert [rec["scores"][p]["classname"] for _, p in means] == [row[f"top{i}"] for i in range(1, 4)]
        assert [float(row[f"top{i}_mean_error"]) for i in range(1, 4)] == pytest.approx([m for m, _ in means], rel=1e-12)
        # the table: the prediction, its probability, and a runner-up that does not beat it
        line = next(line for line in r.output.splitlines() if key in line)
        cells = [c.strip() for c in line.split("│")[1:-1]]
        assert cells[1] == row["prediction"] and float(cells[3]) == pytest.approx(float(row["top1_probability"]), abs=1e-3)
        m = re.fullmatch(r"(\w+) \(([\d.e-]+), p ([\d.]+)\)", cells[4])
        assert m and m.group(1) == row["top2"] and float(m.group(3)) <= float(cells[3]), cells
        assert float(m.group(2)) >= float(cells[2])


def test_uncalibrated_results_have_no_probability_columns(tmp_path):
    out = tmp_path / "r.csv"
    r = invoke("classify", EXAMPLES / "nine", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    header = out.read_text().splitlines()[0].split(",")
    assert not [c for c in header if "probability" in c or c.endswith("_score") or c == "score"]
    assert header[:5] == ["path", "prediction", "classidx", "n_evals", "sha256"] and len(header) == 20
    for row in rows(out):
        _check_row(row, calibrated=False)


def test_an_old_results_file_is_refused_in_one_line(tmp_path):
    """Files written before the one ranking (top1_score ... columns) cannot be resumed: their
    top-5 and probabilities followed other numbers."""
    out = tmp_path / "old.csv"
    r = invoke("classify", EXAMPLES / "nine", *FAST, "--out", out)
    assert r.exit_code == 0
    old = "path,prediction,classidx,score,n_evals,top1,top1_score,top2,top2_score,top3,top3_score,top4,top4_score,top5,top5_score,sha256"
    text = out.read_text().splitlines()
    out.write_text(old + "\n")
    assert_one_line_error(invoke("classify", EXAMPLES / "nine", *FAST, "--out", out), "earlier diffcls version", "another --out")
    out.write_text("\n".join(text) + "\n")  # today's file resumes
    r = invoke("classify", EXAMPLES / "nine", *FAST, "--out", out)
    assert r.exit_code == 0 and "1 of 1 images already done" in r.output


def test_a_calibration_is_refused_for_another_model_prompts_or_schedule(tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(EXAMPLES, folder)
    cal = tmp_path / "cal.json"
    assert invoke("calibrate", folder, "--out", cal, *FAST).exit_code == 0
    c = json.loads(cal.read_text())
    assert c["model"] and c["prompts"] and c["schedule"] == {"kind": "fixed", "n_samples": [4, 8], "to_keep": [3, 1], "n_trials": 1, "loss": "l2"}
    one = folder / "nine"
    other_schedule = [a if a != "3,1" else "2,1" for a in FAST]
    assert_one_line_error(invoke("classify", one, *other_schedule, "--calibration", cal), "another schedule", "diffcls calibrate")
    assert_one_line_error(invoke("classify", one, *FAST, "--model", "demo-dit", "--calibration", cal), "another model")
    assert_one_line_error(
        invoke("classify", one, *FAST, "--classes", "zero,one,two,three,four,five,six,seven,eight,nine", "--template", "{}", "--calibration", cal),
        "another prompts",
    )
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"temperature": 0.01}))
    assert_one_line_error(invoke("classify", one, *FAST, "--calibration", old), "does not say which model")
    assert invoke("classify", one, *FAST, "--calibration", cal).exit_code == 0


def test_a_resumed_calibration_fits_the_same_temperature(tmp_path):
    """Issue 24 item 10: resumed rows carry full-precision mean errors."""
    folder = tmp_path / "digits"
    for name in ("one", "four", "seven", "nine"):
        shutil.copytree(EXAMPLES / name, folder / name)
    for src, label in (("nine", "four"), ("one", "seven")):  # mislabelled: the fit has an interior optimum
        shutil.copy(next((EXAMPLES / src).glob("*.png")), folder / label / "wrong.png")
    res, a, b = tmp_path / "res.csv", tmp_path / "a.json", tmp_path / "b.json"
    assert invoke("calibrate", folder, "--out", a, "--results", res, *FAST).exit_code == 0
    r = invoke("calibrate", folder, "--out", b, "--results", res, *FAST)
    assert r.exit_code == 0 and "6 of 6 images already done" in r.output
    assert Calibration.load(a).temperature == Calibration.load(b).temperature
    assert json.loads(a.read_text()) == json.loads(b.read_text())


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_rankings_follow_the_prediction_too(seed):
    """--adaptive: the sequential policy's final decision (the prompts left, or the survivor
    and the last ones eliminated) has the prediction's mean lowest, on random near-tie tables."""
    import numpy as np

    from diffcls.runtime.algorithm.policy import make_policy
    from diffcls.runtime.algorithm.ranking import probabilities, rank_classes
    from diffcls.runtime.algorithm.schedule import AdaptiveSchedule

    rng = np.random.default_rng(seed)
    K = 8
    means = 0.3 + (0.004 if seed < 3 else 0.03) * rng.standard_normal(K)  # near-ties, then clear winners
    schedule = AdaptiveSchedule(alpha=0.9, min_samples=4, max_samples=12, final_samples=8 if seed % 2 else 0)
    policy = make_policy(schedule, K, 1000, offset=seed)
    errors = []
    while not policy.done:
        for c, k, j in policy.next_block():
            e = float(means[c] + 0.02 * rng.standard_normal())
            errors.append((c, policy.timesteps[k], j, e))
            policy.feed(c, k, j, e)
    res = policy.result()
    rows, _ = rank_classes(errors, res.ranking, res.final, list(range(K)), [f"c{i}" for i in range(K)])
    assert rows[0].classidx == res.prediction and rows[0].in_final
    final = [r.mean_error for r in rows if r.in_final]
    assert final == sorted(final)
    p = probabilities(rows, 0.01)
    assert p[0] == max(p) and all(q == 0.0 for q, r in zip(p, rows) if not r.in_final)
