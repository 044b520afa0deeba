"""Per-stage timers: wall time per call, device-synchronized, summarized as p50/p90."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable


def synchronize(device) -> None:
    """Wait for a CUDA device's queued work (nothing on a CPU). torch is imported here: the CLI
    imports this module for `rate` before it needs torch."""
    if device is None:
        return
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Collects durations per stage name: `with timer.stage("vae_encode"): ...`."""

    def __init__(self, device=None):  # torch.device | None
        self.device = device
        self.calls: dict[str, list[float]] = defaultdict(list)

    @contextlib.contextmanager
    def stage(self, name: str):
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.calls[name].append(time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.calls[name].append(seconds)

    def per_item_speed(self, n: int) -> str:
        """'1.2 ms preprocess, 0.4 ms text encode, ... per image' (stages summed, over `n` images)."""
        stages = self.summary()

        def ms(*names):
            return 1000 * sum(stages.get(k, {}).get("total_s", 0.0) for k in names) / max(1, n)

        unet = [k for k in stages if k.startswith("unet_round_")]
        parts = [("preprocess", ("preprocess",)), ("text encode", ("text_encode",)), ("VAE encode", ("vae_encode",)), ("UNet", unet)]
        return ", ".join(f"{ms(*keys):.1f} ms {label}" for label, keys in parts) + " per image"

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for name, xs in self.calls.items():
            s = sorted(xs)
            out[name] = {
                "calls": len(s),
                "total_s": sum(s),
                "p50_ms": 1000 * _quantile(s, 0.5),
                "p90_ms": 1000 * _quantile(s, 0.9),
            }
        return out


def _quantile(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return 0.0
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def rate(count: float, seconds: float, unit: str, per_unit: str | None = None, digits: int = 2) -> str:
    """'3.91 img/s', or '4.20 s/img' when it is below one per second (a large model on a CPU).

    `unit` is the plural written before "/s" ("img", "UNet evals"); `per_unit` the singular
    written after "s/" (default: `unit`).
    """
    if count <= 0 or seconds <= 0:
        return f"0 {unit}/s"
    return per_second(count / seconds, unit, per_unit, digits)


def per_second(value: float, unit: str, per_unit: str | None = None, digits: int = 2) -> str:
    """A rate `value` (per second) as `rate` writes it: seconds per item when below 1/s."""
    if value >= 1:
        return f"{value:.{digits}f} {unit}/s"
    if value <= 0:
        return f"0 {unit}/s"
    return f"{1 / value:.2f} s/{per_unit or unit}"


def hms(seconds: float) -> str:
    """'0:04:18'."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def about(seconds: float) -> str:
    """'45 s', '12 min', '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(description: str, done: float, total: float | None, elapsed: float, unit: str = "images") -> str:
    """'classify: 120/1000 images (12%), 3.41 img/s, elapsed 0:00:35, ETA 0:04:18' (a progress
    line for logs and pipes; seconds per image below one a second)."""
    text = f"{description}: {done:g}/{total:g} {unit} ({100 * done / total:.0f}%)" if total else f"{description}: {done:g} {unit}"
    per_s = done / elapsed if elapsed > 0 else 0.0
    if per_s > 0:
        text += ", " + per_second(per_s, "img")
    text += f", elapsed {hms(elapsed)}"
    if total and per_s > 0:
        text += f", ETA {hms((total - done) / per_s)}"
    return text


class ProgressLines:
    """Progress for logs and pipes, where a live bar draws nothing until the end: `write` gets one
    `progress_line` every `interval` seconds. Its interface is the part of
    `rich.progress.Progress`'s a run loop uses (add_task, advance, update, a context manager),
    so a caller can pick either and run the same loop."""

    def __init__(self, write: Callable[[str], None], interval: float = 5.0, unit: str = "images"):
        self.write, self.interval, self.unit = write, interval, unit
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        now = time.monotonic()
        self.tasks[len(self.tasks)] = {"description": description, "total": total, "done": 0, "start": now, "last": now}
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, advance: float = 0, completed: float | None = None, total: float | None = None, **fields) -> None:
        t = self.tasks[task]
        if total is not None:
            t["total"] = total
        t["done"] = completed if completed is not None else t["done"] + advance
        now = time.monotonic()
        if now - t["last"] >= self.interval:
            t["last"] = now
            self.write(self.line(task, now))

    def line(self, task: int, now: float | None = None) -> str:
        t = self.tasks[task]
        elapsed = (time.monotonic() if now is None else now) - t["start"]
        return progress_line(t["description"], t["done"], t["total"], elapsed, self.unit)
