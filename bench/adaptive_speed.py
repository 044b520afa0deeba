"""UNet evaluations/s of the fixed schedule and the sequential policy at the same batch size.

Alternates the two on the same images with the same warm engines (so a shared machine's load
hits both alike) and prints, per run: evaluations per image, padding fraction, UNet evals/s over
the wall time and over the UNet calls alone.

    python bench/adaptive_speed.py FOLDER --engines /tmp/eng --reps 3 \\
        --fixed 10 50 --to-keep 3 1 --alpha 0.05 --min-samples 6 --max-samples 50
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffcls.runtime.execution.job import ClassifyJob  # noqa: E402
from diffcls.runtime.execution.spec import JobSpec  # noqa: E402
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--engines", type=Path, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fixed", type=int, nargs="+", default=[10, 50], help="--n-samples of the fixed schedule")
    ap.add_argument("--to-keep", type=int, nargs="+", default=[3, 1])
    # the sequential policy: AdaptiveSchedule's defaults for whatever is not given
    ap.add_argument("--error-rate", type=float, default=None)
    ap.add_argument("--alpha", type=float, default=None)
    ap.add_argument("--look-every", type=int, default=None)
    ap.add_argument("--min-samples", type=int, default=None)
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--final-samples", type=int, default=None)
    ap.add_argument("--final-keep", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    s = JobSpec(engines=args.engines, no_cache=True, batch_size=args.batch_size)
    run = ClassifyJob(s, [args.folder], labels="name").open()  # prompts from the class folders (or the model's)
    clf = run.classifier
    paths = sorted(str(p) for p in args.folder.rglob("*.png"))
    given = {k: getattr(args, k) for k in ("error_rate", "alpha", "min_samples", "max_samples", "final_samples", "final_keep", "look_every") if getattr(args, k) is not None}
    adaptive = AdaptiveSchedule(**given)
    policies = {
        f"fixed {args.fixed} -> {args.to_keep}": Schedule(tuple(args.fixed), tuple(args.to_keep)),
        "sequential " + adaptive.describe(): adaptive,
    }
    out: dict[str, list] = {k: [] for k in policies}
    for rep in range(args.reps):
        for name, schedule in policies.items():
            start = time.perf_counter()
            n = len(list(clf.iter_classify(paths, run.prompts, schedule, seed=0, batch_size=args.batch_size)))
            wall = time.perf_counter() - start
            st = clf.last_stats
            rec = {
                "rep": rep,
                "images": n,
                "evals_per_image": st.unet_evals / n,
                "padding": st.padding_fraction,
                "evals_per_s_wall": st.unet_evals / wall,
                "evals_per_s_unet": st.unet_evals / sum(st.unet_seconds),
            }
            out[name].append(rec)
            print(name, json.dumps(rec), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
