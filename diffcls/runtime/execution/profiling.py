"""Per-stage profiling of classification (`diffcls profile`): where the time goes.

`profile_run` classifies images with per-stage timing and returns a plain report: per stage
(model/engine load, preprocess, text encode, VAE encode, UNet per round, all UNet calls,
total) the number of calls, total seconds and p50/p90 per call, plus UNet evals/s, images/s,
the padding fraction, UNet evaluations per image (mean, p50, p90, max: they vary per image
with --adaptive), cache hits/misses and the peak GPU memory. `plot_stages` draws it.
"""

from __future__ import annotations

import time
from pathlib import Path

from diffcls.errors import missing_extra
from diffcls.runtime.execution.timing import per_second

# stage names in report order; "unet_round_N" rows are inserted where "unet_round" stands
STAGE_ORDER = ("load", "preprocess", "text_encode", "vae_encode", "unet_round", "unet_call")
STAGE_LABELS = {
    "load": "load model/engines",
    "preprocess": "preprocess (threads)",
    "text_encode": "text encode",
    "vae_encode": "VAE encode",
    "unet_call": "UNet, all calls",
    "total": "total",
}


def ordered_stages(stages: dict) -> list[str]:
    names = []
    for s in STAGE_ORDER:
        if s == "unet_round":
            names += sorted((n for n in stages if n.startswith("unet_round_")), key=lambda n: int(n.rsplit("_", 1)[1]))
        elif s in stages:
            names.append(s)
    rest = [n for n in stages if n not in names and n != "total"]
    return names + rest + (["total"] if "total" in stages else [])


def stage_label(name: str) -> str:
    if name.startswith("unet_round_"):
        return f"UNet round {name.rsplit('_', 1)[1]}"
    return STAGE_LABELS.get(name, name)


def stage_rows(report: dict) -> list[tuple[str, ...]]:
    """The report's stages as text cells: stage, calls, total s, p50 and p90 ms per call, % of
    the run; a text/VAE stage the cache answered entirely is '(cached)'; the warm-up last."""
    stages, wall, cache = report["stages"], report["total_s"], report["cache"]
    rows = []
    for name in ordered_stages(stages):
        st = stages[name]
        share = "-" if name == "load" or not wall else f"{100 * st['total_s'] / wall:.1f}"
        cached = name in ("text_encode", "vae_encode") and st["calls"] == 0 and cache and cache.get("hits")
        rows.append((stage_label(name) + (" (cached)" if cached else ""), str(st["calls"]), f"{st['total_s']:.3f}", f"{st['p50_ms']:.2f}", f"{st['p90_ms']:.2f}", share))
    if report.get("warmup"):
        w = report["warmup"]["total_s"]
        rows.append(("warm-up (not counted)", "1", f"{w:.3f}", f"{1000 * w:.2f}", f"{1000 * w:.2f}", "-"))
    return rows


def summary_lines(report: dict) -> list[str]:
    """UNet evaluations per image (when they vary) and the rates, padding, cache and GPU memory."""
    cache, mem, ev = report["cache"], report["peak_gpu_memory_bytes"], report.get("evals_per_image")
    cache_txt = "off" if cache is None else f"{cache['hits']} hits, {cache['misses']} misses" + (f", {cache['rejected']} rejected" if cache["rejected"] else "")
    lines = [f"UNet evaluations per image: mean {ev['mean']:.1f}, p50 {ev['p50']:.0f}, p90 {ev['p90']:.0f}, max {ev['max']}"] if ev else []
    return lines + [
        f"{per_second(report['images_per_s'], 'images', 'image', 3)}, "
        f"{per_second(report['unet_evals_per_s'], 'UNet evals', 'UNet eval', 1)} "
        f"({report['unet_evals']} evals in {report['unet_calls']} calls), padding "
        f"{100 * report['padding_fraction']:.2f}%, cache {cache_txt}, peak GPU memory "
        + ("n/a (no GPU)" if mem is None else f"{mem / 2**20:.0f} MiB")
    ]


def report_view(report: dict):
    """The report as rich renderables (`rich.print(report_view(profile_job(job.open())))`): the
    stage table (`stage_rows`), what the stages mean, `summary_lines`."""
    from diffcls.render import lines, table

    cols = ("stage", "calls", "total s", "p50 ms/call", "p90 ms/call", "% of run")
    return lines(table(cols, stage_rows(report), left=("stage",), wrap=cols[1:], title=f"diffcls profile ({report['n_images']} images)"),
                 "preprocess: reading, decoding and resizing images on --workers threads, overlapped with the UNet; cached: the cache held every result, so the stage did not run; p50/p90 are per call",
                 *summary_lines(report))


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "plot") from None
    return plt


def plot_stages(report: dict, path: Path) -> None:
    """Horizontal bars: total seconds per stage (and the warm-up, if any)."""
    plt = require_matplotlib()
    stages = report["stages"]
    names = [n for n in ordered_stages(stages) if n != "unet_call"]
    secs = [stages[n]["total_s"] for n in names]
    labels = [stage_label(n) for n in names]
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
    ax.set_xlim(0, 1.2 * max(secs + [1e-9]))  # room for the longest bar's label
    s = report["settings"]
    ax.set_title(
        f"diffcls profile: {report['n_images']} images, {s['backend']} {s['precision']} on {s['device']}, "
        f"{per_second(report['unet_evals_per_s'], 'UNet evals', 'UNet eval', 0)}",
        fontsize=9,
    )
    fig.tight_layout()
    from diffcls.runtime.results.outputs import save_figure

    try:
        save_figure(fig, path)  # in one piece: a full disk leaves no empty PNG
    finally:
        plt.close(fig)


def peak_memory(device) -> int | None:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def _distribution(values: list[int]) -> dict | None:
    """mean, p50, p90 and max of UNet evaluations per image (None without images)."""
    if not values:
        return None
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "max": int(v.max())}


def profile_run(clf, images: list, pset, schedule, *, warmup: bool = False, on_skip=None, on_image=None, **kw) -> dict:
    """Classify `images` with per-stage timing; returns the report dict (see module docstring).
    `on_skip(path, message)` hears of unreadable images, `on_image()` of each one classified."""
    import torch

    e = clf.engines
    skipped: list[list[str]] = []

    def skip(path, msg):
        skipped.append([path, msg])
        if on_skip is not None:
            on_skip(path, msg)

    warm = _warm_up(clf, images[:1], pset, schedule, kw) if warmup and images else None
    if e.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(e.device)
    cache0 = (clf.cache.hits, clf.cache.misses, clf.cache.rejected) if clf.cache is not None else None
    start = time.perf_counter()
    n_evals: list[int] = []
    for r in clf.iter_classify(images, pset, schedule, on_skip=skip, **kw):
        n_evals.append(r.n_evals)
        if on_image is not None:
            on_image()
    if e.device.type == "cuda":
        torch.cuda.synchronize(e.device)
    wall = time.perf_counter() - start
    return _report(clf, pset, schedule, kw, wall, n_evals, warm, cache0, skipped)


def _report(clf, pset, schedule, kw: dict, wall: float, n_evals: list[int], warm, cache0, skipped) -> dict:
    import torch

    e = clf.engines
    stats = clf.last_stats
    unet_s = sum(stats.unet_seconds) if stats else 0.0
    stages = clf.timer.summary()
    for name in ("text_encode", "vae_encode"):  # a cached run shows these as 0 calls, not as nothing
        stages.setdefault(name, {"calls": 0, "total_s": 0.0, "p50_ms": 0.0, "p90_ms": 0.0})
    stages["total"] = {"calls": 1, "total_s": wall, "p50_ms": 1000 * wall, "p90_ms": 1000 * wall}
    peak = peak_memory(e.device)
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
        "n_images": len(n_evals),
        "total_s": wall,
        "stages": stages,
        "warmup": warm,
        "images_per_s": len(n_evals) / wall if wall else 0.0,
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


def _warm_up(clf, images: list, pset, schedule, kw: dict) -> dict:
    """Classify `images` (one) with the cache off, so that every stage is warmed and the cache
    left as it was; the timer keeps only the load. Returns what the warm-up took."""
    saved, clf.cache = clf.cache, None
    start = time.perf_counter()
    try:
        for _ in clf.iter_classify(images, pset, schedule, on_skip=lambda *a: None, **kw):
            pass
    finally:
        clf.cache = saved
    warm = {"total_s": time.perf_counter() - start, "stages": {k: v for k, v in clf.timer.summary().items() if k != "load"}}
    load = clf.timer.calls.get("load", [])
    clf.timer.calls.clear()
    if load:
        clf.timer.calls["load"] = load
    return warm


def profile_job(job, *, warmup: bool = False, on_skip=None, on_image=None) -> dict:
    """`profile_run` over an opened `ClassifyJob`'s images (its --limit / --sample taken), with
    the job's classifier, prompts, schedule and noise; the report's settings name what ran."""
    s = job.spec
    images = [str(p) for p in job.inputs.images]
    report = profile_run(job.classifier, images, job.prompts, job.schedule, warmup=warmup, on_skip=on_skip, on_image=on_image,
                         seed=s.seed, noise=job.noise, batch_size=s.batch_size, interpolation=s.interpolation.value, workers=s.workers)

    def text(p):
        return str(p) if p is not None else None

    report["settings"].update({"folder": ", ".join(a for a in job.inputs.named if not a.startswith("--list ")),
                               "list": text(s.list_file), "model": text(s.model), "engines": text(s.engines),
                               "interpolation": s.interpolation.value, "workers": s.workers})
    return report
