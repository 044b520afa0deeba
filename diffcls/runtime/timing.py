"""Per-stage timers: wall time per call, device-synchronized, summarized as p50/p90."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


def synchronize(device: torch.device | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Collects durations per stage name: `with timer.stage("vae_encode"): ...`."""

    def __init__(self, device: torch.device | None = None):
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
