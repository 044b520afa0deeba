"""Calibrated class probabilities: fitting the temperature, NLL, ECE, the reliability diagram.

Each image's listed classes carry the mean errors that decided their place (runtime.algorithm.ranking):
the classes of the final decision share their samples, so their means compare; a class pruned
before it has probability 0. The probabilities are a temperature-scaled softmax of the negative
means over the listed classes of the final decision:

    p_c = exp(-m_c / T) / sum_{c' final, listed} exp(-m_c' / T)

so the prediction (the lowest mean) always has the highest probability. T is in units of mean
error. T = 1 (uncalibrated) gives nearly uniform probabilities because mean errors differ by
hundredths; `fit_temperature` picks T by minimum negative log-likelihood on labelled images (a
1-D search over log T: a coarse grid, then golden-section refinement), with the labels smoothed
by the rule of succession: the true class's target is 1 - 1/(n + 2) for n labelled images, the
rest shared by the other listed classes. Without it a fitting set whose every image is right
with a margin (easy on clean images: 20 training digits are) has its likelihood rising as T -> 0,
and the fit ran into the search's lower bound, giving probabilities of 1 that a harder set
contradicts; with it the fitted confidence on such a set is about (n + 1)/(n + 2), and a large
set that is not separable fits essentially the plain maximum-likelihood T. A temperature is bound to
what it was fitted on (model fingerprint, prompts, schedule): `Calibration.check` refuses another.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from diffcls.errors import DiffclsError, missing_extra
from diffcls.runtime.algorithm.ranking import softmax_neg  # noqa: F401 - the softmax behind every probability
from diffcls.runtime.results.writer import atomic_write_text, normalised_settings

ECE_BINS = 15
UNCALIBRATED = 1.0
PROB_FLOOR = 1e-12  # p(true) for a label outside the listed classes (a constant in the NLL)


def nll(score_lists: Sequence[Sequence[float]], label_pos: Sequence[int | None], temperature: float) -> float:
    """Mean negative log-likelihood of the true class; `label_pos[i]` is the true class's
    position in `score_lists[i]`, or None when it is not listed (p = PROB_FLOOR)."""
    total = 0.0
    for scores, pos in zip(score_lists, label_pos):
        if pos is None:
            total -= math.log(PROB_FLOOR)
            continue
        total -= _log_probs(scores, temperature)[pos]
    return total / max(1, len(score_lists))


def _log_probs(scores: Sequence[float], temperature: float) -> list[float]:
    """log softmax(-scores / T), computed stably (the log of the probabilities of `softmax_neg`)."""
    z = [-v / temperature for v in scores]
    top = max(z)
    lse = top + math.log(sum(math.exp(x - top) for x in z))
    return [x - lse for x in z]


def _smoothed_nll(score_lists: Sequence[Sequence[float]], label_pos: Sequence[int | None], temperature: float) -> float:
    """Mean cross-entropy against rule-of-succession targets (module docstring); images whose true
    class is not listed add a constant and are left out."""
    labelled = [(scores, pos) for scores, pos in zip(score_lists, label_pos) if pos is not None]
    eps = 1.0 / (len(labelled) + 2)
    total = 0.0
    for scores, pos in labelled:
        if len(scores) == 1:
            continue  # one listed class: probability 1 whatever T is
        logp = _log_probs(scores, temperature)
        rest = (sum(logp) - logp[pos]) / (len(logp) - 1)
        total -= (1 - eps) * logp[pos] + eps * rest
    return total / max(1, len(labelled))


def fit_temperature(
    score_lists: Sequence[Sequence[float]], label_pos: Sequence[int | None], lo: float = 1e-6, hi: float = 1e3
) -> float:
    """The temperature of minimum NLL (labels smoothed by the rule of succession: module
    docstring), searched over log T in [lo, hi]."""
    if not any(pos is not None for pos in label_pos):
        raise DiffclsError("no image's true class is among its listed classes, so no temperature can be fitted; check the folder's labels")
    f = lambda u: _smoothed_nll(score_lists, label_pos, math.exp(u))  # noqa: E731
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


def plot_reliability(confidence: Sequence[float], correct: Sequence[bool], path: str | Path, title: str = "", height: float = 6.0) -> None:
    """A reliability diagram (accuracy per confidence bin against the diagonal, each bar labelled
    with its number of images) as a PNG `height` inches tall; the legend sits below the axes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "plot") from None
    rows = [r for r in reliability_bins(confidence, correct) if r["n"]]
    width = 1.0 / ECE_BINS
    fig, ax = plt.subplots(figsize=(height, height + 0.6))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    bars = ax.bar([r["lo"] for r in rows], [r["accuracy"] for r in rows], width=width, align="edge", edgecolor="black", alpha=0.7, label="accuracy of the bin")
    for bar, r in zip(bars, rows):
        ax.annotate(f"n={r['n']}", (bar.get_x() + width / 2, bar.get_height()), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o", color="C3", label="its mean confidence", clip_on=False, zorder=3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)  # room for a point at 1.0 and the counts above full bars
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    from diffcls.runtime.results.outputs import save_figure

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
    schedule: dict | str | None = None  # the schedule the scores were computed with (its to_dict; a description in older files)
    top_k: int = 5
    model: str | None = None  # the fingerprint of the model it was fitted with
    prompts: str | None = None  # the digest of the prompts (runtime.data.prompts.PromptSet.digest)
    # timestep weights by band (`calibrate --timestep-weights`): bound to the model and prompts,
    # applied to any schedule of a run given this file; such a file carries no temperature (T 1)
    timestep_weights: list[float] | None = None
    weights_fit: dict | None = None  # per band: mean and variance of the paired difference, images
    path: str | None = field(default=None, compare=False)  # where it was loaded from (not saved)

    def describe(self) -> str:
        """What was fitted, on how many images, and (a temperature) how NLL and ECE moved."""
        if self.timestep_weights is not None:
            return (f"timestep weights by band of {1000 // len(self.timestep_weights)} t, fitted on {self.n_images} images: "
                    f"{' '.join(f'{w:.2g}' for w in self.timestep_weights)}")
        return (f"temperature {self.temperature:.4g} fitted on {self.n_images} images: NLL {self.nll_before:.4f} -> {self.nll_after:.4f}, "
                f"ECE {100 * self.ece_before:.2f}% -> {100 * self.ece_after:.2f}% (on the fitting images)")

    def save(self, path: str | Path) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        atomic_write_text(Path(path), json.dumps(data, indent=2) + "\n")

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
        known["path"] = str(path)
        return cls(**known)

    def check(self, *, model: str, prompts: str, schedule: dict) -> None:
        """Refuse (one line) a temperature fitted on another model, prompts or schedule: mean
        errors, and so the temperature, differ between them."""
        path = self.path or "calibration.json"
        fix = f"fit one for this run: diffcls calibrate FOLDER --out {path} with this run's --model, prompts and schedule"
        if self.timestep_weights is not None:  # weights: bound to the model and prompts, any schedule
            for what, mine, theirs in (("model", self.model, model), ("prompts", self.prompts, prompts)):
                if mine != theirs:
                    raise DiffclsError(f"--calibration {path}'s timestep weights were fitted with another {what} ({str(mine)[:12]}; this run: {str(theirs)[:12]}); "
                                       f"refit them: diffcls calibrate FOLDER --timestep-weights 10 --out {path}")
            return
        if self.model is None or self.prompts is None or self.schedule is None:
            raise DiffclsError(f"--calibration {path} does not say which model, prompts and schedule it was fitted on (an earlier diffcls wrote it); {fix}")
        mine_schedule = normalised_settings({"schedule": self.schedule})["schedule"]  # an older file's description
        for what, mine, theirs in (("model", self.model, model), ("prompts", self.prompts, prompts), ("schedule", mine_schedule, schedule)):
            if mine != theirs:
                shown = (mine, theirs) if what == "schedule" else (mine[:12], theirs[:12])
                raise DiffclsError(f"--calibration {path} was fitted with another {what} ({shown[0]}; this run: {shown[1]}); {fix}")


def fit_timestep_weights(images, n_bands: int = 10, num_train_timesteps: int = 1000, drop_below: float = 0.25) -> tuple[list[float], dict]:
    """Timestep weights by band from labelled full-grid errors (`diffcls calibrate --timestep-weights`).

    `images`: (errors, true prompts) per image: errors as (prompt, t, trial, error), the true
    prompts the indices of the true class's prompts. Per image the paired difference
    d_c(t) = X_c(t) - X_true(t) (X: the trial mean; the true class's best prompt) for every wrong
    prompt c; per band b of [0, T): m_b = the mean of d, v_b = the mean over (image, c) of the
    variance of d along the band's timesteps (what a paired test sees). w_b = m_b / v_b (the
    weights that maximise the mean of a weighted sum over its standard deviation for independent
    samples); a band is dropped (w_b = 0, its timesteps leave the grid) where m_b <= 0 (it points
    away from the true class) or where one evaluation there carries under `drop_below` of the
    information m_b^2 / v_b of one in the best band. Normalised to mean 1 over the kept bands.
    """
    import numpy as np

    T = num_train_timesteps
    sums = np.zeros(n_bands)
    counts = np.zeros(n_bands)
    var_sum = np.zeros(n_bands)
    var_n = np.zeros(n_bands)
    for errors, true in images:
        table: dict[tuple[int, int], list[float]] = {}
        for c, t, _j, e in errors:
            table.setdefault((c, t), []).append(e)
        x = {key: sum(v) / len(v) for key, v in table.items()}
        prompts = sorted({c for c, _ in x})
        ts = sorted({t for _, t in x})
        full = [c for c in prompts if all((c, t) in x for t in ts)]
        truth = [c for c in full if c in set(true)]
        if not truth or len(full) < 2:
            continue
        best = min(truth, key=lambda c: sum(x[c, t] for t in ts))
        for c in full:
            if c in set(true):
                continue
            d = np.array([x[c, t] - x[best, t] for t in ts])
            band = np.array(ts) * n_bands // T
            for b in range(n_bands):
                db = d[band == b]
                sums[b] += db.sum()
                counts[b] += len(db)
                if len(db) > 1:
                    var_sum[b] += db.var(ddof=1)
                    var_n[b] += 1
    if not counts.any() or not var_n.any():
        raise DiffclsError("no labelled image has every prompt at two or more timesteps of a band; fit the weights on a full grid, e.g. --n-samples 100 --to-keep 1")
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
        v = np.where(var_n > 0, var_sum / np.maximum(var_n, 1), np.inf)
        w = np.where((m > 0) & np.isfinite(v) & (v > 0), m / v, 0.0)
        info = np.where(w > 0, m * m / v, 0.0)
    w[info < drop_below * info.max()] = 0.0
    w = w / w[w > 0].mean()
    return [float(round(v, 6)) for v in w], {"mean": m.tolist(), "variance": [float(u) if math.isfinite(u) else None for u in v], "n_bands": n_bands}
