"""Scores that compare across classes, and calibrated class probabilities.

A fixed schedule (or a sequential policy) evaluates different prompts on different numbers of
(timestep, trial) samples: a prompt pruned after round 1 has a mean over round 1's samples only,
a survivor over all rounds. Those means are not comparable (the error depends strongly on t).
What compares is each listed prompt's mean error over the samples *every listed prompt shares*:

    shared(P) = {(t, trial) evaluated for every prompt in P}
    m_c       = mean of c's errors over shared(P)          (a mean error: lower is better)

For the paper's fixed schedule with `--to-keep 5 1` the top-5 share all rounds; with
`--to-keep 3 1` (the demo's) the top-5 share round 1's samples.

Probabilities are a temperature-scaled softmax of the negative shared means over the listed
classes (the top-5; classes outside the list get no mass):

    p_c = exp(-m_c / T) / sum_{c' in P} exp(-m_c' / T)

T is in units of mean error. T = 1 (uncalibrated) gives nearly uniform probabilities because
mean errors differ by hundredths; `fit_temperature` picks T by minimum negative log-likelihood
on labelled images (a 1-D search over log T: a coarse grid, then golden-section refinement).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from diffcls.errors import DiffclsError, missing_extra
from diffcls.runtime.results import atomic_write_text

ECE_BINS = 15
UNCALIBRATED = 1.0
PROB_FLOOR = 1e-12  # p(true) for a label outside the listed classes (a constant in the NLL)


def shared_means(errors: Sequence[Sequence], prompts: Sequence[int]) -> tuple[list[float], int]:
    """Per prompt in `prompts`, its mean error over the (t, trial) samples all of them share.

    `errors`: (prompt, t, trial, error) records. Returns (means aligned with `prompts`, number
    of shared samples). With no shared sample (cannot happen with the scoring loop, whose first
    round covers every prompt) each prompt's own mean is returned and the count is 0.
    """
    wanted = {int(p): i for i, p in enumerate(prompts)}
    per: list[dict[tuple[int, int], float]] = [{} for _ in prompts]
    for p, t, j, e in errors:
        i = wanted.get(int(p))
        if i is not None:
            per[i][(int(t), int(j))] = float(e)
    if not per:
        return [], 0
    common = set(per[0])
    for d in per[1:]:
        common &= set(d)
    if not common:
        return [sum(d.values()) / len(d) if d else math.inf for d in per], 0
    keys = sorted(common)
    return [sum(d[k] for k in keys) / len(keys) for d in per], len(keys)


def softmax_neg(values: Sequence[float], temperature: float) -> list[float]:
    """softmax(-values / temperature), computed stably."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    if not values:
        return []
    z = [-v / temperature for v in values]
    top = max(z)
    w = [math.exp(x - top) for x in z]
    s = sum(w)
    return [x / s for x in w]


def nll(score_lists: Sequence[Sequence[float]], label_pos: Sequence[int | None], temperature: float) -> float:
    """Mean negative log-likelihood of the true class; `label_pos[i]` is the true class's
    position in `score_lists[i]`, or None when it is not listed (p = PROB_FLOOR)."""
    total = 0.0
    for scores, pos in zip(score_lists, label_pos):
        if pos is None:
            total -= math.log(PROB_FLOOR)
            continue
        z = [-v / temperature for v in scores]
        top = max(z)
        lse = top + math.log(sum(math.exp(x - top) for x in z))
        total -= z[pos] - lse
    return total / max(1, len(score_lists))


def fit_temperature(
    score_lists: Sequence[Sequence[float]], label_pos: Sequence[int | None], lo: float = 1e-6, hi: float = 1e3
) -> float:
    """The temperature of minimum NLL, searched over log T in [lo, hi]."""
    if not any(pos is not None for pos in label_pos):
        raise DiffclsError("no image's true class is among its listed classes, so no temperature can be fitted; check the folder's labels")
    f = lambda u: nll(score_lists, label_pos, math.exp(u))  # noqa: E731
    a, b = math.log(lo), math.log(hi)
    grid = [a + (b - a) * i / 80 for i in range(81)]
    vals = [f(u) for u in grid]
    i = min(range(len(grid)), key=vals.__getitem__)
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return math.exp((a + b) / 2)


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """ECE with `bins` equal-width confidence bins over [0, 1]: sum_b |B|/n * |acc(B) - conf(B)|.

    A confidence c falls in bin min(floor(c * bins), bins - 1) (so 1.0 is in the last bin).
    """
    n = len(confidence)
    if n == 0:
        return 0.0
    sums = [[0, 0.0, 0.0] for _ in range(bins)]  # count, sum confidence, sum correct
    for c, ok in zip(confidence, correct):
        b = min(int(c * bins), bins - 1)
        sums[b][0] += 1
        sums[b][1] += c
        sums[b][2] += 1.0 if ok else 0.0
    return sum(abs(s[2] - s[1]) / n for s in sums if s[0])


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> list[dict]:
    """Per bin: lower edge, count, mean confidence and accuracy (None when empty)."""
    out = []
    for b in range(bins):
        members = [(c, ok) for c, ok in zip(confidence, correct) if min(int(c * bins), bins - 1) == b]
        out.append({
            "lo": b / bins,
            "n": len(members),
            "confidence": sum(c for c, _ in members) / len(members) if members else None,
            "accuracy": sum(1.0 for _, ok in members if ok) / len(members) if members else None,
        })
    return out


def plot_reliability(confidence: Sequence[float], correct: Sequence[bool], path: str | Path, title: str = "") -> None:
    """A reliability diagram (accuracy per confidence bin against the diagonal) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "plot") from None
    rows = reliability_bins(confidence, correct)
    width = 1.0 / len(rows)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    xs = [r["lo"] for r in rows if r["n"]]
    ax.bar(xs, [r["accuracy"] for r in rows if r["n"]], width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy")
    ax.plot([r["confidence"] for r in rows if r["n"]], [r["accuracy"] for r in rows if r["n"]], "o", color="C3", label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    from diffcls.runtime.outputs import save_figure

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


@dataclass(frozen=True)
class Calibration:
    """What `diffcls calibrate` writes (calibration.json) and `--calibration` reads."""

    temperature: float
    n_images: int = 0
    nll_before: float | None = None  # at T = 1, on the fitting images
    nll_after: float | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    schedule: str | None = None  # the schedule the scores were computed with
    top_k: int = 5

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            t = float(data["temperature"])
        except FileNotFoundError:
            raise DiffclsError(f"--calibration {path} does not exist; create it with: diffcls calibrate FOLDER --out {path}") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DiffclsError(f"--calibration {path} is not a calibration file ({type(e).__name__}); recreate it with: diffcls calibrate FOLDER --out {path}") from None
        if not t > 0 or math.isinf(t):
            raise DiffclsError(f"--calibration {path} has temperature {t}; it must be a positive number (recreate it with diffcls calibrate)")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["temperature"] = t
        return cls(**known)
