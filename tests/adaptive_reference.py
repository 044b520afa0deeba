"""An independent reference of `--adaptive`'s mixture rule, written from docs/adaptive.md's
formulas (scipy for the normal tail, the root finding and the integral over the variance
estimate; nothing from diffcls.runtime.algorithm.policy), vectorized over many simulated runs.

The rule (docs/adaptive.md, "The rule"): stages, each over its own samples, restarting its sums;
in a stage of k prompts at level alpha_s, with D_ij(q) the sum of X_i - X_j over its first q
samples and S_ij^2 the sample variance of X_i - X_j over its first n0, i is eliminated at a look q
when D_ij(q) > S_ij sqrt(q + 1/rho2) z(q) for some surviving j, where

    log(2 Phi(z)) + z^2/2 = (c + log(1 + rho2 q)) / 2,
    rho2 = c0 / sqrt(n0 L),  c0 = 2 log((k - 1) / alpha_s),  L = the stage's length,
    c:  E_s[min(1, exp(-m(s)))] = alpha_s / (k - 1),  s^2 ~ chi2_(n0-1) / (n0-1),
        m(s) = min over the looks q of [log(2 Phi(s z(q))) + s^2 z(q)^2 / 2 - log(1 + rho2 q) / 2].
"""

from __future__ import annotations

import functools
import math

import numpy as np

scipy = __import__("pytest").importorskip("scipy")
from scipy import integrate, optimize, special, stats  # noqa: E402


def h(z):
    return special.log_ndtr(z) + math.log(2.0) + np.square(z) / 2.0


def z_of(level: float) -> float:
    return optimize.brentq(lambda z: h(z) - level, 0.0, 100.0, xtol=1e-12)


def looks_of(n0: int, length: int, every: int) -> list[int]:
    qs = list(range(n0, length + 1, every))
    return qs if qs[-1] == length else qs + [length]


@functools.lru_cache(maxsize=None)
def constants(k: int, alpha: float, n0: int, looks: tuple[int, ...], corrected: bool = True) -> tuple[float, float]:
    """(c, rho2). corrected=False: the known-variance constant c0 (a plausible mistake)."""
    a = alpha / (k - 1)
    c0 = 2.0 * math.log(1.0 / a)
    rho2 = c0 / math.sqrt(n0 * looks[-1])
    if not corrected:
        return c0, rho2
    q = np.asarray(looks, dtype=float)
    lg = np.log1p(rho2 * q)
    f = n0 - 1

    def p_cross(c: float) -> float:
        z = np.array([z_of((c + v) / 2.0) for v in lg])

        def integrand(x):  # x = s^2
            m = np.min(h(math.sqrt(x) * z) - lg / 2.0)
            return min(1.0, math.exp(-m)) * stats.chi2.pdf(x * f, f) * f

        edges = [0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 60.0]
        return sum(integrate.quad(integrand, lo, hi, limit=200, epsabs=1e-13)[0] for lo, hi in zip(edges, edges[1:]))

    hi = 4.0 * c0
    while p_cross(hi) > a:
        hi *= 2.0
    c = optimize.brentq(lambda c: p_cross(c) - a, c0, hi, xtol=1e-6)
    return c, rho2


def factors(c: float, rho2: float, looks) -> dict[int, float]:
    return {q: math.sqrt(q + 1.0 / rho2) * z_of((c + math.log1p(rho2 * q)) / 2.0) for q in looks}


def run_stage(X, alive, n0: int, every: int, alpha: float, corrected: bool = True, n_compare=None):
    """One stage over X (R, L, K) for the runs' `alive` (R, K) prompts. Returns (alive at the end,
    q at which each prompt was eliminated (0: never), q at which each run stopped)."""
    R, L, K = X.shape
    alive = alive.copy()
    out_at = np.zeros((R, K), dtype=int)
    stop = np.full(R, L)
    k = alive.sum(axis=1) if n_compare is None else n_compare
    d = X[:, :n0, :, None] - X[:, :n0, None, :]
    S = np.sqrt(d.var(axis=1, ddof=1))  # (R, K, K)
    csum = np.cumsum(X, axis=1)
    looks = looks_of(n0, L, every)
    fac = np.zeros((R, len(looks)))
    for kk in np.unique(k):
        if kk < 2:
            continue
        c, rho2 = constants(int(kk), alpha, n0, tuple(looks), corrected)
        fac[k == kk] = list(factors(c, rho2, looks).values())
    running = (alive.sum(axis=1) > 1) & (k >= 2)
    for li, q in enumerate(looks):
        D = csum[:, q - 1, :, None] - csum[:, q - 1, None, :]
        cross = (D > S * fac[:, li, None, None]) & alive[:, None, :] & alive[:, :, None] & running[:, None, None]
        gone = cross.any(axis=2)
        out_at[gone] = q
        alive &= ~gone
        ended = running & (alive.sum(axis=1) == 1)
        stop[ended] = q
        running &= ~ended
    return alive, out_at, stop


def run_rule(X, n0: int, M: int, F: int, alpha1: float, alpha2: float, every: int = 1, keep: int = 0, corrected: bool = True, restart: bool = True):
    """The whole rule on X (R, M + F, K). Returns (prediction, r at which each prompt was
    eliminated by a test (0: never), prompts cut at M without a test (bool), evaluations).
    restart=False: the final stage keeps its sums from sample 1 and its variances from the first
    M samples (Bonferroni over its k - 1 after selecting them: the plausible mistake)."""
    R, G, K = X.shape
    alive, at, stop = run_stage(X[:, :M], np.ones((R, K), bool), n0, every, alpha1, corrected)
    evals = np.zeros(R, dtype=int)
    for r in range(R):  # every alive prompt at every sample up to the stop or an elimination
        evals[r] = sum(min(at[r, c] or stop[r], stop[r]) for c in range(K))
    cut = np.zeros((R, K), bool)
    go = alive.sum(axis=1) > 1
    if F and go.any():
        sums = X[:, :M].sum(axis=1)
        if keep:
            order = np.argsort(np.where(alive, sums, np.inf) + np.arange(K) * 1e-15, axis=1, kind="stable")
            ranks = np.argsort(order, axis=1)
            cut = alive & (ranks >= keep) & go[:, None]
            alive = alive & ~cut
        k = alive.sum(axis=1)
        if restart:
            a2, at2, stop2 = run_stage(X[:, M:], alive & go[:, None], n0, every, alpha2, corrected, n_compare=k)
            offset = M
        else:  # sums from sample 1, variances from the first M samples, looks from M + n0 on
            a2, at2, stop2 = _continued_final(X, alive & go[:, None], M, n0, every, alpha2, k)
            offset = 0
        for r in np.flatnonzero(go):
            live = np.flatnonzero(alive[r])
            evals[r] += sum(min(at2[r, c] or stop2[r], stop2[r]) - (M - offset) for c in live)
            for c in live:
                if at2[r, c]:
                    at[r, c] = at2[r, c] + offset
            alive[r] = a2[r]
    # the survivors share their samples up to the stop: the lowest sum over them wins
    pred = np.empty(R, dtype=int)
    for r in range(R):
        live = np.flatnonzero(alive[r])
        stop_r = G if (F and go[r]) else M
        if F and go[r] and len(live) == 1:
            pred[r] = live[0]
            continue
        pred[r] = live[np.argmin(X[r, :stop_r][:, live].sum(axis=0))] if len(live) > 1 else live[0]
    return pred, at, cut, evals


def _continued_final(X, alive, M: int, n0: int, every: int, alpha: float, k):
    """The mistake: the final test among the kept with D over samples 1..r and S from 1..M."""
    R, G, K = X.shape
    F = G - M
    d = X[:, :M, :, None] - X[:, :M, None, :]
    S = np.sqrt(d.var(axis=1, ddof=1))
    csum = np.cumsum(X, axis=1)
    alive = alive.copy()
    at = np.zeros((R, K), dtype=int)
    stop = np.full(R, G)
    looks = [M + q for q in looks_of(n0, F, every)]
    fac = np.zeros((R, len(looks)))
    for kk in np.unique(k):
        if kk >= 2:
            c, rho2 = constants(int(kk), alpha, M, (M, G))
            fac[k == kk] = list(factors(c, rho2, looks).values())
    running = alive.sum(axis=1) > 1
    for li, r in enumerate(looks):
        D = csum[:, r - 1, :, None] - csum[:, r - 1, None, :]
        cross = (D > S * fac[:, li, None, None]) & alive[:, None, :] & alive[:, :, None] & running[:, None, None]
        gone = cross.any(axis=2)
        at[gone] = r
        alive &= ~gone
        ended = running & (alive.sum(axis=1) == 1)
        stop[ended] = r
        running &= ~ended
    return alive, at, stop


def wilson(successes: int, n: int, z: float = 2.576) -> tuple[float, float]:
    """The Wilson score interval (99% by default) for a binomial rate."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
