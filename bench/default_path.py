"""`diffcls classify examples/digits` with no flags: two checkouts back to back, idle and loaded.

    git archive 8715f90 | tar -x -C /tmp/before          # the checkout to compare against
    python bench/default_path.py before=/tmp/before after=. --loads 0,2 --repeats 3

Each checkout runs as a fresh process (`python -m diffcls classify examples/digits`, its own
PYTHONPATH and its own cache directory, warmed by one untimed run first: the after side's export
and both sides' latents happen there). Repeats are interleaved (before, after, before, ...), so a
drift in the machine's other load hits both. A load of N starts N `while True: pass` processes
for the runs and kills them afterwards. Prints one JSON line per run (wall seconds, the run's
own "UNet evals/s" and the "running ..." line) and a table of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(root: Path, cache: Path, folder: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "DIFFCLS_CACHE": str(cache)}
    env.pop("OMP_NUM_THREADS", None)  # the defaults, as a user gets them
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "diffcls", "classify", str(folder)], env=env, cwd=root,
                       capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    text = p.stdout + p.stderr
    m = re.search(r"([\d.]+) UNet evals/s", text)
    ran = next((line for line in text.splitlines() if line.startswith(("running ", "exporting ", "note: "))), "")
    return {"wall_s": round(wall, 2), "evals_per_s": float(m.group(1)) if m else None, "ran": ran, "loadavg": round(os.getloadavg()[0], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sides", nargs="+", help="name=checkout directory, e.g. before=/tmp/before after=.")
    p.add_argument("--folder", default="examples/digits")
    p.add_argument("--loads", default="0,2")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    sides = {s.split("=", 1)[0]: Path(s.split("=", 1)[1]).resolve() for s in a.sides}
    folder = Path(a.folder).resolve()
    caches = {name: Path(tempfile.mkdtemp(prefix=f"diffcls-bench-{name}-")) for name in sides}
    for name, root in sides.items():  # warm-up: exports and latents, untimed
        print(json.dumps({"warmup": name, **run(root, caches[name], folder)}), flush=True)
    rows = {}
    for load in [int(x) for x in a.loads.split(",")]:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            time.sleep(1)
            for rep in range(a.repeats):
                for name, root in sides.items():
                    r = run(root, caches[name], folder)
                    rows.setdefault((load, name), []).append(r)
                    print(json.dumps({"load": load, "side": name, "rep": rep, **r}), flush=True)
        finally:
            for s in spinners:
                s.kill()
                s.wait()
    print("| busy processes added | checkout | UNet evals/s (median) | wall s (median) | runs (evals/s) |")
    print("|---|---|---|---|---|")
    for (load, name), rs in rows.items():
        ev = [r["evals_per_s"] for r in rs]
        print(f"| {load} | {name} | {statistics.median(ev):.0f} | {statistics.median(r['wall_s'] for r in rs):.1f} | "
              f"{', '.join(f'{v:.0f}' for v in ev)} |")


if __name__ == "__main__":
    main()
