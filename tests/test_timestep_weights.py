"""Timestep weights by band: fitted by `diffcls calibrate --timestep-weights` on labelled images,
frozen in the calibration file, applied by `--calibration` to the fixed and the adaptive schedule
(dropped bands leave the grid; a sample is weight x error)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.runtime.evaluation.calibration import fit_timestep_weights
from diffcls.runtime.algorithm.policy import FixedPolicy, SequentialPolicy
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule, schedule_from_dict

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "digits"


def synthetic(n_images=30, seed=0):
    """3 prompts, true prompt 0; band 0 (t < 250) points the wrong way, band 3 has the largest
    mean over variance of the paired difference."""
    rng = np.random.default_rng(seed)
    mean_gap = {0: -0.02, 1: 0.025, 2: 0.04, 3: 0.02}
    sd = {0: 0.05, 1: 0.1, 2: 0.1, 3: 0.05}
    images = []
    for _ in range(n_images):
        errors = []
        for t in range(5, 1000, 10):
            b = t // 250
            common = rng.normal(1.0, 0.3)
            for c in range(3):
                gap = 0.0 if c == 0 else mean_gap[b]
                errors.append((c, t, 0, common + gap + rng.normal(0, sd[b])))
        images.append((errors, [0]))
    return images


def test_weights_are_mean_over_variance_with_wrong_way_bands_dropped():
    w, fit = fit_timestep_weights(synthetic(), n_bands=4)
    assert w[0] == 0.0  # the band that favours the wrong prompts is dropped
    assert w[3] > w[2] > w[1] > 0  # 0.02/0.005 > 0.04/0.02 > 0.025/0.02
    assert abs(np.mean([v for v in w if v > 0]) - 1) < 1e-5
    assert fit["mean"][0] < 0 < fit["mean"][3]
    # a plausible mistake, weighting by the mean alone, would rank band 2 first: the fit does not
    assert np.argmax(w) == 3 and np.argmax(fit["mean"]) == 2
    # a band whose evaluations carry under a quarter of the best band's information is dropped
    w2, _ = fit_timestep_weights(synthetic(), n_bands=4, drop_below=0.5)
    assert w2[1] == 0.0 and w2[2] > 0 and w2[3] > 0


def test_weighted_schedules_drop_bands_and_weigh_samples():
    w = (0.0, 1.0, 1.0, 2.0)
    fixed = Schedule((8,), (1,), band_weights=w)
    assert all(t >= 250 for t in fixed.grid()) and len(set(fixed.grid())) == 8
    assert schedule_from_dict(fixed.to_dict()) == fixed and "band_weights" not in Schedule().to_dict()
    adaptive = AdaptiveSchedule(alpha=0.2, min_samples=3, max_samples=6, final_samples=6, band_weights=w)
    order = adaptive.timestep_order(1000, 12345)
    assert all(t >= 250 for t in order) and len(set(order)) == 12
    # prompt 1 is better at t < 750 (weight 1), prompt 0 at t >= 750 (weight 2): the weighted mean decides
    def err(c, t):
        return 1.0 + (0.01 if (c == 0) == (t < 750) else 0.0) * (1 if t < 750 else 1.6)

    pol = FixedPolicy(fixed, 2)
    while not pol.done:
        for c, k, j in pol.next_block():
            pol.feed(c, k, j, err(c, pol.timesteps[k]))
    unweighted = min((0, 1), key=lambda c: sum(err(c, t) for t in fixed.grid()))
    assert unweighted == 1 and pol.result().prediction == 0
    seq = SequentialPolicy(2, AdaptiveSchedule(alpha=0.2, min_samples=3, max_samples=12, final_samples=0, band_weights=w))
    while not seq.done:
        block = seq.next_block()
        seq.feed_block([c for c, _, _ in block], [k for _, k, _ in block], [j for *_, j in block], [err(c, seq.timesteps[k]) for c, k, _ in block])
    assert seq.result().prediction == 0


def test_calibrate_fits_weights_that_classify_and_evaluate_apply(tmp_path, tiny_dir):
    folder = tmp_path / "digits"
    shutil.copytree(EXAMPLES, folder)
    cal = tmp_path / "weights.json"
    base = ["--model", str(tiny_dir), "--batch-size", "16", "--no-cache"]
    r = runner.invoke(app, ["calibrate", str(folder), *base, "--n-samples", "12", "--to-keep", "1", "--timestep-weights", "3", "--out", str(cal)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    c = json.loads(cal.read_text())
    assert len(c["timestep_weights"]) == 3 and c["n_images"] == 10 and c["temperature"] == 1.0
    weights = tuple(c["timestep_weights"])
    for sched in (["--adaptive", "--alpha", "0.5", "--min-samples", "3", "--max-samples", "4", "--final-samples", "0"], ["--n-samples", "2,4", "--to-keep", "2,1"]):
        out = tmp_path / f"r{len(sched)}.csv"
        r = runner.invoke(app, ["evaluate", str(folder), *base, *sched, "--calibration", str(cal), "--out", str(out)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        stored = json.loads(Path(str(out) + ".settings.json").read_text())["schedule"]
        assert tuple(stored["band_weights"]) == weights
    # bound to the prompts it was fitted with
    r = runner.invoke(app, ["classify", str(folder), *base, "--classes", "a,b", "--n-samples", "2,4", "--to-keep", "2,1", "--calibration", str(cal)], catch_exceptions=False)
    assert r.exit_code != 0 and "timestep weights were fitted with another prompts" in r.output
