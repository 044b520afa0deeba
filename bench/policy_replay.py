"""Replay evaluation policies offline on stored error tables (issue 10 item 6).

A diffusion classifier's cost is its number of UNet evaluations, and every policy (the paper's
fixed schedules, the sequential stopping rule) only ever looks at (prompt, timestep, trial)
errors. So: evaluate every prompt at every timestep of a grid once per image, store the errors,
and replay any policy on them in milliseconds. Two steps:

  # 1. the table: every prompt at every timestep of an N-point grid (shared noise), through the CLI
  python bench/policy_replay.py collect FOLDER --out /tmp/grid.jsonl --n-samples 100 --engines /tmp/eng
  #    (= diffcls evaluate FOLDER --n-samples 100 --to-keep 1 --save-errors /tmp/grid.jsonl --out ...)
  #    A --save-errors file of any fixed schedule works too: its first round is such a table
  #    (the paper's `--n-samples 50 500 --to-keep 5 1` stores all prompts at 50 timesteps and its
  #    top-5 at all 500, so the paper schedule itself replays exactly from it).

  # 2. the replay: accuracy, agreement, evaluations per image; a table and a plot
  python bench/policy_replay.py replay --table clean=/tmp/grid.jsonl --table corrupt=/tmp/c4.jsonl \\
      --markdown /tmp/replay.md --plot /tmp/replay.png --json /tmp/replay.json

Full tables (every prompt at every timestep of the 500-point grid, e.g. from a GPU:
`GPU_STEPS=table_c4_s0 bash bench/gpu_session.sh all`) are packed to .npz and replayed over many
grids, because on the demo model which timesteps a policy sees moves its accuracy by +-10 images:

  python bench/policy_replay.py pack /tmp/t.jsonl /tmp/t.npz
  python bench/policy_replay.py rotations --table c4=/tmp/t.npz --shifts 16 --policy "paper=fixed:50,500:5,1" \
      --policy "adaptive=adaptive:" [--per-image]      # adaptive:key=value,... sets AdaptiveSchedule fields

How a policy is fed (`replay_one`):
- The table's *common* timesteps are those where every prompt has an error for every trial;
  samples at a common timestep are paired (same t, same noise for every prompt).
- A fixed schedule (`FixedPolicy`) asks for its own timesteps; each is served exactly when the
  table holds it for that prompt, else from the nearest common timestep (the demo's 50-point grid
  t = 10, 30, ... is served by the paper grid's t = 11, 31, ...).
- The sequential policy (`SequentialPolicy`) is served the common timesteps in van der Corput
  order (its k-th sample is the k-th of that order), with its own parameters (alpha, n0, and
  max_samples, which shapes the mixture boundary). When it wants more timesteps than the table
  holds it is stopped there and the lowest mean among the survivors wins ("capped" counts them).
- "agree" compares with a reference prediction per image: by default the paper schedule's
  (2,750 evaluations; exact from a paper-schedule table), else the argmin of the mean error over
  all common timesteps (every prompt, the full table).

Labels come from the first path component (the class folder), matched to the prompt class names.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffcls.runtime.algorithm.policy import FixedPolicy, SequentialPolicy  # noqa: E402
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule, van_der_corput_order  # noqa: E402

T_TRAIN = 1000


@dataclass
class TableImage:
    key: str
    label: int | None  # true class index (None: unlabelled)
    errors: dict[tuple[int, int, int], float]  # (prompt, t, trial) -> error
    n_prompts: int
    n_trials: int = 1
    common: list[int] = field(default_factory=list)  # timesteps every prompt has (all trials)

    def __post_init__(self):
        by_t: dict[int, set] = {}
        for p, t, j in self.errors:
            by_t.setdefault(t, set()).add((p, j))
        need = self.n_prompts * self.n_trials
        self.common = sorted(t for t, s in by_t.items() if len(s) == need)
        self._common_arr = np.asarray(self.common)

    def nearest_common(self, t: int) -> int:
        i = int(np.abs(self._common_arr - t).argmin())
        return int(self._common_arr[i])

    def full_argmin(self) -> int:
        """The prompt with the lowest mean error over every common timestep (ties: lower index)."""
        means = [np.mean([self.errors[(p, t, j)] for t in self.common for j in range(self.n_trials)]) for p in range(self.n_prompts)]
        return int(np.argmin(means))


def _label(key: str, by_name: dict) -> int | None:
    """The true class index of a table image: its first path component (the class folder)."""
    return by_name.get(key.split("/", 1)[0].strip().lower()) if "/" in key else None


def pack_table(src: str | Path, dst: str | Path) -> dict:
    """A --save-errors JSONL table in which every prompt has every timestep -> a compact .npz
    (errors float32 [image, prompt, timestep, trial]; a 500-timestep table of 359 images and 10
    prompts is 7 MB instead of 55 MB of JSON, so it comes back from a GPU machine in one file)."""
    paths, rows, grid = [], [], None
    for line in Path(src).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        e = np.asarray(rec["errors"], dtype=np.float64)
        p, t, j = (e[:, i].astype(np.int64) for i in range(3))
        ts = np.unique(t)
        if grid is None:
            grid = ts
        elif not np.array_equal(grid, ts):
            raise SystemExit(f"{src}: {rec['path']} has other timesteps than the first image; pack needs one grid")
        n_p, n_j = int(p.max()) + 1, int(j.max()) + 1
        arr = np.full((n_p, len(grid), n_j), np.nan, dtype=np.float32)
        arr[p, np.searchsorted(grid, t), j] = e[:, 3]
        if np.isnan(arr).any():
            raise SystemExit(f"{src}: {rec['path']} lacks some (prompt, timestep, trial) errors; pack needs a full table")
        paths.append(rec["path"])
        rows.append(arr)
    if not rows:
        raise SystemExit(f"{src} holds no images")
    errors = np.stack(rows)
    np.savez_compressed(dst, errors=errors, timesteps=grid, paths=np.asarray(paths))
    return {"images": len(paths), "shape": list(errors.shape)}


def load_table(path: str | Path, classidx: list[int], classnames: list[str]) -> list[TableImage]:
    """A --save-errors JSONL file (or its `pack`ed .npz) -> one TableImage per image (labels
    from the class folder)."""
    by_name = {n.strip().lower(): i for n, i in zip(classnames, classidx)}
    images = []
    if str(path).endswith(".npz"):
        z = np.load(path)
        grid = z["timesteps"].tolist()
        for key, arr in zip(z["paths"].tolist(), z["errors"]):
            n_p, n_t, n_j = arr.shape
            errors = {(c, grid[i], j): float(arr[c, i, j]) for c in range(n_p) for i in range(n_t) for j in range(n_j)}
            images.append(TableImage(key, _label(key, by_name), errors, len(classidx), n_j))
        return images
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        errors = {(int(p), int(t), int(j)): float(e) for p, t, j, e in rec["errors"]}
        n_trials = 1 + max(j for _, _, j in errors)
        images.append(TableImage(rec["path"], _label(rec["path"], by_name), errors, len(classidx), n_trials))
    if not images:
        raise SystemExit(f"{path} holds no images")
    return images


@dataclass
class Outcome:
    prediction: int  # prompt
    n_evals: int
    capped: bool = False


def replay_one(image: TableImage, policy) -> Outcome:
    """Run one policy object to the end on one image's stored errors."""
    if isinstance(policy, SequentialPolicy):
        order = [image.common[i] for i in van_der_corput_order(len(image.common))]
        serve = lambda c, k, j: (order[k] if k < len(order) else None)  # noqa: E731
    else:
        def serve(c, k, j):
            t = policy.timesteps[k]
            return t if (c, t, j) in image.errors else image.nearest_common(t)
    fed = 0
    while not policy.done:
        block = policy.next_block()
        ts = [serve(c, k, j) for c, k, j in block]
        if any(t is None for t in ts):  # past the end of the table: stop, lowest mean wins
            return Outcome(policy.result().prediction, fed, capped=True)
        for (c, k, j), t in zip(block, ts):
            policy.feed(c, k, j, image.errors[(c, t, j)])
        fed += len(block)
    return Outcome(policy.result().prediction, fed)


def fixed_policy(n_samples, to_keep, n_prompts, n_trials=1):
    ks = tuple(min(k, n_prompts) for k in to_keep)
    return lambda: FixedPolicy(Schedule(tuple(n_samples), ks, n_trials=n_trials), n_prompts, T_TRAIN)


def sequential_policy(n_prompts, **params):
    # this bench's sweeps name the test's level error_rate (the rounds 1-3 meaning): today's alpha
    if "error_rate" in params and "alpha" not in params:
        params["alpha"] = params.pop("error_rate")
    sched = AdaptiveSchedule(**params)
    return lambda offset=0: SequentialPolicy(n_prompts, sched, T_TRAIN, offset)


def evaluate_policy(images: list[TableImage], make, classidx: list[int], reference: list[int] | None) -> dict:
    """Accuracy, agreement with `reference` (predicted class per image) and evaluation counts."""
    preds, evals, capped = [], [], 0
    for im in images:
        o = replay_one(im, make())
        preds.append(classidx[o.prediction])
        evals.append(o.n_evals)
        capped += o.capped
    labelled = [(p, im.label) for p, im in zip(preds, images) if im.label is not None]
    ev = np.asarray(evals)
    out = {
        "n": len(images),
        "correct": sum(p == y for p, y in labelled),
        "top1": sum(p == y for p, y in labelled) / len(labelled) if labelled else None,
        "evals_per_image": float(ev.mean()),
        "evals_p50": float(np.percentile(ev, 50)),
        "evals_p90": float(np.percentile(ev, 90)),
        "evals_max": int(ev.max()),
        "capped": capped,
        "predictions": preds,
    }
    if reference is not None:
        agree = sum(p == r for p, r in zip(preds, reference))
        out["agree"] = agree / len(images)
        out["n_disagree"] = len(images) - agree
    return out


def rotated_replay(npz: str | Path, make, shifts: int, classidx: list[int], classnames: list[str], per_image: bool = False) -> dict:
    """Replay one policy on a full packed table (every prompt at every grid timestep), `shifts`
    times. A policy's timestep t is served from the table's nearest timestep, and:
    - per_image False (one grid for all images, as fixed schedules have): in replicate o every
      image's timesteps move o * (G // shifts) table columns to the right (cyclically);
    - per_image True (what --adaptive does: each image its own rotation of its grid): replicate o
      draws every image's grid offset at random (seed o) and passes it to `make(offset)`.
    On the demo model which timesteps an estimate uses moves corrupted-digit accuracy by up to
    +-10 images, so one shared grid is one draw; the mean over replicates is the expectation."""
    z = np.load(npz)
    E = z["errors"][..., 0].astype(np.float64)  # image, prompt, timestep (trial 0)
    grid = z["timesteps"]
    by_name = {n.strip().lower(): i for n, i in zip(classnames, classidx)}
    labels = [_label(k, by_name) for k in z["paths"].tolist()]
    full = E.mean(axis=2).argmin(axis=1)
    n_img, _, G = E.shape
    step = max(1, G // max(shifts, 1))
    rows = []
    nearest = lambda ts, shift: [(int(np.abs(grid - t).argmin()) + shift) % G for t in ts]  # noqa: E731
    for o in range(shifts):
        rng = np.random.default_rng(o)
        cols = None if per_image else nearest(make().timesteps, o * step)
        preds, evals = [], []
        for i in range(n_img):
            if per_image:
                policy = make(int(rng.integers(0, 2**62)))
                cols = nearest(policy.timesteps, 0)
            else:
                policy = make()
            x = E[i]
            while not policy.done:
                for c, k, j in policy.next_block():
                    policy.feed(c, k, j, x[c, cols[k]])
            preds.append(policy.result().prediction)
            evals.append(policy.n_evals)
        correct = sum(classidx[p] == y for p, y in zip(preds, labels) if y is not None)
        rows.append((correct, float(np.mean(evals)), int(sum(p == f for p, f in zip(preds, full)))))
    acc = [r[0] for r in rows]
    return {"correct_mean": float(np.mean(acc)), "correct_min": min(acc), "correct_max": max(acc),
            "evals_per_image": float(np.mean([r[1] for r in rows])), "agree_full_mean": float(np.mean([r[2] for r in rows])),
            "full_table_correct": int(sum(classidx[f] == y for f, y in zip(full, labels) if y is not None)), "n": n_img, "shifts": shifts}


PAPER = ((50, 500), (5, 1))
DEMO = ((10, 50), (3, 1))


def default_configs(n_prompts: int, grid_size: int, alphas, n0s, budgets, rules) -> list[tuple[str, dict, object]]:
    """(name, params, policy factory) for the fixed schedules and the sequential sweep."""
    out = []
    for ns, ks, label in [(*PAPER, "paper CIFAR-10"), (*DEMO, "demo default"), ((10,), (1,), "fixed 10 t"), ((20,), (1,), "fixed 20 t"), ((grid_size,), (1,), f"fixed {grid_size} t (whole table)")]:
        if max(ns) > T_TRAIN:
            continue
        out.append((f"{label}: {' '.join(map(str, ns))} -> {' '.join(map(str, ks))}", {"kind": "fixed", "n_samples": ns, "to_keep": ks}, fixed_policy(ns, ks, n_prompts)))
    for rule, extra in rules:
        for budget in budgets:
            for n0 in n0s:
                for a in alphas:
                    params = {"error_rate": a, "min_samples": n0, "max_samples": budget, "rule": rule, **extra}
                    name = f"sequential {rule}{' rel_delta=%g' % extra['rel_delta'] if 'rel_delta' in extra else ''}, alpha={a:g}, n0={n0}, max={budget}"
                    out.append((name, {"kind": "sequential", **params}, sequential_policy(n_prompts, **params)))
    return out


def run_replay(tables: dict[str, list[TableImage]], classidx, configs, reference: str = "paper") -> dict:
    report = {"reference": reference, "tables": {}}
    for name, images in tables.items():
        n_prompts = images[0].n_prompts
        if reference == "paper":
            ref = evaluate_policy(images, fixed_policy(*PAPER, n_prompts), classidx, None)["predictions"]
        else:
            ref = [classidx[im.full_argmin()] for im in images]
        full = [classidx[im.full_argmin()] for im in images]
        rows = []
        start = time.perf_counter()
        for cname, params, make in configs:
            r = evaluate_policy(images, make, classidx, ref)
            r["agree_full_table"] = sum(p == f for p, f in zip(r["predictions"], full)) / len(images)
            rows.append({"name": cname, "params": params, **{k: v for k, v in r.items() if k != "predictions"}})
        report["tables"][name] = {
            "n_images": len(images),
            "n_labelled": sum(im.label is not None for im in images),
            "common_timesteps": len(images[0].common),
            "replay_seconds": time.perf_counter() - start,
            "rows": rows,
        }
    return report


def markdown(report: dict, only_best: int | None = None) -> str:
    lines = []
    for name, tab in report["tables"].items():
        lines.append(f"**{name}**: {tab['n_images']} images, {tab['common_timesteps']} timesteps shared by every prompt; "
                     f"agree = same class as the {'paper schedule' if report['reference'] == 'paper' else 'full-table argmin'}")
        lines.append("")
        lines.append("| policy | top-1 | agree | evals/image (mean / p90 / max) | capped |")
        lines.append("|---|---|---|---|---|")
        for r in tab["rows"]:
            top1 = f"{100 * r['top1']:.1f}% ({r['correct']}/{tab['n_labelled']})" if r["top1"] is not None else "-"
            lines.append(f"| {r['name']} | {top1} | {100 * r['agree']:.1f}% | {r['evals_per_image']:.0f} / {r['evals_p90']:.0f} / {r['evals_max']} | {r['capped']} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tabs = report["tables"]
    fig, axes = plt.subplots(1, len(tabs), figsize=(6 * len(tabs), 4.5), squeeze=False)
    for ax, (name, tab) in zip(axes[0], tabs.items()):
        seq: dict[str, list] = {}
        for r in tab["rows"]:
            if r["top1"] is None:
                continue
            p = r["params"]
            if p["kind"] == "fixed":
                ax.plot(r["evals_per_image"], 100 * r["top1"], "s", color="black")
                ax.annotate(r["name"].split(":")[0], (r["evals_per_image"], 100 * r["top1"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
            else:
                key = f"{p['rule']} n0={p['min_samples']} max={p['max_samples']}" + (f" rd={p['rel_delta']:g}" if p["rule"] == "kim-nelson" else "")
                seq.setdefault(key, []).append((r["evals_per_image"], 100 * r["top1"]))
        for key, pts in seq.items():
            pts.sort()
            ax.plot([x for x, _ in pts], [y for _, y in pts], ".-", label=key, alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("UNet evaluations per image (log)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_title(f"{name} ({tab['n_images']} images)", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle("sequential policy (lines: alpha sweep) vs fixed schedules (squares)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_policy(spec: str, n_prompts: int):
    """'fixed:50,500:5,1' or 'adaptive:alpha=0.9,max_samples=30' -> a policy factory (error_rate= is read as alpha)."""
    kind, _, rest = spec.partition(":")
    if kind == "fixed":
        ns, _, ks = rest.partition(":")
        return fixed_policy(tuple(int(v) for v in ns.split(",")), tuple(int(v) for v in ks.split(",")), n_prompts)
    if kind == "adaptive":
        params = {}
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            field_type = type(getattr(AdaptiveSchedule(), key))
            params[key] = field_type(value) if field_type in (int, float, str) else float(value)
        return sequential_policy(n_prompts, **params)
    raise SystemExit(f"--policy {spec!r}: expected fixed:N1,N2:K1,K2 or adaptive:key=value,...")


def rotations_main(args, classidx, classnames) -> dict:
    report = {"shifts": args.shifts, "policies": {}}
    for pspec in args.policy:
        pname, _, spec = pspec.partition("=")
        make = parse_policy(spec, len(classidx))
        per = {}
        for tspec in args.table:
            tname, _, path = tspec.partition("=")
            per[tname] = rotated_replay(path, make, args.shifts, classidx, classnames, per_image=args.per_image and spec.startswith("adaptive"))
            r = per[tname]
            print(f"{pname:>24} {tname:>8}: top-1 {r['correct_mean']:.1f} (min {r['correct_min']}, max {r['correct_max']}) of {r['n']}"
                  f" @ {r['evals_per_image']:.0f} evals/image, agrees with the full table on {r['agree_full_mean']:.1f}"
                  f" (full table: {r['full_table_correct']})", flush=True)
        report["policies"][pname] = {"spec": spec, "tables": per}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def _prompts(prompts_csv: str | None):
    from diffcls.models.loading import model_defaults
    from diffcls.runtime.data.prompts import PromptSet

    if prompts_csv is None:
        prompts_csv = model_defaults(None).get("prompts")
    ps = PromptSet.from_csv(prompts_csv)
    return list(ps.classidx), list(ps.classnames)


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="run diffcls evaluate with every prompt at every grid timestep")
    c.add_argument("folder")
    c.add_argument("--out", required=True, help="errors JSONL (the results CSV goes beside it; reruns resume)")
    c.add_argument("--n-samples", type=int, default=100, help="grid size: timesteps per prompt")
    c.add_argument("--engines", default=None)
    c.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("pack", help="a full --save-errors JSONL table -> compact .npz (replay reads both)")
    k.add_argument("src")
    k.add_argument("dst")
    q = sub.add_parser("rotations", help="replay policies on full packed .npz tables, once per rotation of the grid (mean accuracy)")
    q.add_argument("--table", action="append", required=True, help="NAME=table.npz (repeatable; from `pack`)")
    q.add_argument("--shifts", type=int, default=16, help="grid rotations per table")
    q.add_argument("--policy", action="append", required=True,
                   help="NAME=fixed:50,500:5,1 or NAME=adaptive:key=value,... (AdaptiveSchedule fields; 'adaptive:' alone = the defaults)")
    q.add_argument("--per-image", action="store_true", help="adaptive policies: each image its own random grid rotation (as --adaptive runs), not one shared grid")
    q.add_argument("--prompts", default=None)
    q.add_argument("--json", default=None)
    r = sub.add_parser("replay", help="replay the fixed schedules and the sequential policy on stored tables")
    r.add_argument("--table", action="append", required=True, help="NAME=errors.jsonl or NAME=table.npz (repeatable)")
    r.add_argument("--prompts", default=None, help="prompts CSV (default: the demo model's)")
    r.add_argument("--alphas", type=float, nargs="+", default=[0.3, 0.1, 0.05, 0.01, 0.001])
    r.add_argument("--n0", type=int, nargs="+", default=[4, 6, 8, 12])
    r.add_argument("--budgets", type=int, nargs="+", default=[500])
    r.add_argument("--kim-nelson", type=float, nargs="*", default=[0.05], help="rel_delta values for the Kim-Nelson rule (none: skip it)")
    r.add_argument("--reference", choices=["paper", "full"], default="paper")
    r.add_argument("--markdown", default=None)
    r.add_argument("--plot", default=None)
    r.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    if args.cmd == "collect":
        out = Path(args.out)
        cmd = [sys.executable, "-m", "diffcls", "evaluate", args.folder, "--n-samples", str(args.n_samples), "--to-keep", "1",
               "--seed", str(args.seed), "--save-errors", str(out), "--out", str(out.with_suffix(".csv")), "--no-cache"]
        if args.engines:
            cmd += ["--engines", args.engines]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return None
    if args.cmd == "pack":
        info = pack_table(args.src, args.dst)
        print(f"{args.dst}: {info['images']} images, errors {info['shape']}")
        return None

    classidx, classnames = _prompts(args.prompts)
    if args.cmd == "rotations":
        return rotations_main(args, classidx, classnames)
    tables = {}
    for spec in args.table:
        name, _, path = spec.partition("=")
        tables[name if path else Path(name).stem] = load_table(path or name, classidx, classnames)
    grid = min(len(t[0].common) for t in tables.values())
    rules = [("mixture", {})] + [("kim-nelson", {"rel_delta": d}) for d in (args.kim_nelson or [])]
    configs = default_configs(len(classidx), grid, args.alphas, args.n0, args.budgets, rules)
    report = run_replay(tables, classidx, configs, args.reference)
    text = markdown(report)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.plot:
        plot(report, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
