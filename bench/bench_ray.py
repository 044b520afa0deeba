"""Ray's overhead: `diffcls classify` on one process vs `--ray` with 1 and 2 workers, back to back.

Same images, prompts, schedule and seed in every run; each run is a fresh `python -m diffcls`
process writing its own --out (so Ray's cluster start, the workers' model loads and the
per-image dispatch are all in the wall time). Reports wall time, images/s over the whole
command, and the images/s the command itself prints (scoring only, after start-up).

    python bench/bench_ray.py                      # demo model, 40 held-out digits
    python bench/bench_ray.py --images 100 --workers 1 2 4

Needs scikit-learn (to write the digits) and ray[data].
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return wall, p.stderr + p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--extra", default="", help="more classify flags, e.g. '--n-samples 2 4 --to-keep 2 1'")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    folder = tmp / "digits"
    py = sys.executable
    run([py, "-m", "diffcls", "digits", str(folder), "--split", "heldout", "--limit", str(args.images)])
    n = len(list(folder.rglob("*.png")))
    base = [py, "-m", "diffcls", "classify", str(folder), "--no-cache", *args.extra.split()]
    configs = [("single process", [])] + [(f"--ray --ray-workers {w}", ["--ray", "--ray-workers", str(w)]) for w in args.workers]
    print(f"{n} images; command: {' '.join(base[1:])} --out OUT.csv [ray flags]")
    print("| run | wall s | images/s (wall) | images/s (scoring, as printed) |")
    print("|---|---|---|---|")
    for i, (name, flags) in enumerate(configs):
        wall, text = run(base + ["--out", str(tmp / f"out{i}.csv")] + flags)
        m = re.search(r"classified (\d+) images in ([\d.]+) s \(([\d.]+) img/s", text)
        printed = m.group(3) if m else "?"
        per_worker = re.search(r"per worker: (.*)", text)
        print(f"| {name} | {wall:.1f} | {n / wall:.2f} | {printed} |" + (f"  <!-- {per_worker.group(1)} -->" if per_worker else ""), flush=True)


if __name__ == "__main__":
    main()
