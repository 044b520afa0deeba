"""Replay `--adaptive` (and fixed schedules) offline on full error tables; measure P(answer differs
from the full-budget answer), accuracy and evaluations per image.

A full table holds every prompt's error at every point of a G-point grid for each image, under one
noise seed (`collect`: the fixed schedule `--n-samples G --to-keep 1` through the library, one
thread, saved every 10 images). The full-budget answer of an image is its lowest mean over all G
columns: what `--adaptive` would answer with every prompt at every grid timestep. A replay gives
each image `--rotations` random rotations of the adaptive grid (as the product gives each image
its own), serves each timestep from the table's nearest column, and counts.

    python bench/adaptive_replay.py collect /tmp/d_train_c4 /tmp/train_c4.npz --grid 250 --limit 150
    python bench/adaptive_replay.py replay --table c4=/tmp/train_c4.npz \\
        --policy "a05=adaptive:alpha=0.05" --policy "paper=fixed:50,500:5,1" --rotations 4 --json out.json
    python bench/adaptive_replay.py knob --table c4=/tmp/train_c4.npz --table c0=/tmp/train_c0.npz \\
        --alphas 0.01 0.02 0.05 0.1 0.2 0.5      # the knob -> alpha table (KNOB_TO_ALPHA)
    python bench/adaptive_replay.py weights --table s=/tmp/shapes_train.npz --out w.json   # timestep weights from tables

`--prompts K` (replay) keeps the first K prompts of the table (the shapes world's K curve): the
images whose class is among them, and their answers over those prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffcls.runtime.algorithm.policy import FixedPolicy, SequentialPolicy  # noqa: E402
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule  # noqa: E402

T_TRAIN = 1000


def load(path: str | Path, n_prompts: int | None = None, band_weights=None, step: int = 1) -> dict:
    """A table; with `band_weights` (a calibration's timestep weights) the full-budget answer is
    the lowest weighted mean over the columns of the kept bands (what a weighted run answers)."""
    parts = [np.load(p) for p in str(path).split("+")]  # a table collected in parts (--skip)
    z = {"timesteps": parts[0]["timesteps"]}
    E = np.concatenate([p["errors"] for p in parts]).astype(np.float64)  # (images, prompts, G)
    labels = np.concatenate([p["labels"] for p in parts])
    ts = z["timesteps"][::step]  # step > 1: a coarser table (every step-th column)
    E = E[:, :, ::step]
    if n_prompts is not None:
        keep = labels < n_prompts
        E, labels = E[keep][:, :n_prompts], labels[keep]
    w = np.ones(len(ts)) if band_weights is None else np.array([band_weights[int(t) * len(band_weights) // T_TRAIN] for t in ts])
    full = (E * w).sum(axis=2).argmin(axis=1)
    return {"errors": E, "timesteps": ts, "labels": labels, "full": full, "weights": band_weights}


def parse_policy(spec: str):
    """'fixed:50,500:5,1' -> Schedule; 'adaptive:alpha=0.05,min_samples=8' -> AdaptiveSchedule."""
    kind, _, rest = spec.partition(":")
    if kind == "fixed":
        ns, _, ks = rest.partition(":")
        return Schedule(tuple(int(v) for v in ns.split(",")), tuple(int(v) for v in ks.split(",")))
    if kind == "adaptive":
        given = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            default = getattr(AdaptiveSchedule(), key)
            given[key] = value if isinstance(default, str) else (int(value) if isinstance(default, int) and not isinstance(default, bool) else float(value))
        return AdaptiveSchedule(**given)
    raise SystemExit(f"--policy {spec!r}: expected fixed:N1,N2:K1,K2 or adaptive:key=value,...")


def replay_image(x: np.ndarray, ts: np.ndarray, schedule, offset: int | None):
    """One image's table x (K, G) under `schedule`: (prediction, evaluations)."""
    K = x.shape[0]
    kept = ts
    if schedule.band_weights is not None:  # serve each timestep from the nearest column of a kept band
        kept = np.where(np.array([schedule.weight(int(t)) for t in ts]) > 0, ts, -10**6)
    if isinstance(schedule, AdaptiveSchedule):
        policy = SequentialPolicy(K, schedule, T_TRAIN, offset)
    else:
        policy = FixedPolicy(schedule, K, T_TRAIN)
    cols = np.abs(kept[None, :] - np.asarray(policy.timesteps)[:, None]).argmin(axis=1)
    while not policy.done:
        block = policy.next_block()
        policy.feed_block([c for c, _, _ in block], [k for _, k, _ in block], [j for _, _, j in block], [x[c, cols[k]] for c, k, _ in block])
    # its own full-budget answer: every prompt at every point of its grid (the weighted mean, if weighted)
    w = np.array([schedule.weight(int(t)) for t in policy.timesteps])
    full = int((x[:, cols] * w).sum(axis=1).argmin())
    return policy.result().prediction, policy.n_evals, full


def replay(table: dict, schedule, rotations: int, seed: int = 0) -> dict:
    """Mean over rotations of: right answers, answers differing from the full-budget answer,
    evaluations per image; and the pooled disagreement rate with its 95% Wilson interval."""
    E, ts, labels, full = table["errors"], table["timesteps"], table["labels"], table["full"]
    n = len(E)
    if table["weights"] is not None:
        schedule = dataclasses.replace(schedule, band_weights=tuple(table["weights"]))
    reps = rotations if isinstance(schedule, AdaptiveSchedule) else 1
    rng = np.random.default_rng(seed)
    correct, differ, evals = [], [], []
    for _ in range(reps):
        preds, ev, own = zip(*(replay_image(E[i], ts, schedule, int(rng.integers(0, 2**62))) for i in range(n)))
        preds, own = np.asarray(preds), np.asarray(own)
        correct.append(int((preds == labels).sum()))
        # adaptive: against its own full-budget answer on the same grid; fixed: the table's
        differ.append(int((preds != (own if isinstance(schedule, AdaptiveSchedule) else full)).sum()))
        evals.append(float(np.mean(ev)))
    k, m = sum(differ), n * reps
    return {"n": n, "rotations": reps, "correct": float(np.mean(correct)), "correct_min": min(correct), "correct_max": max(correct),
            "differ": float(np.mean(differ)), "p_differ": k / m, "n_differ": k, "n_runs": m, "p_differ_ci95": wilson(k, m), "evals_per_image": float(np.mean(evals)),
            "full_correct": int((full == labels).sum())}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def knob_table(tables: dict, base: str, alphas, rotations: int) -> list[dict]:
    """For each alpha: the measured P(differs) on every table (upper 95% bound). The knob value
    a setting may carry is its worst table's upper bound."""
    rows = []
    for a in alphas:
        sched = parse_policy(f"adaptive:{base}{',' if base else ''}alpha={a}")
        per = {name: replay(t, sched, rotations) for name, t in tables.items()}
        k, m = sum(r["n_differ"] for r in per.values()), sum(r["n_runs"] for r in per.values())
        rows.append({"alpha": a, "pooled": [k, m], "pooled_upper95": wilson(k, m)[1], "tables": per})
        print(f"alpha {a:g}: pooled {k}/{m} differ, 95% up to {wilson(k, m)[1]:.4f}")
        print(f"alpha {a:g}: " + "; ".join(f"{name} differ {r['p_differ']:.4f} (95% up to {r['p_differ_ci95'][1]:.4f}) @ {r['evals_per_image']:.0f} evals, "
                                          f"{r['correct']:.1f}/{r['n']} right" for name, r in per.items()), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="a full table: every prompt at every point of a G-point grid")
    c.add_argument("folder")
    c.add_argument("out")
    c.add_argument("--grid", type=int, default=250)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--skip", type=int, default=0, help="leave out the first N images of the order (collect the rest of a table in another process)")
    c.add_argument("--model", default=None)
    r = sub.add_parser("replay")
    r.add_argument("--table", action="append", required=True, help="NAME=table.npz or NAME=part1.npz+part2.npz (parts of one table, in order)")
    r.add_argument("--policy", action="append", required=True, help="NAME=adaptive:key=value,... or NAME=fixed:50,500:5,1")
    r.add_argument("--rotations", type=int, default=4)
    r.add_argument("--prompts", type=int, default=None, help="only the first K prompts (and the images of their classes)")
    r.add_argument("--json", default=None)
    r.add_argument("--weights", default=None, help="a calibration file's timestep weights (diffcls calibrate --timestep-weights) for every policy")
    r.add_argument("--step", type=int, default=1, help="use every step-th column of the tables (a coarser full-budget grid)")
    k = sub.add_parser("knob")
    k.add_argument("--table", action="append", required=True)
    k.add_argument("--base", default="", help="the other AdaptiveSchedule settings, key=value,...")
    k.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
    k.add_argument("--rotations", type=int, default=4)
    k.add_argument("--json", default=None)
    k.add_argument("--weights", default=None)
    k.add_argument("--step", type=int, default=1)
    w = sub.add_parser("weights", help="fit timestep weights on tables (the library's fit_timestep_weights) into a --weights file")
    w.add_argument("--table", action="append", required=True)
    w.add_argument("--bands", type=int, default=10)
    w.add_argument("--drop-below", type=float, default=0.25, help="drop a band whose per-evaluation information is under this share of the best band's")
    w.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "collect":
        return collect(args)
    if args.cmd == "weights":
        return fit_weights(args)
    tables = {}
    for spec in args.table:
        name, _, path = spec.partition("=")
        weights = json.loads(Path(args.weights).read_text())["timestep_weights"] if args.weights else None
        tables[name] = load(path, getattr(args, "prompts", None), weights, args.step)
    start = time.perf_counter()
    if args.cmd == "knob":
        out = knob_table(tables, args.base, args.alphas, args.rotations)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    else:
        out = {}
        for pspec in args.policy:
            pname, _, spec = pspec.partition("=")
            sched = parse_policy(spec)
            for tname, t in tables.items():
                res = replay(t, sched, args.rotations)
                out[f"{pname} @ {tname}"] = {"schedule": sched.to_dict(), **res}
                print(f"{pname:>16} {tname:>10}: {res['correct']:.1f}/{res['n']} right ({res['correct_min']}-{res['correct_max']}), "
                      f"differs from full on {res['differ']:.1f} (p {res['p_differ']:.4f}, 95% {res['p_differ_ci95'][0]:.4f}-{res['p_differ_ci95'][1]:.4f}), "
                      f"{res['evals_per_image']:.1f} evals/image; full table {res['full_correct']}", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def fit_weights(args) -> list[float]:
    """`diffcls calibrate --timestep-weights`'s fit, on stored full tables (every image of every
    table; its label's prompt is the true one)."""
    from diffcls.runtime.evaluation.calibration import fit_timestep_weights

    images = []
    for spec in args.table:
        z = load(spec.partition("=")[2])
        E, ts = z["errors"], z["timesteps"]
        for x, label in zip(E, z["labels"]):
            images.append(([(c, int(t), 0, float(x[c, g])) for c in range(x.shape[0]) for g, t in enumerate(ts)], [int(label)]))
    weights, fit = fit_timestep_weights(images, args.bands, T_TRAIN, args.drop_below)
    Path(args.out).write_text(json.dumps({"timestep_weights": weights, "weights_fit": fit, "n_images": len(images)}, indent=1))
    print(f"{len(images)} images: weights {' '.join(f'{v:.3g}' for v in weights)} -> {args.out}")
    return weights


def collect(args) -> None:
    """Every prompt at every grid point, through the library (fixed schedule G -> 1), saved
    atomically every 10 images; images in class-interleaved order so any prefix is balanced."""
    import os

    import torch

    from diffcls import Classifier

    clf = Classifier.from_pretrained(args.model, use_cache=False)
    ps = clf.default_prompts()
    names = [n.strip().lower() for n in ps.classnames]
    per = [sorted(f.glob("*.png")) for f in sorted(p for p in Path(args.folder).iterdir() if p.is_dir())]
    paths = [x[i] for i in range(max(map(len, per))) for x in per if i < len(x)][args.skip : args.limit]
    sched = Schedule((args.grid,), (1,))
    ts = [t for _, t in sched.rounds(T_TRAIN)[0]]
    col = {t: i for i, t in enumerate(ts)}
    E = np.zeros((len(paths), len(ps.prompts), args.grid), np.float32)
    labels = np.array([names.index(p.parent.name.lower()) for p in paths])
    for start in range(0, len(paths), 10):
        chunk = paths[start:start + 10]
        for res in clf.classify([str(p) for p in chunk], ps, sched, seed=args.seed, batch_size=250, workers=1):
            for c, t, _j, e in res.errors:
                E[start + res.index, c, col[t]] = e
        done = start + len(chunk)
        tmp = args.out + ".tmp.npz"
        np.savez(tmp, errors=E[:done], timesteps=np.array(ts), labels=labels[:done], paths=np.array([str(p) for p in paths[:done]]), seed=args.seed)
        os.replace(tmp, args.out)
        print(args.out, done, flush=True)
    del torch


if __name__ == "__main__":
    main()
