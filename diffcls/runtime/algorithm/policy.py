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

`SequentialPolicy` (`AdaptiveSchedule`) takes the grid's timesteps in van der Corput order and
evaluates every surviving prompt at each (paired samples: same t, same noise). One sample X_c(r)
is prompt c's error at the r-th timestep (the mean over its n_trials noise draws). It runs in
stages; each stage restarts its sums, estimates its own pair variances from its own first n0
samples, and looks every g = look_every samples (and at its last):

  stage 1: all K prompts, samples 1..M (M = max_samples), level alpha_1;
  stage 2 (final_samples F > 0, several prompts left at M): the survivors, samples M+1..M+F,
           level alpha_2 (alpha_1 + alpha_2 = alpha, the test's bound; `AdaptiveSchedule.stage_alphas`).

Within a stage of k prompts, with D_ij(q) = the sum of X_i - X_j over the stage's first q samples
and S_ij^2 the sample variance of X_i - X_j over its first n0, prompt i is eliminated at a look q
if D_ij(q) > S_ij * g(q) for some surviving j, where (rule "mixture", the default)

  g(q) = sqrt(q + 1/rho2) * z(q),   log(2 Phi(z)) + z^2 / 2 = (c + log(1 + rho2 q)) / 2

the one-sided normal-mixture boundary; rho2 = c0 / sqrt(n0 L) (L the stage's length,
c0 = 2 log((k - 1) / alpha_s)) and c >= c0 from `one_sided_constants` (it pays for S_ij being an
estimate from n0 samples, over the stage's looks). Rule "kim-nelson" (Kim & Nelson 2001,
indifference zone delta) is kept for its first stage only:
B_ij(q) = max(0, h2 * S_ij^2 / (2 delta) - delta * q / 2), h2 = 2 eta (n0 - 1),
eta = ((2 alpha_1 / (K - 1)) ** (-2 / (n0 - 1)) - 1) / 2, delta = rel_delta * (mean first-stage sample).

An image stops when one prompt survives or at the end of its last stage; then the lowest mean over
all the samples of the survivors wins (ties: lower index). `final_keep` > 0 cuts the survivors at
M to that many by mean: a bare cut, outside the guarantee. docs/adaptive.md gives the guarantee
(P(a test eliminates the best prompt) <= alpha under its assumptions) and what is only measured.
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


# --- the one-sided normal-mixture boundary ---------------------------------------------------------
# h(z) = log(2 Phi(z)) + z^2 / 2 (z >= 0): the log of the one-sided mixture martingale at a
# standardized sum W = z sqrt(r + 1/rho2), plus log(1 + rho2 r) / 2 (docs/adaptive.md)
_ZGRID = np.linspace(0.0, 40.0, 40001)
_LOG2PHI = np.log(2.0 - np.array([math.erfc(z / math.sqrt(2.0)) for z in _ZGRID]))
_HGRID = _LOG2PHI + _ZGRID**2 / 2.0


def _h(z: np.ndarray) -> np.ndarray:
    z = np.maximum(z, 0.0)
    return np.interp(z, _ZGRID, _LOG2PHI) + z * z / 2.0


def _h_inverse(level: np.ndarray) -> np.ndarray:
    """z >= 0 with h(z) = level (h is increasing from h(0) = 0)."""
    level = np.maximum(np.asarray(level, dtype=np.float64), 0.0)
    far = np.sqrt(2.0 * np.maximum(level - math.log(2.0), 0.0))  # beyond the table 2 Phi(z) = 2
    return np.where(level <= _HGRID[-1], np.interp(level, _HGRID, _ZGRID), far)


def boundary_factors(c: float, rho2: float, looks) -> np.ndarray:
    """g(r) for r in `looks`: the stage eliminates i by j at a look r when D_ij(r) > S_ij g(r),
    g(r) = sqrt(r + 1/rho2) z(r), h(z(r)) = (c + log(1 + rho2 r)) / 2."""
    r = np.asarray(looks, dtype=np.float64)
    return np.sqrt(r + 1.0 / rho2) * _h_inverse((c + np.log1p(rho2 * r)) / 2.0)


def stage_looks(n0: int, length: int, every: int) -> tuple[int, ...]:
    """The looks of a stage of `length` samples: r = n0, n0 + g, n0 + 2g, ... and its last sample."""
    looks = list(range(n0, length + 1, max(1, every)))
    if looks[-1] != length:
        looks.append(length)
    return tuple(looks)


@functools.lru_cache(maxsize=256)
def one_sided_constants(n_prompts: int, alpha: float, n0: int, looks: tuple[int, ...]) -> tuple[float, float]:
    """(c, rho2) of a stage's one-sided mixture test among `n_prompts`, variance from its first n0.

    Per pair, level a = alpha / (n_prompts - 1) (Bonferroni over the best's rivals);
    rho2 = c0 / sqrt(n0 * looks[-1]) with c0 = 2 log(1 / a) (the known-variance constant). With
    s^2 = S^2 / sigma^2 ~ chi2_f / f (f = n0 - 1, independent of the sums), a path that crosses
    S g_c(r) at a look crosses the one-sided mixture martingale at exp(m(s)),
    m(s) = min over the looks of h(s z_c(r)) - log(1 + rho2 r) / 2, so (Ville's inequality) with
    probability <= exp(-m(s)); c solves E_s[min(1, exp(-m(s)))] = a (docs/adaptive.md).
    """
    a = alpha / max(n_prompts - 1, 1)
    c0 = 2.0 * math.log(1.0 / a)
    rho2 = c0 / math.sqrt(n0 * looks[-1])
    lg = np.log1p(rho2 * np.asarray(looks, dtype=np.float64))
    f = n0 - 1
    lo = 1e-12
    logx = np.linspace(math.log(lo), math.log(60.0), 1501)
    x = np.exp(logx)  # values of s^2
    k = f / 2.0  # s^2 ~ Gamma(shape k, rate k)
    dens = np.exp(k * math.log(k) - math.lgamma(k) + k * logx - k * x)  # density * x (per d log x)
    below = math.exp(k * math.log(k * lo) - math.lgamma(k + 1.0))  # >= P(s^2 < lo), counted as crossing
    s = np.sqrt(x)[:, None]

    def bound(c: float) -> float:
        z = _h_inverse((c + lg) / 2.0)[None, :]
        m = (_h(s * z) - lg[None, :] / 2.0).min(axis=1)
        y = np.minimum(1.0, np.exp(-m)) * dens
        return below + float(np.sum((y[1:] + y[:-1]) * np.diff(logx)) / 2.0)

    lo_c, hi_c = c0, 2.0 * c0 + 50.0
    while bound(hi_c) > a:
        hi_c *= 2.0
    for _ in range(40):
        mid = (lo_c + hi_c) / 2.0
        if bound(mid) > a:
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
        # timestep weights (a calibration's): the score is the weighted mean of the errors
        self._w = None if schedule.band_weights is None else [schedule.weight(t, num_train_timesteps) for t in self.timesteps]
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
        w = 1 if self._w is None else self._w[k]
        self.sums[prompt] += w * error
        self.counts[prompt] += w
        self._pending -= 1
        if self._pending == 0:
            self._advance()

    def feed_block(self, prompts, ks, trials, errors) -> None:
        sums, counts, w = self.sums, self.counts, self._w
        for c, k, e in zip(prompts, ks, errors):
            wk = 1 if w is None else w[k]
            sums[c] += wk * e
            counts[c] += wk
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
        self.g = params.look_every
        # timestep weights (a calibration's, fixed before the image): a sample is weight x error
        self._w = None if params.band_weights is None else np.array([params.weight(t, num_train_timesteps) for t in self.timesteps])
        self.final = False  # in the final stage
        self.alive = np.ones(self.K, dtype=bool)
        self.sums = np.zeros(self.K)  # sum of samples X_c(1..r) (alive prompts are up to date): means, the pick
        self.r = 0  # timesteps every alive prompt has
        self.eliminated: list[list[int]] = []  # groups in elimination order, each best first
        self.eliminated_at: dict[int, int] = {}  # prompt -> r at which it was eliminated
        self.n_evals = 0
        self.done = False
        self._start_stage(0, self.M, self.K, params.stage_alphas[0])
        self._open(range(min(self.n0, self.M)))

    # --- stages: each restarts its sums and estimates its own variances -----------------------
    def _start_stage(self, start: int, length: int, n_compare: int, alpha: float) -> None:
        self._stage_start, self._stage_len = start, length  # samples start+1 .. start+length
        self._stage_sums = np.zeros(self.K)  # D_ij = stage_sums[i] - stage_sums[j]
        self._x = np.zeros((self.n0, self.K))  # the stage's first n0 samples (its variances)
        self._scale: np.ndarray | None = None  # per-pair S_ij (mixture) or h2 S^2 / (2 delta) (kim-nelson)
        self._testing = n_compare > 1 and length >= self.n0 and (self.params.rule == "mixture" or not self.final)
        if self._testing and self.params.rule == "mixture":
            looks = stage_looks(self.n0, length, self.g)
            c, rho2 = one_sided_constants(n_compare, alpha, self.n0, looks)
            self._looks = dict(zip(looks, boundary_factors(c, rho2, looks)))
        elif self._testing:
            self._looks = dict.fromkeys(stage_looks(self.n0, length, self.g))

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
        for i, row in enumerate(self._acc):
            x = row / self.n_trials if self.n_trials > 1 else row
            if self._w is not None:
                x = x * self._w[self._k0 + i]
            q = self.r - self._stage_start  # samples of this stage so far
            if q < self.n0:
                self._x[q] = x
            self.sums[alive] += x[alive]
            self._stage_sums[alive] += x[alive]
            self.r += 1
            if q + 1 == self.n0 and self._testing:
                self._fix_constants()
        q = self.r - self._stage_start
        if self._testing and q in self._looks:
            self._eliminate(self._looks[q], q)
        n_alive = int(self.alive.sum())
        if n_alive > 1 and self.r == self.M and self.F and not self.final:
            self._enter_final()
        if n_alive == 1 or self.r >= self._stage_start + self._stage_len:
            self.done, self._block = True, []
            return
        # the next block: to the end of the stage's first n0 samples, then to its next look
        q = self.r - self._stage_start
        if q < self.n0:
            nxt = min(self.n0, self._stage_len)
        elif self._testing:
            nxt = min(lk for lk in self._looks if lk > q)
        else:
            nxt = self._stage_len
        self._open(range(self.r, self._stage_start + nxt))

    def _enter_final(self) -> None:
        """Every survivor (or, with final_keep, the best final_keep of them by mean: a cut outside
        the guarantee) goes on for F more timesteps under a fresh test that restarts its sums and
        estimates its variances from its own first n0 samples."""
        self.final = True
        alive = sorted(np.flatnonzero(self.alive).tolist(), key=lambda c: (self.sums[c], c))
        keep = self.params.final_keep or len(alive)
        gone = alive[keep:]
        if gone:
            self.alive[gone] = False
            self.eliminated.append(gone)
            for c in gone:
                self.eliminated_at[c] = self.r
        self._start_stage(self.M, self.F, min(keep, len(alive)), self.params.stage_alphas[1])

    # --- the rule -------------------------------------------------------------------------------
    def _fix_constants(self) -> None:
        p = self.params
        s2 = pair_variances(self._x)
        if p.rule == "mixture":
            self._scale = np.sqrt(s2)
        else:  # kim-nelson (first stage only)
            m = max(self.K - 1, 1)
            eta = 0.5 * ((2.0 * p.stage_alphas[0] / m) ** (-2.0 / (self.n0 - 1)) - 1.0)
            h2 = 2.0 * eta * (self.n0 - 1)
            self._delta = p.rel_delta * float(self._x.mean())
            with np.errstate(divide="ignore", invalid="ignore"):
                self._scale = h2 * s2 / (2.0 * self._delta)  # the boundary at r = 0

    def boundary(self, factor, q: int, idx: np.ndarray) -> np.ndarray:
        """B_ij at the stage's q-th sample for i, j in `idx`: i is eliminated by j when the
        stage's D_ij exceeds it."""
        scale = self._scale[np.ix_(idx, idx)]
        if self.params.rule == "mixture":
            return scale * factor
        return np.maximum(scale - self._delta * q / 2.0, 0.0)

    def _eliminate(self, factor, q: int) -> None:
        idx = np.flatnonzero(self.alive)
        if len(idx) < 2:
            return
        s = self._stage_sums[idx]
        d = s[:, None] - s[None, :]  # D_ij for surviving i, j (this stage's samples)
        out = (d > self.boundary(factor, q, idx)).any(axis=1)
        if out.any():
            gone = sorted(idx[out].tolist(), key=lambda c: (self.sums[c], c))
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
        (the lowest mean over all their samples wins); else the survivor and the last prompts a
        test eliminated."""
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
