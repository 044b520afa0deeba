"""One ranking per image, and the numbers shown beside each class in it.

The schedule decides an image by pruning: after each round the prompts with the highest mean
error are dropped, and the last prompt left is the prediction (`--adaptive`: a sequential test
eliminates prompts; the lowest mean of those left wins). A prompt dropped early was scored on
fewer (timestep, trial) samples than the ones that stayed, and mean errors over different
samples do not compare (the error depends strongly on t). So each listed class is shown with
the estimate that decided its place:

- the classes of the **final decision** (the prediction and the prompts it beat in the last
  prune that dropped any: `--to-keep 3 1`'s last round has three; `--adaptive`: the prompts
  still undecided when the image stopped, else the survivor and the last ones eliminated):
  each one's mean error over the samples they all share. The prediction has the lowest.
  Probabilities are a softmax of those means (runtime.evaluation.calibration) over the listed ones.
- a class **pruned before** the final decision: its mean error over the samples it was scored
  on (these compare only with the others pruned at the same point), `pruned_after` = the
  number of timesteps it had then, and probability 0: the schedule ruled it out.

The order is the schedule's: the final decision's classes by that mean (the prediction first),
then classes pruned later before classes pruned earlier. A class ranks by its best prompt.
The table, the results CSV's top-5, the probabilities and `--json` all show a prefix of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

TOP_K = 5  # classes kept per image in results files (and the most that probabilities cover)


@dataclass(frozen=True)
class RankedClass:
    classidx: int
    classname: str
    mean_error: float  # over the samples that decided its place (module docstring); lower is better
    pruned_after: int | None = None  # timesteps it had when dropped before the final decision; None: in it

    @property
    def in_final(self) -> bool:
        return self.pruned_after is None

    def describe(self, probability: float | None = None) -> str:
        """'four (0.0712, p 0.103)', or 'four (0.0712 over 10 timesteps, pruned)'."""
        if self.pruned_after is not None:
            return f"{self.classname} ({self.mean_error:.4g} over {self.pruned_after} timesteps, pruned)"
        return f"{self.classname} ({self.mean_error:.4g}" + (f", p {probability:.3f})" if probability is not None else ")")


def infer_final(errors: Sequence[Sequence], ranking: Sequence[int]) -> list[int]:
    """The final decision of a result that does not record it: the winner and every prompt
    scored on as many timesteps as the most-scored other prompt (a prefix of `ranking`)."""
    counts = _timestep_counts(errors)
    others = [counts.get(p, 0) for p in ranking[1:]]
    most = max(others) if others else 0
    return [p for i, p in enumerate(ranking) if i == 0 or counts.get(p, 0) >= most]


def _timestep_counts(errors) -> dict[int, int]:
    ts: dict[int, set] = {}
    for p, t, _j, _e in errors:
        ts.setdefault(int(p), set()).add(int(t))
    return {p: len(s) for p, s in ts.items()}


def rank_classes(
    errors: Sequence[Sequence],
    ranking: Sequence[int],
    final: Sequence[int],
    classidx: Sequence[int],
    classnames: Sequence[str],
    k: int = TOP_K,
) -> tuple[list[RankedClass], int]:
    """The best k classes of one image (module docstring) and the number of (t, trial) samples
    the final decision's means are over.

    `errors`: (prompt, t, trial, error) in evaluation order; `ranking`: every prompt, best first;
    `final`: the prompts of the final decision (empty: inferred); `classidx`/`classnames`: per prompt.
    """
    final = list(final) or infer_final(errors, ranking)
    in_final = set(final)
    keys: dict[int, set] = {p: set() for p in final}
    for p, t, j, _e in errors:
        if int(p) in keys:
            keys[int(p)].add((int(t), int(j)))
    shared = set.intersection(*keys.values()) if keys else set()
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    timesteps: dict[int, set] = {}
    for p, t, j, e in errors:  # in evaluation order: the sums the schedule itself formed
        p = int(p)
        timesteps.setdefault(p, set()).add(int(t))
        if p not in in_final or (int(t), int(j)) in shared:
            sums[p] = sums.get(p, 0.0) + float(e)
            counts[p] = counts.get(p, 0) + 1
    rows: list[RankedClass] = []
    seen: set[int] = set()
    for p in ranking:
        idx = int(classidx[p])
        if idx in seen:
            continue
        seen.add(idx)
        mean = sums[p] / counts[p] if counts.get(p) else math.inf
        rows.append(RankedClass(idx, classnames[p], mean, None if p in in_final else len(timesteps.get(p, ()))))
        if len(rows) == k:
            break
    n_final = sum(1 for r in rows if r.in_final)
    # the final decision's classes by their shared mean, the prediction first (ties: schedule order)
    rows[1:n_final] = sorted(rows[1:n_final], key=lambda r: r.mean_error)
    return rows, len(shared)


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


def probabilities(rows: Sequence[RankedClass], temperature: float) -> list[float]:
    """Per listed class: softmax(-mean_error / T) over the listed classes of the final decision;
    0 for a class pruned before it."""
    final = [r.mean_error for r in rows if r.in_final]
    p = iter(softmax_neg(final, temperature))
    return [next(p) if r.in_final else 0.0 for r in rows]


def class_columns(calibrated: bool) -> list[str]:
    """The results CSV's per-class columns: name, mean error, pruned_after (and probability)."""
    parts = ("", "_mean_error", "_pruned_after") + (("_probability",) if calibrated else ())
    return [f"top{i}{s}" for i in range(1, TOP_K + 1) for s in parts]


def row_cells(rows: Sequence[RankedClass], temperature: float | None) -> dict[str, str]:
    """The per-class cells of a results CSV row. Mean errors are written with full precision
    (`repr`), so a resumed run computes exactly what a fresh one does."""
    probs = probabilities(rows, temperature) if temperature is not None else None
    cells = {}
    for i in range(TOP_K):
        n = f"top{i + 1}"
        r = rows[i] if i < len(rows) else None
        cells[n] = r.classname if r else ""
        cells[n + "_mean_error"] = repr(float(r.mean_error)) if r else ""
        cells[n + "_pruned_after"] = "" if r is None or r.pruned_after is None else str(r.pruned_after)
        if probs is not None:
            cells[n + "_probability"] = f"{probs[i]:.6g}" if r else ""
    return cells


def rows_from_cells(row: dict, class_ids: dict[str, int]) -> list[RankedClass] | None:
    """The ranked classes back from a results CSV row (None if a cell is unusable);
    `class_ids`: classname -> classidx of the run's prompts."""
    out = []
    for i in range(1, TOP_K + 1):
        name = row.get(f"top{i}") or ""
        if not name:
            break
        try:
            mean = float(row[f"top{i}_mean_error"])
            pruned = row.get(f"top{i}_pruned_after") or ""
            pruned_after = int(pruned) if pruned else None
        except (KeyError, TypeError, ValueError):
            return None
        if name not in class_ids or not math.isfinite(mean):
            return None
        out.append(RankedClass(class_ids[name], name, mean, pruned_after))
    return out if out and out[0].in_final else None
