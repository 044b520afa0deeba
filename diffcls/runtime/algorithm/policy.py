"""Evaluation policies: which (prompt, timestep, trial) samples an image needs next, and when to stop.

A policy is a pure object (no UNet, no torch): it hands out blocks of work and receives the
errors. The `Scorer` runs one policy per image and mixes their blocks into full UNet batches;
`bench/policy_replay.py` replays the same objects over stored error tables. API (stable):

    policy = make_policy(schedule, n_prompts, num_train_timesteps, offset)   # FixedPolicy | SequentialPolicy
    while not policy.done:
        for prompt, k, trial in policy.next_block():   # never empty while not done
            t = policy.timesteps[k]                    # its noise is bank[k * n_trials + trial]
            policy.feed(prompt, k, trial, error)       # any order within the block (or feed_block: several)
    policy.result()   # PolicyResult(prediction, ranking, final): prompt indices, best first
    policy.phase      # 0-based stage of the current block (fixed: round; sequential: 0 first stage, 1 after)
    policy.n_evals    # items handed out so far

Every item of a block must be fed before `next_block` is called again.

`FixedPolicy` is the paper's schedule (`Schedule`): rounds of new timesteps, keep the k_i lowest
mean errors after each round; a round without new timesteps still prunes (docs/design.md).

`SequentialPolicy` (`AdaptiveSchedule`) takes the grid's timesteps in van der Corput order, one
at a time after a first stage of n0, evaluates every surviving prompt at each (paired samples:
same t, same noise), and eliminates prompt i as soon as a paired sequential test says another
surviving prompt j has a lower mean error. One sample X_c(r) is prompt c's error at the r-th
timestep (the mean over its n_trials noise draws). With D_ij(r) = sum_{s<=r} X_i(s) - X_j(s) and
S_ij^2 the sample variance of X_i - X_j over the first n0 samples, i is eliminated at r >= n0 if
D_ij(r) > B_ij(r) for some surviving j, where (K = number of prompts, alpha = error_rate):

  rule "mixture" (indifference-zone free; Robbins' normal-mixture boundary + Bonferroni):
      B_ij(r) = S_ij * sqrt((r + 1/rho2) * (c + log(1 + rho2 * r))),
      rho2 = c0 / sqrt(n0 * max_samples),  c0 = 2 log((K - 1) / alpha)  (tightest near r = sqrt(n0 M)),
      c >= c0 from `mixture_constants`: it pays for S_ij being an estimate from n0 samples
  rule "kim-nelson" (Kim & Nelson 2001, fully sequential, indifference zone delta):
      B_ij(r) = max(0, h2 * S_ij^2 / (2 delta) - delta * r / 2),
      h2 = 2 eta (n0 - 1),  eta = ((2 alpha / (K - 1)) ** (-2 / (n0 - 1)) - 1) / 2,
      delta = rel_delta * (mean of all first-stage samples of all prompts)

It stops when one prompt survives or after max_samples timesteps; the lowest mean wins (ties:
lower index). With a final stage (`final_samples` F > 0), an image still undecided at
max_samples M keeps its `final_keep` best prompts (lowest means; the rest are eliminated there)
and evaluates them at up to F more timesteps of the order: close calls get the long look the
paper's second round gives its top 5. Under the mixture rule the final stage goes on
eliminating with a fresh test among the k kept prompts: S_ij from all their M samples,
(c, rho2) = mixture_constants(k, final_error_rate, M, M + F), the sums still from r = 1; the
image stops when one prompt survives or after M + F timesteps, and the lowest mean over all
their samples wins. (Under kim-nelson the final stage has no test.) docs/adaptive.md gives the
guarantees and their assumptions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule


@dataclass
class PolicyResult:
    prediction: int  # the winning prompt
    ranking: list[int]  # every prompt, best first (later survivors first, then by mean error)
    # the prompts of the final decision, best first (a prefix of `ranking`): those still in
    # play when the prediction was chosen, all scored on the same samples; the rest were
    # dropped earlier (see runtime.algorithm.ranking)
    final: list[int] = field(default_factory=list)


@functools.lru_cache(maxsize=256)
def mixture_constants(n_prompts: int, error_rate: float, min_samples: int, max_samples: int) -> tuple[float, float]:
    """(c, rho2) of the mixture boundary, with c corrected for the first-stage variance estimate.

    rho2 = c0 / sqrt(n0 * M) with c0 = 2 log((K - 1) / alpha) (the known-variance constant).
    With s^2 = S^2 / sigma^2 ~ chi2_f / f (f = n0 - 1), a path crosses S * g_c(r) for some
    n0 <= r <= M with probability <= exp(-c''(s) / 2), c''(s) = s^2 c + min over r of
    (s^2 - 1) log(1 + rho2 r) (Ville's inequality for Robbins' normal-mixture martingale);
    c solves E_s[min(1, exp(-c''(s) / 2))] = alpha / (K - 1) (docs/adaptive.md).
    """
    m = max(n_prompts - 1, 1)
    target = error_rate / m
    c0 = 2.0 * math.log(m / error_rate)
    rho2 = c0 / math.sqrt(min_samples * max_samples)
    lmin, lmax = math.log1p(rho2 * min_samples), math.log1p(rho2 * max_samples)
    f = min_samples - 1
    lo = 1e-12
    logx = np.linspace(math.log(lo), math.log(80.0), 8001)
    x = np.exp(logx)  # values of s^2
    a = f / 2.0  # s^2 ~ Gamma(shape a, rate a)
    dens = np.exp(a * math.log(a) - math.lgamma(a) + a * logx - a * x)  # density * x (per d log x)
    below = math.exp(a * math.log(a * lo) - math.lgamma(a + 1.0))  # >= P(s^2 < lo), counted as crossing

    def bound(c: float) -> float:
        cpp = x * c + np.minimum((x - 1.0) * lmin, (x - 1.0) * lmax)
        y = np.minimum(1.0, np.exp(-cpp / 2.0)) * dens
        return below + float(np.sum((y[1:] + y[:-1]) * np.diff(logx)) / 2.0)

    lo_c, hi_c = 0.0, 2.0 * c0 + 50.0
    while bound(hi_c) > target:
        hi_c *= 2.0
    for _ in range(60):
        mid = (lo_c + hi_c) / 2.0
        if bound(mid) > target:
            lo_c = mid
        else:
            hi_c = mid
    return hi_c, rho2


def pair_variances(x: np.ndarray) -> np.ndarray:
    """(K, K) sample variances (ddof 1) of the paired differences X_i - X_j over the rows of x (r, K)."""
    K = x.shape[1]
    if K <= 256:
        d = x[:, :, None] - x[:, None, :]
        return d.var(axis=0, ddof=1)
    cov = np.cov(x, rowvar=False, ddof=1)  # the same quantity without the (r, K, K) array
    v = np.diag(cov)
    return np.maximum(v[:, None] + v[None, :] - 2 * cov, 0.0)


class _BlockHandout:
    """Hands out a policy's current block (`_block`) once; the policy opens the next block
    when the last item of this one is fed (`_handed` back to False)."""

    def next_block(self) -> list[tuple[int, int, int]]:
        if self.done:
            return []
        if self._handed:
            raise RuntimeError("feed every item of the last block before asking for the next")
        self._handed = True
        self.n_evals += len(self._block)
        return list(self._block)

    def feed_block(self, prompts, ks, trials, errors) -> None:
        """`feed` for several items of the block at once (the Scorer feeds a batch's items of one
        image together); the same arithmetic in the same order as feeding them one by one."""
        for c, k, j, e in zip(prompts, ks, trials, errors):
            self.feed(c, k, j, e)


class FixedPolicy(_BlockHandout):
    """The paper's fixed schedule: rounds of timesteps, prune to to_keep[i] after round i."""

    def __init__(self, schedule: Schedule, n_prompts: int, num_train_timesteps: int = 1000):
        self.schedule = schedule
        self.rounds = schedule.rounds(num_train_timesteps)
        self.timesteps = [t for r in self.rounds for _, t in r]  # k -> t
        self.n_trials = schedule.n_trials
        self.remaining = list(range(n_prompts))
        self.sums = [0.0] * n_prompts
        self.counts = [0] * n_prompts
        self.eliminated: list[list[int]] = []  # prompts pruned after each round, best first
        self.round = -1
        self.n_evals = 0
        self.done = False
        self._block: list[tuple[int, int, int]] = []
        self._pending = 0
        self._handed = False
        self._advance()

    @property
    def phase(self) -> int:
        return max(self.round, 0)

    def _advance(self) -> None:
        """Prune after the finished round (if any) and open the next round that has work."""
        while True:
            if self.round >= 0:
                self._prune()
            self.round += 1
            if self.round >= len(self.rounds):
                self.done, self._block = True, []
                return
            block = [(c, k, j) for c in self.remaining for (k, _t) in self.rounds[self.round] for j in range(self.n_trials)]
            if block:  # a round with no new timestep still prunes (on the errors so far), then moves on
                self._block, self._pending, self._handed = block, len(block), False
                return

    def _prune(self) -> None:
        keep = self.schedule.to_keep[self.round]
        order = sorted(self.remaining, key=lambda c: (self.score(c), c))  # ties: lower index
        self.eliminated.append(order[keep:])
        self.remaining = order[:keep]

    def score(self, c: int) -> float:
        return self.sums[c] / self.counts[c] if self.counts[c] else float("inf")

    def feed(self, prompt: int, k: int, trial: int, error: float) -> None:
        self.sums[prompt] += error
        self.counts[prompt] += 1
        self._pending -= 1
        if self._pending == 0:
            self._advance()

    def feed_block(self, prompts, ks, trials, errors) -> None:
        sums, counts = self.sums, self.counts
        for c, e in zip(prompts, errors):
            sums[c] += e
            counts[c] += 1
        self._pending -= len(errors)
        if self._pending == 0:
            self._advance()

    def result(self) -> PolicyResult:
        """The final decision is the last prune that dropped a prompt: its survivor and the
        prompts it dropped were all scored on every timestep up to it."""
        ranking = list(self.remaining)
        for pruned in reversed(self.eliminated):
            ranking.extend(pruned)
        last = next((g for g in reversed(self.eliminated) if g), [])
        return PolicyResult(self.remaining[0], ranking, list(self.remaining) + list(last))


class SequentialPolicy(_BlockHandout):
    """Paired sequential elimination over van der Corput-ordered timesteps (module docstring)."""

    def __init__(self, n_prompts: int, params: AdaptiveSchedule, num_train_timesteps: int = 1000, offset: int | None = None):
        params.validate(n_prompts, num_train_timesteps)
        self.params = params
        self.K = int(n_prompts)
        self.timesteps = params.timestep_order(num_train_timesteps, offset)  # k -> t (this image's rotation of the grid)
        self.n0, self.M, self.n_trials = params.min_samples, params.max_samples, params.n_trials
        self.F = params.final_samples  # final-stage timesteps (0: none)
        self.final = False  # in the final stage
        self.alive = np.ones(self.K, dtype=bool)
        self.sums = np.zeros(self.K)  # sum of samples X_c(1..r) (alive prompts are up to date)
        self.r = 0  # timesteps every alive prompt has
        # the final stage goes on eliminating (mixture rule) with its own constants, whose
        # variances come from the first-stage samples X_c(1..M); the rule's own from X_c(1..n0)
        self._sequential_final = bool(self.F) and params.rule == "mixture"
        self._x = np.zeros((self.M if self._sequential_final else self.n0, self.K))  # samples (alive prompts' rows are filled)
        self.eliminated: list[list[int]] = []  # groups in elimination order, each best first
        self.eliminated_at: dict[int, int] = {}  # prompt -> r at which it was eliminated
        self.n_evals = 0
        self.done = False
        self._scale: np.ndarray | None = None  # per-pair constants fixed after the first stage
        self._open(range(self.n0))

    # --- blocks ---------------------------------------------------------------------------------
    @property
    def phase(self) -> int:
        return 2 if self.final else (0 if self.r < self.n0 else 1)

    def _open(self, ks) -> None:
        self._ks = list(ks)
        self._k0 = self._ks[0]
        alive = np.flatnonzero(self.alive).tolist()
        self._block = [(c, k, j) for c in alive for k in self._ks for j in range(self.n_trials)]
        self._acc = np.zeros((len(self._ks), self.K))
        self._pending = len(self._block)
        self._handed = False

    def feed(self, prompt: int, k: int, trial: int, error: float) -> None:
        self._acc[k - self._k0, prompt] += error
        self._pending -= 1
        if self._pending == 0:
            self._close()

    def feed_block(self, prompts, ks, trials, errors) -> None:
        # np.add.at applies the additions one by one, in order: the sums `feed` would form
        np.add.at(self._acc, (np.asarray(ks, dtype=np.int64) - self._k0, np.asarray(prompts, dtype=np.int64)), np.asarray(errors, dtype=np.float64))
        self._pending -= len(errors)
        if self._pending == 0:
            self._close()

    def _close(self) -> None:
        alive = self.alive
        for row in self._acc:
            x = row / self.n_trials if self.n_trials > 1 else row
            if self.r < len(self._x):
                self._x[self.r] = x
            self.sums[alive] += x[alive]
            self.r += 1
            if self.r == self.n0:
                self._fix_constants()
            if self.r >= self.n0 and (self._sequential_final or not self.final):
                self._eliminate()
        n_alive = int(self.alive.sum())
        if n_alive > 1 and self.r == self.M and self.F and not self.final:
            self._enter_final()
        if n_alive == 1 or self.r >= self.M + (self.F if self.final else 0):
            self.done, self._block = True, []
        else:
            self._open([self.r])

    def _enter_final(self) -> None:
        """Keep the best final_keep prompts (all have r samples, so by sums) for F more timesteps,
        and (mixture rule) fix the constants of the final stage's own test among them."""
        self.final = True
        alive = sorted(np.flatnonzero(self.alive).tolist(), key=lambda c: (self.sums[c], c))
        gone = alive[self.params.final_keep:]
        if gone:
            self.alive[gone] = False
            self.eliminated.append(gone)
            for c in gone:
                self.eliminated_at[c] = self.r
        kept = alive[: self.params.final_keep]
        if self._sequential_final and len(kept) > 1:
            # a fresh paired test among the kept prompts: variances from all their r samples so
            # far (r - 1 degrees of freedom), Bonferroni over their number, tightest near the
            # geometric middle of [r, M + F]
            scale = np.zeros((self.K, self.K))
            scale[np.ix_(kept, kept)] = np.sqrt(pair_variances(self._x[: self.r][:, kept]))
            self._scale = scale
            self._c, self._rho2 = mixture_constants(len(kept), self.params.final_error_rate, self.r, self.M + self.F)

    # --- the rule -------------------------------------------------------------------------------
    def _fix_constants(self) -> None:
        p, K, n0 = self.params, self.K, self.n0
        x = self._x[:n0]  # (n0, K) first-stage samples
        s2 = pair_variances(x)
        m = max(K - 1, 1)
        if p.rule == "mixture":
            self._c, self._rho2 = mixture_constants(K, p.error_rate, n0, self.M)
            self._scale = np.sqrt(s2)
        else:  # kim-nelson
            eta = 0.5 * ((2.0 * p.error_rate / m) ** (-2.0 / (n0 - 1)) - 1.0)
            h2 = 2.0 * eta * (n0 - 1)
            self._delta = p.rel_delta * float(x.mean())
            with np.errstate(divide="ignore", invalid="ignore"):
                self._scale = h2 * s2 / (2.0 * self._delta)  # the boundary at r = 0

    def boundary(self, r: int, idx: np.ndarray | None = None) -> np.ndarray:
        """B_ij(r) for i, j in `idx` (default: all prompts): i is eliminated by j when
        D_ij(r) = sum X_i - sum X_j exceeds it."""
        scale = self._scale if idx is None else self._scale[np.ix_(idx, idx)]
        if self.params.rule == "mixture":
            rho2, c = self._rho2, self._c
            return scale * math.sqrt((r + 1.0 / rho2) * (c + math.log1p(rho2 * r)))
        return np.maximum(scale - self._delta * r / 2.0, 0.0)

    def _eliminate(self) -> None:
        idx = np.flatnonzero(self.alive)
        if len(idx) < 2:
            return
        s = self.sums[idx]
        d = s[:, None] - s[None, :]  # D_ij for surviving i, j
        out = (d > self.boundary(self.r, idx)).any(axis=1)
        if out.any():
            gone = idx[out]
            gone = sorted(gone.tolist(), key=lambda c: (self.sums[c], c))
            self.alive[gone] = False
            self.eliminated.append(gone)
            for c in gone:
                self.eliminated_at[c] = self.r

    # --- outcome --------------------------------------------------------------------------------
    def means(self) -> dict[int, float]:
        """prompt -> mean sample over the timesteps it was evaluated at (its first r or fewer)."""
        return {c: float(self.sums[c]) / self.eliminated_at.get(c, self.r) for c in range(self.K) if self.r}

    def result(self) -> PolicyResult:
        """The final decision: the prompts still alive when the image stopped, if several
        (the lowest mean wins); else the survivor and the last prompts the test eliminated
        (at that point the survivor had the lowest sum of them all)."""
        alive = sorted(np.flatnonzero(self.alive).tolist(), key=lambda c: (self.sums[c], c))
        ranking = list(alive)
        for group in reversed(self.eliminated):
            ranking.extend(group)
        final = alive if len(alive) > 1 or not self.eliminated else alive + list(self.eliminated[-1])
        return PolicyResult(alive[0], ranking, final)


def make_policy(schedule: Schedule | AdaptiveSchedule, n_prompts: int, num_train_timesteps: int = 1000, offset: int | None = None):
    """The policy object for one image under `schedule` (`offset`: the image's rotation of the
    adaptive grid, `AdaptiveSchedule.timestep_order`; the fixed schedule has none)."""
    if isinstance(schedule, AdaptiveSchedule):
        return SequentialPolicy(n_prompts, schedule, num_train_timesteps, offset)
    return FixedPolicy(schedule, n_prompts, num_train_timesteps)
