"""Calibrated probabilities: fitting, NLL, ECE, the calibration file (issue 9 item 13, issue 10 item 4)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.errors import DiffclsError
from diffcls.runtime.evaluation.calibration import (
    Calibration,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    softmax_neg,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits"
runner = CliRunner()


def test_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_t = 0.01
    lists, pos = [], []
    for _ in range(3000):
        m = rng.normal(0.5, 0.02, size=5)
        p = np.asarray(softmax_neg(m.tolist(), true_t))
        lists.append(m.tolist())
        pos.append(int(rng.choice(5, p=p)))
    t = fit_temperature(lists, pos)
    assert t == pytest.approx(true_t, rel=0.1)
    assert nll(lists, pos, t) < nll(lists, pos, 2 * true_t) and nll(lists, pos, t) < nll(lists, pos, true_t / 2)
    assert nll(lists, pos, 1.0) > nll(lists, pos, t)  # uncalibrated: near-uniform, worse
    # a label outside the list adds a constant: it does not move the fit
    assert fit_temperature(lists + [[0.5, 0.6]], pos + [None]) == pytest.approx(t, rel=1e-3)
    with pytest.raises(DiffclsError, match="no image's true class"):
        fit_temperature([[0.1, 0.2]], [None])


def test_a_fitting_set_right_with_a_margin_gets_a_finite_temperature():
    """Every image right by a margin (20 clean training digits are): the plain likelihood rises
    as T -> 0, and the fit sat on the search's lower bound (T = 1e-6, probabilities of 1). The
    rule-of-succession targets give the confidence (n + 1) / (n + 2) instead, written here from
    that definition: with one rival at gap d, sigmoid(d / T) = 1 - 1/(n + 2)."""
    rng = np.random.default_rng(1)
    n, gap = 20, 0.01
    lists = [[float(m), float(m) + gap] for m in rng.normal(0.07, 0.005, size=n)]
    pos = [0] * n
    t = fit_temperature(lists, pos)
    assert t > 1e-5  # not the search's bound
    confidence = softmax_neg(lists[0], t)[0]
    assert confidence == pytest.approx((n + 1) / (n + 2), rel=1e-3)


def test_ece_by_hand():
    conf = [0.9, 0.9, 0.6, 0.2]
    ok = [True, False, True, False]
    # bins (15): 0.9 -> 13 (acc 0.5, conf 0.9), 0.6 -> 9 (acc 1), 0.2 -> 3 (acc 0)
    # ECE = 2/4 * 0.4 + 1/4 * 0.4 + 1/4 * 0.2 = 0.35
    assert expected_calibration_error(conf, ok) == pytest.approx(0.35)
    assert expected_calibration_error([1.0], [True]) == pytest.approx(0.0)  # 1.0 is in the last bin
    bins = reliability_bins(conf, ok)
    assert len(bins) == 15 and bins[13]["n"] == 2 and bins[13]["accuracy"] == 0.5 and bins[0]["n"] == 0


def test_calibration_file_round_trip_and_errors(tmp_path):
    Calibration(temperature=0.02, n_images=3).save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json").temperature == 0.02
    with pytest.raises(DiffclsError, match="diffcls calibrate"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(DiffclsError, match="positive"):
        Calibration.load(tmp_path / "bad.json")


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


FAST = ["--n-samples", "4,8", "--to-keep", "3,1", "--batch-size", "16", "--no-cache"]


def test_calibrate_and_evaluate_round_trip_on_the_examples(tmp_path):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "digits"
    shutil.copytree(EXAMPLES, folder)
    cal = tmp_path / "calibration.json"
    r = runner.invoke(app, ["calibrate", str(folder), "--out", str(cal), *FAST], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    c = json.loads(cal.read_text())
    assert c["n_images"] == 10 and 0 < c["temperature"] < 1 and c["nll_after"] <= c["nll_before"]

    out, errs, plot, js = tmp_path / "r.csv", tmp_path / "e.jsonl", tmp_path / "cm.png", tmp_path / "m.json"
    r = runner.invoke(
        app,
        ["evaluate", str(folder), *FAST, "--calibration", str(cal), "--out", str(out), "--save-errors", str(errs), "--plot", str(plot), "--json", str(js)],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert "NLL" in r.output and "ECE" in r.output
    assert (tmp_path / "cm-reliability.png").stat().st_size > 0
    metrics = json.loads(js.read_text())["calibration"]
    assert metrics["temperature"] == pytest.approx(c["temperature"]) and metrics["n"] == 10
    recs = {json.loads(l)["path"]: json.loads(l) for l in errs.read_text().splitlines()}
    for row in _rows(out):
        rec = recs[row["path"]]
        # to-keep 3 1: the top 3 made the final decision and share all 8 timesteps; the other
        # two were pruned after round 1's 4
        assert rec["n_shared"] == 8
        names = [row[f"top{i}"] for i in range(1, 6)]
        top = rec["top"]
        assert [t["classname"] for t in top] == names and names[0] == row["prediction"]
        assert [t["pruned_after"] for t in top] == [None, None, None, 4, 4]
        assert [row[f"top{i}_pruned_after"] for i in range(1, 6)] == ["", "", "", "4", "4"]
        for i, t in enumerate(top, 1):
            prompt = next(s["prompt"] for s in rec["scores"] if s["classname"] == t["classname"])
            own = [e[3] for e in rec["errors"] if e[0] == prompt]
            assert len(own) == (8 if i <= 3 else 4)
            assert float(row[f"top{i}_mean_error"]) == sum(own) / len(own) == t["mean_error"]
        probs = [float(row[f"top{i}_probability"]) for i in range(1, 6)]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and probs[3:] == [0.0, 0.0]
        want = softmax_neg([t["mean_error"] for t in top[:3]], c["temperature"]) + [0.0, 0.0]
        assert probs == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert [t["probability"] for t in top] == pytest.approx(want)

    # the printed table says what the score is; classify shows the probability too
    r = runner.invoke(app, ["classify", str(folder / "three"), *FAST, "--calibration", str(cal)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "lower is better" in r.output and "probability" in r.output
    bad = runner.invoke(app, ["evaluate", str(folder), *FAST, "--calibration", str(tmp_path / "nope.json")])
    assert bad.exit_code == 2 and "diffcls calibrate" in bad.output
