"""bench/adaptive_replay.py: replays on a small synthetic full table (no model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("adaptive_replay", ROOT / "bench" / "adaptive_replay.py")
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)


def table(tmp_path, gap=0.3, n=6, K=3, G=40, seed=0):
    """Prompt (label) has mean 1.0, the others 1.0 + gap; t < 250 points the wrong way."""
    rng = np.random.default_rng(seed)
    ts = np.arange(G) * (1000 // G) + 1000 // G // 2
    labels = np.arange(n) % K
    E = 1.0 + rng.normal(0, 0.05, (n, K, G)) + rng.normal(0, 0.3, (n, 1, G))
    for i, y in enumerate(labels):
        others = [c for c in range(K) if c != y]
        E[i, others] += np.where(ts < 250, -gap / 2, gap)
    path = tmp_path / "t.npz"
    np.savez(path, errors=E.astype(np.float32), timesteps=ts, labels=labels, paths=np.array([f"{i}.png" for i in range(n)]))
    return path


def test_replay_counts_answers_evaluations_and_disagreement(tmp_path):
    t = mod.load(table(tmp_path))
    assert (t["full"] == t["labels"]).all()
    r = mod.replay(t, mod.parse_policy("adaptive:alpha=0.5,min_samples=4,max_samples=10,final_samples=30"), rotations=2)
    assert r["correct"] == 6 and r["p_differ"] == 0.0 and r["n_runs"] == 12
    assert 3 * 4 <= r["evals_per_image"] < 3 * 40  # the first stage at least, well under every prompt everywhere
    fixed = mod.replay(t, mod.parse_policy("fixed:40:1"), rotations=3)
    assert fixed["evals_per_image"] == 3 * 40 and fixed["rotations"] == 1 and fixed["differ"] == 0


def test_weights_move_the_full_answer_and_drop_columns(tmp_path):
    path = table(tmp_path, gap=0.02)
    # weights that keep only t < 250, where the wrong prompts look better: every full answer flips
    t = mod.load(path, band_weights=[1.0, 0.0, 0.0, 0.0])
    assert (t["full"] != t["labels"]).all()
    r = mod.replay(t, mod.parse_policy("adaptive:alpha=0.5,min_samples=3,max_samples=4,final_samples=6"), rotations=1)
    assert r["correct"] == 0  # the policy answers on the kept band only
    assert mod.load(path, n_prompts=2)["errors"].shape[1] == 2


def test_weights_fit_reads_a_table_in_parts_and_drops_weak_bands(tmp_path):
    """`weights` fits the library's weights on a table collected in parts (A+B) exactly as on the
    whole, and --drop-below decides which informative bands stay."""
    import json

    whole = table(tmp_path, gap=0.2, n=12, G=80)
    z = np.load(whole)
    parts = []
    for name, sl in (("a", slice(0, 5)), ("b", slice(5, None))):
        p = tmp_path / f"{name}.npz"
        np.savez(p, errors=z["errors"][sl], timesteps=z["timesteps"], labels=z["labels"][sl], paths=z["paths"][sl])
        parts.append(p)

    def fit(spec, drop):
        out = tmp_path / f"w{drop}.json"
        mod.main(["weights", "--table", f"t={spec}", "--bands", "4", "--drop-below", str(drop), "--out", str(out)])
        return json.loads(out.read_text())

    kept_all = fit(f"{parts[0]}+{parts[1]}", 0.0)
    assert kept_all["n_images"] == 12 and kept_all["timestep_weights"] == fit(whole, 0.0)["timestep_weights"]
    w = kept_all["timestep_weights"]
    assert w[0] == 0.0 and all(v > 0 for v in w[1:])  # t < 250 points the wrong way: dropped at any threshold
    strict = fit(whole, 0.999)["timestep_weights"]  # only the most informative band (or a tie) stays
    assert strict[0] == 0.0 and 1 <= sum(v > 0 for v in strict) < 3
