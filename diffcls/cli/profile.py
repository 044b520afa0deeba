"""`diffcls profile`: where the time goes, per stage, on a folder of images.

Runs the same pipeline as `classify` (same options) over the first `--limit` images and reports,
per stage (model/engine load, preprocess, text encode, VAE encode, UNet scoring per round, total),
the number of calls, total seconds and p50/p90 per call, plus UNet evals/s, images/s, the padding
fraction of UNet batches, UNet evaluations per image (mean, p50, p90, max: they vary per image
with --adaptive), cache hits/misses and the peak GPU memory. `--warmup` classifies one
image first, outside the measurement (with the cache off, so that it warms every stage), so
compile and first-call costs are reported on their own line.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.classify import PathsArg
from diffcls.cli.settings import RunSettings, run_options
from diffcls.cli.common import LineProgress, app, console, interactive, out, per_second, user_errors
from diffcls.errors import DiffclsError, missing_extra

# stage names in report order; "unet_round_N" rows are inserted where "unet_round" stands
STAGE_ORDER = ("load", "preprocess", "text_encode", "vae_encode", "unet_round", "unet_call")
STAGE_LABELS = {
    "load": "load model/engines",
    "preprocess": "preprocess*",
    "text_encode": "text encode",
    "vae_encode": "VAE encode",
    "unet_call": "UNet, all calls",
    "total": "total",
}


def _ordered(stages: dict) -> list[str]:
    names = []
    for s in STAGE_ORDER:
        if s == "unet_round":
            names += sorted((n for n in stages if n.startswith("unet_round_")), key=lambda n: int(n.rsplit("_", 1)[1]))
        elif s in stages:
            names.append(s)
    rest = [n for n in stages if n not in names and n != "total"]
    return names + rest + (["total"] if "total" in stages else [])


def _label(name: str) -> str:
    if name.startswith("unet_round_"):
        return f"UNet round {name.rsplit('_', 1)[1]}"
    return STAGE_LABELS.get(name, name)


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "plot") from None
    return plt


def plot_stages(report: dict, path: Path) -> None:
    """Horizontal bars: total seconds per stage (and the warm-up, if any)."""
    plt = _require_matplotlib()
    stages = report["stages"]
    names = [n for n in _ordered(stages) if n != "unet_call"]
    secs = [stages[n]["total_s"] for n in names]
    labels = [_label(n) for n in names]
    if report.get("warmup"):
        labels.append("warm-up (not counted)")
        secs.append(report["warmup"]["total_s"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    bars = ax.barh(range(len(secs)), secs, color=["#4c72b0"] * len(names) + ["#dd8452"] * (len(secs) - len(names)))
    ax.set_yticks(range(len(secs)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    for bar, s in zip(bars, secs):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {s:.3g} s", va="center", fontsize=8)
    s = report["settings"]
    ax.set_title(
        f"diffcls profile: {report['n_images']} images, {s['backend']} {s['precision']} on {s['device']}, "
        f"{per_second(report['unet_evals_per_s'], 'UNet evals', 'UNet eval', 0)}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _peak_memory(device) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def _print_report(report: dict) -> None:
    from rich.table import Table

    stages = report["stages"]
    wall = report["total_s"]
    table = Table(title=f"diffcls profile ({report['n_images']} images)")
    table.add_column("stage", no_wrap=True)
    for col, just in (("calls", "right"), ("total s", "right"), ("p50 ms/call", "right"), ("p90 ms/call", "right"), ("% of run", "right")):
        table.add_column(col, justify=just)
    for name in _ordered(stages):
        st = stages[name]
        share = "-" if name == "load" or not wall else f"{100 * st['total_s'] / wall:.1f}"
        table.add_row(_label(name), str(st["calls"]), f"{st['total_s']:.3f}", f"{st['p50_ms']:.2f}", f"{st['p90_ms']:.2f}", share)
    if report.get("warmup"):
        w = report["warmup"]["total_s"]
        table.add_row("warm-up (not counted)", "1", f"{w:.3f}", f"{1000 * w:.2f}", f"{1000 * w:.2f}", "-")
    out.print(table)
    out.print("* on worker threads, overlapped with the UNet; p50/p90 are per call")
    cache = report["cache"]
    cache_txt = "off" if cache is None else f"{cache['hits']} hits, {cache['misses']} misses" + (f", {cache['rejected']} rejected" if cache["rejected"] else "")
    mem = report["peak_gpu_memory_bytes"]
    ev = report.get("evals_per_image")
    if ev:
        out.print(f"UNet evaluations per image: mean {ev['mean']:.1f}, p50 {ev['p50']:.0f}, p90 {ev['p90']:.0f}, max {ev['max']}")
    out.print(
        f"{per_second(report['images_per_s'], 'images', 'image', 3)}, "
        f"{per_second(report['unet_evals_per_s'], 'UNet evals', 'UNet eval', 1)} "
        f"({report['unet_evals']} evals in {report['unet_calls']} calls), padding "
        f"{100 * report['padding_fraction']:.2f}%, cache {cache_txt}, peak GPU memory "
        + ("n/a (no GPU)" if mem is None else f"{mem / 2**20:.0f} MiB")
    )


@app.command()
@run_options
def profile(
    paths: PathsArg = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Profile only the first N images.")] = None,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="Classify one image first, not counted (reports compile/first-call cost separately).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full profile as JSON.")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a per-stage bar chart (PNG; needs matplotlib).")] = None,
    *,
    settings: RunSettings,
) -> None:
    """Per-stage latency of classification: load, preprocess, text/VAE encode, UNet rounds."""
    with user_errors():
        if plot is not None:
            _require_matplotlib()  # fail before any work
        from diffcls.runtime.results import check_writable

        check_writable(json_out, "--json")  # before the run, not after it finished
        check_writable(plot, "--plot")

        from diffcls.runtime.job import ClassifyJob

        job = ClassifyJob(settings, paths or []).open()  # prompts, schedule, noise, the opened classifier
        s = settings
        images = [str(p) for p in job.inputs.images[:limit]]
        kw = dict(seed=s.seed, noise=job.noise, batch_size=s.batch_size, interpolation=s.interpolation.value, workers=s.workers)
        report = profile_run(job.classifier, images, job.prompts, job.schedule, warmup=warmup, **kw)
        report["settings"].update(
            {
                "folder": ", ".join(paths or []),
                "list": str(s.list_file) if s.list_file is not None else None,
                "model": str(s.model) if s.model is not None else None,
                "engines": str(s.engines) if s.engines is not None else None,
                "interpolation": s.interpolation.value,
                "workers": s.workers,
            }
        )
        _print_report(report)
        if json_out is not None:
            from diffcls.runtime.results import atomic_write_text

            atomic_write_text(json_out, json.dumps(report, indent=2))
            console.print(f"profile in {json_out}")
        if plot is not None:
            plot_stages(report, plot)
            console.print(f"stage plot in {plot}")
        if not report["n_images"]:
            raise DiffclsError(f"no image of {', '.join(paths or [str(s.list_file)])} could be classified; see the skipped files above")


def _distribution(values: list[int]) -> dict | None:
    """mean, p50, p90 and max of UNet evaluations per image (None without images)."""
    if not values:
        return None
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "max": int(v.max())}


def profile_run(clf, images: list, pset, schedule, *, warmup: bool = False, **kw) -> dict:
    """Classify `images` with per-stage timing; returns the report dict (see module docstring)."""
    import torch

    e = clf.engines
    skipped: list[list[str]] = []

    def on_skip(path, msg):
        skipped.append([path, msg])
        console.print(f"[yellow]skipped[/] {msg}")

    warm = None
    if warmup and images:
        saved, clf.cache = clf.cache, None  # warm every stage, leave the cache untouched
        start = time.perf_counter()
        try:
            for _ in clf.iter_classify(images[:1], pset, schedule, on_skip=lambda *a: None, **kw):
                pass
        finally:
            clf.cache = saved
        warm = {"total_s": time.perf_counter() - start, "stages": {k: v for k, v in clf.timer.summary().items() if k != "load"}}
        load = clf.timer.calls.get("load", [])
        clf.timer.calls.clear()
        if load:
            clf.timer.calls["load"] = load
    if e.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(e.device)
    cache0 = (clf.cache.hits, clf.cache.misses, clf.cache.rejected) if clf.cache is not None else None
    start = time.perf_counter()
    n = 0
    n_evals: list[int] = []
    # a spinner on a terminal; in a log or pipe (where it shows nothing), a line every few seconds
    lines = None if interactive(console) else LineProgress(console)
    task = lines.add_task("profile", total=len(images)) if lines is not None else None
    with console.status(f"profiling {len(images)} images ...") if lines is None else contextlib.nullcontext():
        for r in clf.iter_classify(images, pset, schedule, on_skip=on_skip, **kw):
            n += 1
            n_evals.append(r.n_evals)
            if lines is not None:
                lines.advance(task)
    if e.device.type == "cuda":
        torch.cuda.synchronize(e.device)
    wall = time.perf_counter() - start
    stats = clf.last_stats
    unet_s = sum(stats.unet_seconds) if stats else 0.0
    stages = clf.timer.summary()
    for name in ("text_encode", "vae_encode"):  # a cached run shows these as 0 calls, not as nothing
        stages.setdefault(name, {"calls": 0, "total_s": 0.0, "p50_ms": 0.0, "p90_ms": 0.0})
    stages["total"] = {"calls": 1, "total_s": wall, "p50_ms": 1000 * wall, "p90_ms": 1000 * wall}
    peak = _peak_memory(e.device)
    cache = None
    if clf.cache is not None:
        c = clf.cache
        cache = {"hits": c.hits - cache0[0], "misses": c.misses - cache0[1], "rejected": c.rejected - cache0[2], "dir": str(c.root)}
    return {
        "settings": {
            "backend": e.backend,
            "device": str(e.device),
            "precision": e.precision,
            "compile": bool(e.info.get("compile", False)),
            "batch_size": kw.get("batch_size"),
            "threads": torch.get_num_threads(),
            "image_size": e.image_size,
            "model_fingerprint": e.fingerprint,
            "model_source": e.info.get("source"),
            "n_prompts": len(pset),
            "schedule": schedule.describe(),
        },
        "n_images": n,
        "total_s": wall,
        "stages": stages,
        "warmup": warm,
        "images_per_s": n / wall if wall else 0.0,
        "unet_evals": stats.unet_evals if stats else 0,
        "unet_calls": stats.unet_calls if stats else 0,
        "unet_seconds": unet_s,
        "unet_evals_per_s": (stats.unet_evals / unet_s) if stats and unet_s else 0.0,
        "end_to_end_evals_per_s": (stats.unet_evals / wall) if stats and wall else 0.0,
        "padding_fraction": stats.padding_fraction if stats else 0.0,
        "evals_per_image": _distribution(n_evals),
        "cache": cache,
        "peak_gpu_memory_bytes": peak,  # None (JSON null) without a GPU
        "skipped": skipped,
    }
