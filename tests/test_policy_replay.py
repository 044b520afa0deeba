"""bench/policy_replay.py: replaying policies on a stored error table (tiny tables, no model)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("policy_replay", ROOT / "bench" / "policy_replay.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


GRID = [5 + 10 * i for i in range(100)]  # a 100-point table: t = 5, 15, ..., 995


def _image(mod, key, label, means, noise=0.0, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    errors = {}
    for t in GRID:
        shared = rng.normal(0, 1.0)  # a per-timestep effect every prompt shares (paired samples)
        for p, m in enumerate(means):
            errors[(p, t, 0)] = m + shared + noise * rng.normal()
    return mod.TableImage(key, label, errors, len(means))


def test_fixed_schedule_replay_counts_and_prediction():
    mod = _bench()
    im = _image(mod, "one/a.png", 1, [0.5, 0.1, 0.3, 0.9])
    out = mod.replay_one(im, mod.fixed_policy((10, 50), (3, 1), 4)())
    # 4 prompts x 10 t, then 3 x 40 new t
    assert out.prediction == 1 and out.n_evals == 4 * 10 + 3 * 40 and not out.capped
    # a 500-point schedule on a 100-point table is served from the nearest stored timesteps
    assert mod.replay_one(im, mod.fixed_policy((50, 500), (2, 1), 4)()).n_evals == 4 * 50 + 2 * 450


def test_sequential_replay_stops_early_when_the_gap_is_large_and_caps_at_the_table():
    mod = _bench()
    easy = _image(mod, "zero/e.png", 0, [0.0, 5.0, 5.0], noise=0.01)
    out = mod.replay_one(easy, mod.sequential_policy(3, error_rate=0.05, min_samples=4, max_samples=500)())
    assert out.prediction == 0 and out.n_evals == 3 * 4 and not out.capped  # out after the first stage
    tie = _image(mod, "zero/t.png", 0, [0.0, 0.0, 0.0], noise=1.0, seed=3)  # no winner: runs to the table's end
    out = mod.replay_one(tie, mod.sequential_policy(3, error_rate=0.01, min_samples=4, max_samples=500)())
    assert out.capped and out.n_evals <= 3 * 100


def test_sequential_replay_serves_common_timesteps_in_van_der_corput_order():
    mod = _bench()
    im = _image(mod, "zero/e.png", 0, [0.0, 1.0])
    seen = []

    class Spy(dict):
        def __getitem__(self, key):
            seen.append(key[1])
            return super().__getitem__(key)

    im.errors = Spy(im.errors)
    mod.replay_one(im, mod.sequential_policy(2, error_rate=0.05, min_samples=4, max_samples=500)())
    order = []
    for t in seen:
        if t not in order:
            order.append(t)
    assert order[:4] == [5, 645, 325, 965]  # grid[0], grid[64], grid[32], grid[96]: bit reversal over 128, < 100 kept


def test_replay_report_accuracy_agreement_and_files(tmp_path):
    mod = _bench()
    images = [_image(mod, "zero/a.png", 0, [0.1, 0.5]), _image(mod, "one/b.png", 1, [0.1, 0.5], seed=1),
              _image(mod, "one/c.png", 1, [0.6, 0.1], seed=2)]
    lines = [json.dumps({"path": im.key, "errors": [[p, t, j, e] for (p, t, j), e in im.errors.items()]}) for im in images]
    table = tmp_path / "t.jsonl"
    table.write_text("\n".join(lines) + "\n")
    loaded = mod.load_table(table, [0, 1], ["zero", "one"])
    assert [im.label for im in loaded] == [0, 1, 1] and loaded[0].common == GRID
    configs = mod.default_configs(2, 100, [0.05], [4], [500], [("mixture", {})])
    report = mod.run_replay({"t": loaded}, [0, 1], configs, reference="full")
    rows = {r["name"].split(":")[0].split(",")[0]: r for r in report["tables"]["t"]["rows"]}
    # every policy predicts prompt 0, 0, 1: image b (label one) is wrong for all of them
    for r in rows.values():
        assert r["correct"] == 2 and r["top1"] == pytest.approx(2 / 3) and r["agree"] == 1.0
    assert rows["paper CIFAR-10"]["evals_per_image"] == 2 * 500  # to-keep 5 capped at the 2 prompts: both go on
    md = mod.markdown(report)
    assert "| paper CIFAR-10: 50 500 -> 5 1 | 66.7% (2/3) | 100.0% |" in md
    pytest.importorskip("matplotlib")
    mod.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_pack_round_trips_and_rotations_replay_the_shipped_policy(tmp_path):
    """`pack` turns a full JSONL table into an .npz that replays the same; `rotations` replays a
    policy on it over several grids (shared or per image) and counts right answers."""
    import numpy as np

    mod = _bench()
    images = [_image(mod, "zero/a.png", 0, [0.1, 0.5, 0.6]), _image(mod, "one/b.png", 1, [0.5, 0.1, 0.6], seed=1),
              _image(mod, "two/c.png", 2, [0.6, 0.5, 0.1], seed=2)]
    lines = [json.dumps({"path": im.key, "errors": [[p, t, j, e] for (p, t, j), e in im.errors.items()]}) for im in images]
    table = tmp_path / "t.jsonl"
    table.write_text("\n".join(lines) + "\n")
    info = mod.pack_table(table, tmp_path / "t.npz")
    assert info == {"images": 3, "shape": [3, 3, 100, 1]}
    names = ["zero", "one", "two"]
    a, b = mod.load_table(table, [0, 1, 2], names), mod.load_table(tmp_path / "t.npz", [0, 1, 2], names)
    for x, y in zip(a, b):
        assert (x.key, x.label, x.common) == (y.key, y.label, y.common)
        assert max(abs(x.errors[k] - y.errors[k]) for k in x.errors) < 1e-6 * max(abs(v) for v in x.errors.values())
    # an incomplete table is refused with the image named
    bad = tmp_path / "bad.jsonl"
    rec = json.loads(lines[0])
    rec["errors"] = rec["errors"][:-1]
    bad.write_text(json.dumps(rec) + "\n")
    with pytest.raises(SystemExit, match="zero/a.png lacks"):
        mod.pack_table(bad, tmp_path / "bad.npz")
    # the gaps are large: every grid and every per-image draw gets all three right, and stops early
    for per_image in (False, True):
        make = mod.parse_policy("adaptive:error_rate=0.3,min_samples=4,max_samples=16,final_samples=8", 3)
        r = mod.rotated_replay(tmp_path / "t.npz", make, 4, [0, 1, 2], names, per_image=per_image)
        assert (r["correct_mean"], r["correct_min"], r["full_table_correct"], r["shifts"]) == (3.0, 3, 3, 4)
        assert 3 * 4 <= r["evals_per_image"] < 3 * 16
    fixed = mod.rotated_replay(tmp_path / "t.npz", mod.parse_policy("fixed:10:1", 3), 2, [0, 1, 2], names)
    assert fixed["evals_per_image"] == 30 and fixed["correct_mean"] == 3.0
    with pytest.raises(SystemExit, match="expected fixed"):
        mod.parse_policy("bogus:1", 3)
    assert np.load(tmp_path / "t.npz")["timesteps"].tolist() == GRID
