"""Replay `match --adaptive` offline on a full-grid run's errors: agreement and cost per setting.

    diffcls match quadruples.csv --model demo-shapes --out full.csv --save-errors full.jsonl
    python bench/match_replay.py full.jsonl --error-rate 0.05 0.01 --min-samples 6 8 12

A full-grid `--save-errors` file holds every (arm, t, trial, error) of every item. The adaptive
test of each comparison (runtime.evaluation.match.ItemPolicy, the rule of `classify --adaptive`) sees the
same errors there as in a live `match --adaptive` run with the same seed (the noise of the k-th
grid timestep is the same), so this replays it exactly, up to the last bits of batched floats.
Prints, per setting: the share of comparisons whose decision equals the full grid's, the share
of items whose text/image/group outcome is unchanged, and UNet evaluations against the full grid.
"""

from __future__ import annotations

import argparse
import itertools
import math
import json

from diffcls.runtime.evaluation.match import COMPARISONS, ItemPolicy, MatchSchedule, adaptive_for_match


def load(path: str) -> tuple[list[dict], int, int]:
    """(records with table {(arm, t, trial): error}, t_interval, n_trials)."""
    records, ts, trials = [], set(), set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            rec["table"] = {(a, t, j): e for a, t, j, e in rec["errors"]}
            ts.update(t for _, t, _ in rec["table"])
            trials.update(j for _, _, j in rec["table"])
            records.append(rec)
    ts = sorted(ts)
    return records, ts[1] - ts[0], len(trials)


def replay(rec: dict, schedule: MatchSchedule) -> ItemPolicy:
    ties = set(filter(None, rec.get("tie", "").split(",")))
    skip = ({"text_0", "text_1"} if "text" in ties else set()) | ({n for n in COMPARISONS if n.startswith("image")} if "image" in ties else set())
    pol = ItemPolicy(list(range(6)), list(range(6)), schedule, skip, offset=rec["offset"])
    grid = schedule.grid()
    while not pol.done:
        for a, k, j in pol.next_block():
            pol.feed(a, k, j, rec["table"][(a, grid[k], j)])
    return pol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("errors", help="--save-errors JSONL of a full-grid match run")
    ap.add_argument("--error-rate", type=float, nargs="+", default=[0.05])
    ap.add_argument("--min-samples", type=int, nargs="+", default=[8])
    ap.add_argument("--max-samples", type=int, nargs="+", default=[None])
    ap.add_argument("--separation", action="store_true", help="also print how clearly the full grid decides each kind of comparison")
    args = ap.parse_args()
    records, interval, n_trials = load(args.errors)
    if args.separation:
        separation(records)
    full_schedule = MatchSchedule(t_interval=interval, n_trials=n_trials)
    G = len(full_schedule.grid())
    full = [replay(r, full_schedule) for r in records]
    print(f"{len(records)} items, t_interval {interval} ({G} timesteps), n_trials {n_trials}")
    print("error_rate min_samples max_samples | comparisons agree | text image group unchanged | evals/item (of full)")
    for alpha, n0, m in itertools.product(args.error_rate, args.min_samples, args.max_samples):
        sched = MatchSchedule(t_interval=interval, n_trials=n_trials, adaptive=adaptive_for_match(G, error_rate=alpha, min_samples=n0, **({"max_samples": m} if m else {})))
        runs = [replay(r, sched) for r in records]
        same = sum(a.decisions()[n] == b.decisions()[n] for a, b in zip(runs, full) for n in COMPARISONS)
        total = len(runs) * len(COMPARISONS)
        outcome = []
        for name in ("text", "image", "group"):
            outcome.append(sum(_score(a, name) == _score(b, name) for a, b in zip(runs, full)) / len(runs))
        ev, ev_full = sum(p.n_evals for p in runs), sum(p.n_evals for p in full)
        print(f"{alpha:10g} {n0:11d} {m or G:11d} | {100 * same / total:6.2f}% of {total} | "
              + " ".join(f"{100 * x:.1f}%" for x in outcome)
              + f" | {ev / len(runs):.0f} ({100 * ev / ev_full:.1f}%)")


def separation(records: list[dict]) -> None:
    """How clearly the full grid decides each comparison: |z| = |mean paired difference| / its
    standard error over the grid's timesteps. A comparison with |z| < 2 is a near-tie that no
    stopping rule can call from a quarter of the grid and still agree with the full grid 99% of
    the time (a random quarter's sum has the full sum's sign with probability about
    Phi(|z| sqrt(n / (G - n))): 0.71 at |z| = 1, n = G / 4)."""
    from diffcls.runtime.evaluation.match import _SIDES

    table: dict[tuple[str, str], list[float]] = {}
    for rec in records:
        ts = sorted({t for _, t, _ in rec["table"]})
        for name, (s0, s1) in _SIDES.items():
            d = [sum(c * rec["table"][(a, t, 0)] for a, c in s1.items()) - sum(c * rec["table"][(a, t, 0)] for a, c in s0.items()) for t in ts]
            mean = sum(d) / len(d)
            sd = (sum((x - mean) ** 2 for x in d) / (len(d) - 1)) ** 0.5
            table.setdefault((name.rsplit("_", 1)[0], rec.get("tag", "")), []).append(abs(mean) / sd * len(d) ** 0.5 if sd else math.inf)
    print("comparison tag | n | share with |z| < 2 | |z| < 4 | median |z|")
    for (kind, tag), zs in sorted(table.items()):
        zs.sort()
        print(f"{kind:16s} {tag:9s} | {len(zs):4d} | {100 * sum(z < 2 for z in zs) / len(zs):5.1f}% | "
              f"{100 * sum(z < 4 for z in zs) / len(zs):5.1f}% | {zs[len(zs) // 2]:.1f}")


def _score(pol: ItemPolicy, name: str) -> bool:
    d = pol.decisions()
    text = d["text_0"] == 0 and d["text_1"] == 0
    image = d["image_0"] == 0 and d["image_1"] == 0
    return {"text": text, "image": image, "group": text and image}[name]


if __name__ == "__main__":
    main()
