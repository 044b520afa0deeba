"""Host time per UNet batch: the whole `diffcls classify` pipeline around a UNet that takes no time.

The demo model's shapes (10 prompts, 32 px images, (4, 8, 8) latents), batch 32, its real text
encoder and VAE, and a no-op UNet engine that returns a preallocated zero tensor at once. What is
left between two UNet calls is the host's work per batch: building the batch (gather, noising,
the loss), copying the errors back, feeding the policy, admitting images, writing results rows.
On a GPU that time is spent while the device idles unless it overlaps the next call; the goal is
under 1 ms per batch, so that a 64 ms SD-2.1 UNet call never waits on the host.

Runs the CLI in this process (Typer's runner), fixed and adaptive schedules, with and without
--out, and reports per run: UNet calls, the wall time from the first UNet call to the last, and
that time per call (minus the no-op's own time inside the calls). The latent cache is warmed by a
first pass, so the VAE is not what is measured.

    python bench/host_overhead.py [--images 120] [--reps 3] [--json out.json]

`--real` keeps the demo's real UNet (timed, not replaced) and reports, per run, the wall time
per UNet *evaluation* from the first UNet call to the last: whether --adaptive (small blocks,
more host work per evaluation) costs more wall time per evaluation than the fixed schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


class TimedUNet:
    """The real UNet engine, with every call's entry and exit time recorded."""

    def __init__(self, real):
        self.real = real
        self.batch_sizes, self.device, self.dtype, self.spec = real.batch_sizes, real.device, real.dtype, real.spec
        self.calls: list[tuple[float, float]] = []

    def __call__(self, feed):
        start = time.perf_counter()
        out = self.real(feed)
        self.calls.append((start, time.perf_counter()))
        return out


class NoOpUNet:
    """Looks like the UNet engine it replaces and returns at once, computing nothing a UNet
    would: its prediction is a constant per prompt (a hash-like function of its embedding),
    so prompts get different errors and the adaptive schedule eliminates as it would on a
    real model instead of running every image to its budget."""

    def __init__(self, real):
        self.batch_sizes, self.device, self.dtype, self.spec = real.batch_sizes, real.device, real.dtype, real.spec
        self._zeros: dict[tuple, torch.Tensor] = {}
        self.calls: list[tuple[float, float]] = []  # (entry, exit) perf_counter per call

    def __call__(self, feed):
        start = time.perf_counter()
        x = feed["sample"]
        out = self._zeros.get(tuple(x.shape))
        if out is None:
            out = self._zeros[tuple(x.shape)] = torch.zeros_like(x)
        cond = feed[self.spec.condition]
        level = (cond.flatten(1).float().mean(1) * 1000).frac().abs().view(-1, 1, 1, 1)  # (B, 1, 1, 1): one per prompt
        self.calls.append((start, time.perf_counter()))
        return {"out_sample": out + level}


_engines: list[NoOpUNet] = []


def _patch(wrapper) -> None:
    """Every Classifier opened from here on gets its UNet wrapped (remembered in `_engines`)."""
    from diffcls.runtime.execution.classifier import Classifier

    real = Classifier.from_pretrained.__func__

    def from_pretrained(cls, *a, **kw):
        clf = real(cls, *a, **kw)
        clf.engines.unet = wrapper(clf.engines.unet)
        _engines.append(clf.engines.unet)
        return clf

    Classifier.from_pretrained = classmethod(from_pretrained)


def _invoke(args: list[str]) -> str:
    from typer.testing import CliRunner

    from diffcls.cli.app import app

    r = CliRunner().invoke(app, args, catch_exceptions=False)
    if r.exit_code != 0:
        raise SystemExit(f"diffcls {' '.join(args)} failed:\n{r.output}")
    return r.output


def run_once(folder: Path, schedule: list[str], out: Path | None, cache: Path, extra: list[str] = ()) -> dict:
    _engines.clear()
    args = ["classify", str(folder), "--batch-size", "32", "--cache-dir", str(cache), *schedule, *extra]
    if out is not None:
        args += ["--out", str(out)]
    _invoke(args)
    calls = _engines[-1].calls
    n = len(calls)
    span = calls[-1][0] - calls[0][0]  # first entry to last entry: n - 1 gaps
    inside = sum(b - a for a, b in calls[:-1])
    rec = {"unet_calls": n, "span_s": span, "host_ms_per_batch": 1000 * (span - inside) / max(1, n - 1)}
    if out is not None:
        import csv

        with open(out, newline="") as f:
            evals = sum(int(r["n_evals"]) for r in csv.DictReader(f))
        whole = calls[-1][1] - calls[0][0]  # first entry to last exit: every evaluation
        rec.update(unet_evals=evals, wall_ms_per_eval=1000 * whole / evals, unet_ms_per_eval=1000 * sum(b - a for a, b in calls) / evals)
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=120, help="held-out digits to classify")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--real", action="store_true", help="time the real UNet instead of a no-op (with --out only)")
    ap.add_argument("--args", default="", help="more classify options for every run, e.g. '--backend torch'")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _patch(TimedUNet if args.real else NoOpUNet)
    from diffcls.models.digits import write_digits

    schedules = {"fixed": [], "adaptive": ["--adaptive"]}  # the demo's own fixed schedule (10 50 / 3 1)
    report = {"images": args.images, "batch_size": 32, "unet": "real" if args.real else "no-op", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "digits"
        write_digits(folder, "heldout", args.images)
        cache = tmp / "cache"
        _invoke(["classify", str(folder), "--cache-dir", str(cache), "--n-samples", "2", "--to-keep", "1", *args.args.split()])  # warm the latents
        for rep in range(args.reps):
            for name, sched in schedules.items():
                for with_out in (True,) if args.real else (False, True):
                    out = tmp / f"r{rep}-{name}.csv" if with_out else None
                    r = {"schedule": name, "out": with_out, "rep": rep, **run_once(folder, sched, out, cache, args.args.split())}
                    report["runs"].append(r)
                    per_eval = f", {r['wall_ms_per_eval']:.3f} ms wall per UNet evaluation ({r['unet_ms_per_eval']:.3f} in the UNet)" if args.real else ""
                    print(f"{name:8s} out={'yes' if with_out else 'no ':3s} rep {rep}: {r['unet_calls']} UNet calls, "
                          f"{r['host_ms_per_batch']:.3f} ms host time per batch{per_eval}", flush=True)
    what = "wall_ms_per_eval" if args.real else "host_ms_per_batch"
    print("median " + ("wall ms per UNet evaluation:" if args.real else "host ms per UNet batch:"))
    for name in schedules:
        for with_out in (True,) if args.real else (False, True):
            vals = sorted(r[what] for r in report["runs"] if r["schedule"] == name and r["out"] == with_out)
            med = vals[len(vals) // 2]
            report.setdefault("median_ms", {})[f"{name}{'+out' if with_out else ''}"] = med
            print(f"  {name:8s} {'with' if with_out else 'without'} --out: {med:.3f} ms")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
