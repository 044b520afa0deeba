"""CPU threads against background load: UNet evaluations/s of the demo model, torch and ONNX Runtime.

    python bench/threads.py --engines /tmp/eng              # export first: diffcls export --out /tmp/eng
    python bench/threads.py --engines /tmp/eng --loads 0,1,2,4 --threads 1,2 --repeats 3

For every background load (that many `while True: pass` processes, each wanting one core) and
every thread count, a fresh process opens the engines (torch: the demo model; onnxruntime: the
engine directory), warms up, and times UNet calls at batch 32 for `--seconds`. Prints one JSON
line per measurement and a median table; the background processes are killed after each load.
This is what `diffcls.engines.threads.choose_threads`'s rule is measured by (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKER = r"""
import json, sys, time, torch
backend, threads, engines, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
torch.set_num_threads(threads)
from diffcls.engines import open_engines
if backend == "torch":
    e = open_engines("torch", model=None, device="cpu")
else:
    e = open_engines("onnxruntime", engine_dir=engines, device="cpu", threads=threads)
u = e.unet
shape = u.spec.input("sample").concrete(32)
hidden = e.text_encoder.spec.outputs[0].concrete(32)
feed = {"sample": torch.randn(shape), "timestep": torch.full((32,), 500, dtype=torch.int64),
        "encoder_hidden_states": torch.randn(hidden)}
feed = {k: v for k, v in feed.items() if k in u.spec.input_names}
for _ in range(3):
    u(feed)
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    u(feed)
    n += 1
dt = time.perf_counter() - t0
print(json.dumps({"evals_per_s": 32 * n / dt, "calls": n, "seconds": dt}))
"""


def measure(backend: str, threads: int, engines: str, seconds: float) -> float:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, backend, str(threads), engines, str(seconds)],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["evals_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", required=True, help="an ONNX Runtime engine directory of the demo model")
    p.add_argument("--loads", default="0,1,2,4", help="background busy processes, comma-separated")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--backends", default="torch,onnxruntime")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    a = p.parse_args()
    table = {}
    for load in [int(x) for x in a.loads.split(",")]:
        spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
        try:
            time.sleep(0.5)
            for rep in range(a.repeats):  # repeats interleaved, so slow drifts hit every config
                for backend in a.backends.split(","):
                    for threads in [int(x) for x in a.threads.split(",")]:
                        v = measure(backend, threads, a.engines, a.seconds)
                        table.setdefault((load, backend, threads), []).append(v)
                        print(json.dumps({"load": load, "backend": backend, "threads": threads, "rep": rep,
                                          "evals_per_s": round(v, 1), "loadavg": os.getloadavg()[0]}), flush=True)
        finally:
            for s in spinners:
                s.kill()
                s.wait()
    print("| background busy processes | backend | threads | UNet evals/s (median) | runs |")
    print("|---|---|---|---|---|")
    for (load, backend, threads), vs in sorted(table.items()):
        print(f"| {load} | {backend} | {threads} | {statistics.median(vs):.0f} | {', '.join(f'{v:.0f}' for v in vs)} |")


if __name__ == "__main__":
    main()
