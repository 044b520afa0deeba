"""`--adaptive`'s rule against an independent reference written from docs/adaptive.md
(tests/adaptive_reference.py), and its error claim in simulation: over several seeds, with a 99%
interval, near-ties, a final stage and a cut (final_keep < K); negative controls that are
plausible mistakes, which the same check must catch."""

from __future__ import annotations

import math

import numpy as np
import pytest

import adaptive_reference as ref
from diffcls.runtime.algorithm.policy import SequentialPolicy, boundary_factors, one_sided_constants, stage_looks
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule


@pytest.mark.parametrize("k, alpha, n0, length, every", [(10, 0.05, 8, 30, 1), (10, 0.2, 6, 30, 3), (3, 0.1, 8, 60, 1), (2, 0.05, 4, 24, 5)])
def test_constants_and_boundary_match_the_reference(k, alpha, n0, length, every):
    looks = stage_looks(n0, length, every)
    assert list(looks) == ref.looks_of(n0, length, every)
    c, rho2 = one_sided_constants(k, alpha, n0, looks)
    c_ref, rho2_ref = ref.constants(k, alpha, n0, looks)
    assert rho2 == pytest.approx(rho2_ref, rel=1e-12)
    assert c == pytest.approx(c_ref, rel=2e-3)
    assert c > 2 * math.log((k - 1) / alpha)  # the estimated variance costs something
    got = boundary_factors(c_ref, rho2_ref, looks)
    want = ref.factors(c_ref, rho2_ref, looks)
    assert np.allclose(got, [want[q] for q in looks], rtol=1e-5)


def test_more_first_stage_samples_give_a_smaller_constant():
    cs = [one_sided_constants(10, 0.05, n0, stage_looks(n0, 60, 1))[0] for n0 in (4, 8, 16, 40)]
    assert cs == sorted(cs, reverse=True)
    assert cs[0] > 3 * cs[-1]


def gaussian_runs(K, G, runs, seed, gap=1e-4, sd_common=0.5, sd_own=0.1, spread=0.0):
    """Paired Gaussian errors X_c(r) = mean_c + Z(r) + e_c(r), Z shared by all prompts at a
    timestep (a (t, noise) sample). Prompt 0 is best by `gap`; `spread` adds far worse rivals."""
    rng = np.random.default_rng(seed)
    means = 1.0 + gap + spread * np.arange(K) / K
    means[0] = 1.0
    return means + rng.normal(0, sd_common, (runs, G, 1)) + rng.normal(0, sd_own, (runs, G, K))


def run_policy(X, params: AdaptiveSchedule, policy_cls=SequentialPolicy):
    K = X.shape[1]
    pol = policy_cls(K, params)
    while not pol.done:
        block = pol.next_block()
        pol.feed_block([c for c, _, _ in block], [k for _, k, _ in block], [j for _, _, j in block], [X[k, c] for c, k, _ in block])
    return pol


RULES = [
    AdaptiveSchedule(alpha=0.2, min_samples=6, max_samples=30, final_samples=0),
    AdaptiveSchedule(alpha=0.2, min_samples=6, max_samples=20, final_samples=40),
    AdaptiveSchedule(alpha=0.3, min_samples=4, max_samples=16, final_samples=24, final_keep=2, look_every=3),
]


@pytest.mark.parametrize("params", RULES, ids=["first-stage", "final-stage", "cut-and-looks"])
def test_policy_makes_the_reference_decisions(params):
    K, runs = 5, 60
    X = gaussian_runs(K, params.grid_size, runs, seed=3, gap=0.02, spread=0.3)
    a1, a2 = params.stage_alphas
    pred, at, cut, evals = ref.run_rule(X, params.min_samples, params.max_samples, params.final_samples, a1, a2,
                                        params.look_every, params.final_keep)
    stopped_early, in_final = 0, 0
    for r in range(runs):
        pol = run_policy(X[r], params)
        by_test = {c: q for c, q in pol.eliminated_at.items() if not cut[r, c]}
        assert pol.result().prediction == pred[r]
        assert by_test == {c: int(at[r, c]) for c in range(K) if at[r, c]}
        assert {c for c in pol.eliminated_at if cut[r, c]} == set(np.flatnonzero(cut[r]))
        assert pol.n_evals == evals[r]
        stopped_early += pol.n_evals < params.evals_upper_bound(K)
        in_final += bool(pol.final and pol.r < params.grid_size and max(pol.eliminated_at.values(), default=0) > params.max_samples)
    assert stopped_early > runs // 2  # the tests act
    if params.final_samples:
        assert in_final > 0  # the final stage's own test stopped some run inside it


def lost_rate(params: AdaptiveSchedule, K: int, seeds, runs: int, corrected: bool = True, **kw):
    """(P(a test eliminates prompt 0), P(prompt 0 lost by a test or the cut), mean evaluations)
    pooled over the seeds, with the reference (the policy's equal: the test above)."""
    tested, lost, evals, n = 0, 0, 0.0, 0
    a1, a2 = params.stage_alphas
    for seed in seeds:
        X = gaussian_runs(K, params.grid_size, runs, seed, **kw)
        _, at, cut, ev = ref.run_rule(X, params.min_samples, params.max_samples, params.final_samples, a1, a2,
                                      params.look_every, params.final_keep, corrected)
        tested += int((at[:, 0] > 0).sum())
        lost += int(((at[:, 0] > 0) | cut[:, 0]).sum())
        evals += float(ev.sum())
        n += runs
    return tested, lost, n, evals / n


CLAIMS = [
    # near-ties, the rule's worst case: ten prompts within 1e-4 of each other
    (AdaptiveSchedule(alpha=0.2, min_samples=6, max_samples=30, final_samples=0), 10, {}),
    (AdaptiveSchedule(alpha=0.05, min_samples=4, max_samples=40, final_samples=0, look_every=4), 6, {}),
    # the whole rule with its final stage: every survivor goes on, sums restarted
    (AdaptiveSchedule(alpha=0.2, min_samples=6, max_samples=20, final_samples=40), 6, {}),
    # a cut at M (final_keep < K): the tests still eliminate the best at most alpha of the time
    (AdaptiveSchedule(alpha=0.2, min_samples=6, max_samples=20, final_samples=40, final_keep=2), 6, {}),
    # one prompt 0.21 sd (of a paired difference) per sample better than its rivals
    (AdaptiveSchedule(alpha=0.2, min_samples=6, max_samples=20, final_samples=40), 6, {"gap": 0.03}),
]


@pytest.mark.parametrize("params, K, kw", CLAIMS, ids=["near-ties", "looks", "final-stage", "final-keep", "gap"])
def test_a_test_eliminates_the_best_at_most_alpha_of_the_time(params, K, kw):
    tested, _lost, n, evals = lost_rate(params, K, seeds=range(4), runs=400, **kw)
    lo, _hi = ref.wilson(tested, n)
    assert lo <= params.resolved_alpha, f"{tested}/{n} eliminations of the best: above alpha {params.resolved_alpha}"
    assert evals < params.evals_upper_bound(K)  # and it does stop early


def test_negative_control_no_variance_correction_is_caught():
    """The known-variance constant with a variance estimated from 4 samples: the same check sees
    the best eliminated far more often than alpha."""
    params = AdaptiveSchedule(alpha=0.2, min_samples=4, max_samples=30, final_samples=0)
    tested, _, n, _ = lost_rate(params, 10, seeds=range(4), runs=400, corrected=False)
    lo, _ = ref.wilson(tested, n)
    assert lo > params.resolved_alpha
    tested, _, n, _ = lost_rate(params, 10, seeds=range(4), runs=400)  # corrected: within the claim
    assert ref.wilson(tested, n)[0] <= params.resolved_alpha


def test_negative_control_a_cut_is_not_covered_by_the_bound():
    """Counting a bare cut to final_keep as if the bound covered it (the old docs' claim of
    alpha + alpha_f) is caught: at near-ties the cut alone loses the best most of the time."""
    params = AdaptiveSchedule(alpha=0.2, min_samples=6, max_samples=20, final_samples=40, final_keep=2)
    _, lost, n, _ = lost_rate(params, 6, seeds=range(4), runs=400)
    assert ref.wilson(lost, n)[0] > params.resolved_alpha
    params = AdaptiveSchedule(alpha=0.2, min_samples=6, max_samples=20, final_samples=40)  # no cut: covered
    _, lost, n, _ = lost_rate(params, 6, seeds=range(4), runs=400)
    assert ref.wilson(lost, n)[0] <= params.resolved_alpha


class _SumsKeptFinalStage(SequentialPolicy):
    """A plausible mistake: the final stage restarts its looks and variances but forgets to
    restart its sums, so its D_ij carries the first stage's samples (over rivals that the first
    stage selected)."""

    def _start_stage(self, start, length, n_compare, alpha):
        kept = getattr(self, "_stage_sums", None)
        super()._start_stage(start, length, n_compare, alpha)
        if start and kept is not None:
            self._stage_sums = kept


def _final_stage_decisions(policy_cls, X, params):
    pol = run_policy(X, params, policy_cls)
    return {c: r for c, r in pol.eliminated_at.items() if r > params.max_samples}, pol.n_evals


def test_the_final_stage_decides_on_its_own_samples_only():
    """Restarting the sums at M + 1 makes the final stage a fresh test given everything the first
    stage saw: moving the first stage's samples (without changing its decisions) leaves every
    final-stage elimination and evaluation count unchanged. A final stage that keeps the first
    stage's sums fails the same check."""
    params = AdaptiveSchedule(alpha=0.2, final_error_rate=0.2 - 1e-9, min_samples=6, max_samples=20, final_samples=40)
    moved = np.zeros((params.grid_size, 6))
    moved[: params.max_samples] = np.linspace(-0.06, 0.06, 6)  # per prompt, first stage only
    differ, decided = 0, 0
    for seed in range(30):
        X = gaussian_runs(6, params.grid_size, 1, seed, gap=0.02, spread=0.12)[0]
        a = _final_stage_decisions(SequentialPolicy, X, params)
        b = _final_stage_decisions(SequentialPolicy, X + moved, params)
        assert a == b
        decided += bool(a[0])
        differ += _final_stage_decisions(_SumsKeptFinalStage, X + moved, params) != _final_stage_decisions(_SumsKeptFinalStage, X, params)
    assert decided >= 10, (decided, differ)  # the final stage's test acted in these runs
    assert differ >= 10  # the mistake is caught


def test_negative_control_sums_kept_in_the_final_stage_is_caught():
    """The same mistake in the error-rate check: at near-ties, after a first stage long enough for
    its sums to wander (M = 60), the best is eliminated about twice as often as alpha (about 20%
    at alpha 0.1), while the rule (sums restarted) stays within it (about 1-3%)."""
    params = AdaptiveSchedule(alpha=0.1, min_samples=6, max_samples=60, final_samples=20)
    rates = {}
    for cls in (SequentialPolicy, _SumsKeptFinalStage):
        tested = n = 0
        for seed in range(4):
            X = gaussian_runs(6, params.grid_size, 400, seed)
            for r in range(400):
                pol = run_policy(X[r], params, cls)
                tested += 0 in pol.eliminated_at  # prompt 0, the best, eliminated by a test (no cut here)
                n += 1
        rates[cls.__name__] = (tested, n)
    assert ref.wilson(*rates["SequentialPolicy"])[0] <= params.resolved_alpha
    assert ref.wilson(*rates["_SumsKeptFinalStage"])[0] > params.resolved_alpha, rates
