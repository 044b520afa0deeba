"""Adaptive evaluation: the sequential policy in the Scorer on a tiny model against a plain
re-implementation of its rule (constants from tests/adaptive_reference.py, never the code's), and
its independence from batching. The error claim in simulation: tests/test_adaptive_rule.py."""

from __future__ import annotations

import hashlib
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adaptive_reference

from diffcls.errors import DiffclsError
from diffcls.runtime.algorithm.policy import FixedPolicy, SequentialPolicy, make_policy
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule, van_der_corput_order
from diffcls.runtime.algorithm.scoring import Scorer, make_noise_bank

PROMPTS = [f"a photo of class {i}" for i in range(6)]


# --- the plain version, written from docs/adaptive.md ------------------------------------------
def plain_order(M: int, T: int, offset: int | None = None) -> list[int]:
    if offset is None:  # the centred grid
        grid, rot = [math.floor((i + 0.5) * T / M) for i in range(M)], 0
    else:  # one random start u in every stratum (exact in integers), then the index rotation
        u = (offset // M) % 2**32
        grid, rot = [(i * 2**32 + u) * T // (M * 2**32) for i in range(M)], offset % M
    bits = max(1, (M - 1).bit_length())
    rev = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(2**bits)]
    return [grid[(i + rot) % M] for i in rev if i < M]


def plain_offset(x0) -> int:
    """An image's grid rotation: the first 8 bytes of the sha256 of its latent's float32 bytes."""
    return int.from_bytes(hashlib.sha256(x0.float().numpy().tobytes()).digest()[:8], "big")


def plain_sequential(error, K: int, p: AdaptiveSchedule, T: int = 1000, offset: int | None = None):
    """error(c, k, t, j) -> float. Returns (prediction, ranking, {(c, t, j): error}), from
    docs/adaptive.md: stages that restart their sums, each with its own variances and constants."""
    ts = plain_order(p.max_samples + p.final_samples, T, offset)
    X = {c: [] for c in range(K)}
    table = {}
    groups = []
    alive = list(range(K))
    a1, a2 = p.stage_alphas

    def sample(c, k):
        errs = [error(c, k, ts[k], j) for j in range(p.n_trials)]
        for j, e in enumerate(errs):
            table[(c, ts[k], j)] = e
        x = 0.0
        for e in errs:
            x += e
        return x / p.n_trials if p.n_trials > 1 else x

    def stage(start, length, alpha):
        nonlocal alive
        n0, k_cmp = p.min_samples, len(alive)
        looks = adaptive_reference.looks_of(n0, length, p.look_every) if length >= n0 else []
        testing = k_cmp > 1 and looks and (p.rule == "mixture" or start == 0)
        if testing and p.rule == "mixture":
            fac = adaptive_reference.factors(*adaptive_reference.constants(k_cmp, alpha, n0, tuple(looks)), looks)
        for q in range(1, length + 1):
            for c in alive:
                X[c].append(sample(c, start + q - 1))
            if not (testing and q in looks and len(alive) > 1):
                continue
            tot = {c: sum(X[c][start:start + q]) for c in alive}
            var = {(i, j): statistics.variance([X[i][s] - X[j][s] for s in range(start, start + n0)]) for i in alive for j in alive if i != j}
            if p.rule == "mixture":
                bound = {ij: math.sqrt(v) * fac[q] for ij, v in var.items()}
            else:
                eta = 0.5 * ((2 * alpha / (K - 1)) ** (-2 / (n0 - 1)) - 1)
                delta = p.rel_delta * sum(X[c][s] for c in range(K) for s in range(n0)) / (n0 * K)
                bound = {ij: max(0.0, 2 * eta * (n0 - 1) * v / (2 * delta) - delta * q / 2) for ij, v in var.items()}
            drop = [i for i in alive if any(tot[i] - tot[j] > bound[i, j] for j in alive if j != i)]
            if drop:
                groups.append(sorted(drop, key=lambda c: (sum(X[c]), c)))
                alive = [c for c in alive if c not in drop]
            if len(alive) == 1:
                return

    stage(0, p.max_samples, a1)
    if len(alive) > 1 and p.final_samples:
        by_mean = sorted(alive, key=lambda c: (sum(X[c]), c))
        if p.final_keep and by_mean[p.final_keep:]:
            groups.append(by_mean[p.final_keep:])
            alive = by_mean[: p.final_keep]
        stage(p.max_samples, p.final_samples, a2)
    final = sorted(alive, key=lambda c: (sum(X[c]), c))
    ranking = final + [c for g in reversed(groups) for c in g]
    return final[0], ranking, table


@pytest.fixture(scope="module")
def inputs(tiny, tiny_engines):
    torch.manual_seed(1)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = tiny.vae.encode(images).latent_dist.mean * tiny.scaling_factor
        emb = tiny.text_encoder(tiny_engines.tokenize(PROMPTS)).last_hidden_state
    # a random tiny model barely tells its prompts apart; scaled embeddings give the rule gaps to find
    return latents, emb * torch.tensor([0.0, 1.0, 4.0, 8.0, 12.0, 16.0])[:, None, None]


def unet_error(tiny, x0, emb, bank, n_trials, loss):
    ac = tiny.alphas_cumprod

    def error(c, k, t, j):
        eps = bank[k * n_trials + j]
        x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
        with torch.no_grad():
            pred = tiny.unet(x_t[None], torch.tensor([t]), encoder_hidden_states=emb[c][None]).sample[0]
        fn = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": lambda a, b: F.huber_loss(a, b, delta=1.0)}[loss]
        return float(fn(pred, eps))

    return error


def run_scorer(engines, emb, latents, schedule, bank, batch_size, keys=None):
    scorer = Scorer(engines.unet, emb, engines.alphas_cumprod, schedule, bank, batch_size)
    keys = keys if keys is not None else range(len(latents))
    return dict(scorer.run((i, latents[i]) for i in keys)), scorer.stats


ADAPTIVE = [
    AdaptiveSchedule(alpha=0.5, min_samples=4, max_samples=16, final_samples=0),
    AdaptiveSchedule(alpha=0.5, min_samples=5, max_samples=12, n_trials=2, loss="l1", final_samples=0, look_every=3),
    AdaptiveSchedule(alpha=0.5, min_samples=3, max_samples=16, rule="kim-nelson", rel_delta=0.02, final_samples=0),
    AdaptiveSchedule(alpha=0.02, min_samples=3, max_samples=4, final_samples=5, final_keep=2),
    # every survivor goes on (no cut); the final stage's own test: tests/test_adaptive_rule.py
    AdaptiveSchedule(alpha=0.95, min_samples=3, max_samples=6, final_samples=12, final_error_rate=0.9),
]


@pytest.mark.parametrize("schedule", ADAPTIVE, ids=lambda s: s.describe().replace(" ", "_"))
def test_sequential_policy_matches_plain_rule_on_a_tiny_model(tiny, tiny_engines, inputs, schedule):
    latents, emb = inputs
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=3)
    got, stats = run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=8)
    eliminated_any = False
    for i in range(len(latents)):
        error = unet_error(tiny, latents[i], emb, bank, schedule.n_trials, schedule.loss)
        pred, ranking, table = plain_sequential(error, len(PROMPTS), schedule, offset=plain_offset(latents[i]))
        assert got[i].prediction == pred
        assert got[i].ranking == ranking
        mine = {(c, t, j): e for c, t, j, e in got[i].errors}
        assert mine.keys() == table.keys()
        assert max(abs(mine[key] - table[key]) for key in table) < 1e-5
        assert got[i].n_evals == len(table) <= schedule.evals_upper_bound(len(PROMPTS))
        eliminated_any |= len(table) < schedule.evals_upper_bound(len(PROMPTS))
    assert stats.unet_evals == sum(r.n_evals for r in got.values())
    if schedule.final_samples:  # some image went on to the final stage
        late = {i: set(schedule.timestep_order(1000, plain_offset(latents[i]))[schedule.max_samples:]) for i in got}
        assert any(t in late[i] for i, r in got.items() for _, t, _, _ in r.errors)
    else:
        assert eliminated_any  # the rule acted: some image stopped before the budget


def test_results_do_not_depend_on_batch_size_or_on_images_sharing_a_batch(tiny_engines, inputs):
    latents, emb = inputs
    schedule = AdaptiveSchedule(alpha=0.5, min_samples=4, max_samples=16, final_samples=0)
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)
    base, _ = run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=5)
    runs = [run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=b)[0] for b in (3, 32)]
    runs.append({2: run_scorer(tiny_engines, emb, latents[2:3], schedule, bank, batch_size=8)[0][0]})  # alone
    for got in runs:
        for i, r in got.items():
            assert r.prediction == base[i].prediction and r.ranking == base[i].ranking
            a = {(c, t, j): e for c, t, j, e in base[i].errors}
            b = {(c, t, j): e for c, t, j, e in r.errors}
            assert a.keys() == b.keys()
            assert max(abs(a[k] - b[k]) for k in a) < 1e-5


def test_batches_stay_full_while_images_need_different_work(tiny_engines, inputs):
    latents, emb = inputs
    schedule = AdaptiveSchedule(alpha=0.5, min_samples=4, max_samples=16, final_samples=0)
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)
    seen = []

    class Counting:
        def __init__(self, inner):
            self.inner, self.spec, self.device, self.dtype = inner, inner.spec, inner.device, inner.dtype
            self.component, self.batch_sizes = "unet", None

        def __call__(self, feed):
            seen.append(feed["sample"].shape[0])
            return self.inner(feed)

    calls_before_last_image = []

    def source():
        for i in range(6):
            if i == 5:
                calls_before_last_image.append(len(seen))
            yield i, latents[i % 3]

    scorer = Scorer(Counting(tiny_engines.unet), emb, tiny_engines.alphas_cumprod, schedule, bank, 7)
    got = dict(scorer.run(source()))
    assert len({r.n_evals for r in got.values()}) > 1  # images stopped at different points
    n = calls_before_last_image[0]
    assert n > 10 and seen[:n] == [7] * n  # full batches while images remain to be admitted
    assert sum(seen) == scorer.stats.unet_evals == sum(r.n_evals for r in got.values())


# --- pure-policy behaviour ----------------------------------------------------------------
def test_van_der_corput_prefixes_are_spread_evenly():
    order = van_der_corput_order(16)
    assert sorted(order) == list(range(16))
    assert sorted(order[:4]) == [0, 4, 8, 12] and sorted(order[:8]) == list(range(0, 16, 2))
    odd = van_der_corput_order(500)
    assert sorted(odd) == list(range(500)) and len(set(odd)) == 500
    ts = AdaptiveSchedule(max_samples=500, final_samples=0).timestep_order(1000)
    assert ts[:4] == [1, 513, 257, 769] and sorted(ts) == list(range(1, 1000, 2))


def test_fixed_policy_prunes_on_an_empty_round_without_a_unet():
    policy = FixedPolicy(Schedule((4, 4, 12), (4, 3, 1)), 6)
    means = [0.5, 0.1, 0.4, 0.2, 0.6, 0.3]
    blocks = []
    while not policy.done:
        block = policy.next_block()
        blocks.append(block)
        for c, k, j in block:
            policy.feed(c, k, j, means[c] + 0.001 * k)
    assert [len(b) for b in blocks] == [24, 24]  # round 2 adds nothing, round 3: 8 timesteps x 3 prompts
    assert sorted({c for c, _k, _j in blocks[1]}) == [1, 3, 5]
    assert policy.result().prediction == 1 and policy.n_evals == 48


def test_a_block_must_be_fed_before_the_next():
    policy = make_policy(AdaptiveSchedule(alpha=0.9, min_samples=2, max_samples=8, final_samples=0), 3)
    policy.next_block()
    with pytest.raises(RuntimeError):
        policy.next_block()


def test_one_prompt_takes_the_first_stage_only():
    policy = SequentialPolicy(1, AdaptiveSchedule(alpha=0.9, min_samples=3, max_samples=8, final_samples=0))
    block = policy.next_block()
    for c, k, j in block:
        policy.feed(c, k, j, 1.0)
    assert policy.done and policy.n_evals == 3 and policy.result().prediction == 0


@pytest.mark.parametrize(
    "params, message",
    [
        (AdaptiveSchedule(error_rate=0.0), "--error-rate 0 must be between 0 and 1"),
        (AdaptiveSchedule(error_rate=1.5), "--error-rate 1.5"),
        (AdaptiveSchedule(min_samples=1), "--min-samples 1 must be between 2 and --max-samples"),
        (AdaptiveSchedule(min_samples=50, max_samples=20), "--min-samples 50"),
        (AdaptiveSchedule(max_samples=2000), "--max-samples 2000 exceeds the model's 1000"),
        (AdaptiveSchedule(rule="bogus"), "unknown adaptive rule"),
        (AdaptiveSchedule(rel_delta=0.0, rule="kim-nelson"), "--rel-delta 0 must be > 0"),
        (AdaptiveSchedule(loss="l3"), "unknown --loss"),
        (AdaptiveSchedule(final_samples=-1), "--final-samples -1 must be >= 0"),
        (AdaptiveSchedule(max_samples=600, final_samples=500), "--max-samples 600 + --final-samples 500 exceed"),
        (AdaptiveSchedule(final_samples=10, final_keep=1), "--final-keep 1 must be 0 (every survivor) or >= 2"),
        (AdaptiveSchedule(alpha=0.0), "--alpha 0 must be > 0"),
        (AdaptiveSchedule(alpha=1.0, final_samples=0), "--alpha 1 must be below 1 without a final stage"),
        (AdaptiveSchedule(final_samples=0), "--error-rate 0.02 picks --alpha 1.5, measured with a final stage; with --final-samples 0 give"),
        (AdaptiveSchedule(alpha=2.0), "--alpha 2 gives the stages the levels 1 and 1; each must be below 1"),
        (AdaptiveSchedule(alpha=1.5, final_error_rate=0.2), "--alpha 1.5 gives the stages the levels 1.3 and 0.2"),
        (AdaptiveSchedule(alpha=0.1, final_error_rate=0.1), "--final-error-rate 0.1 must be between 0 and the test's alpha 0.1"),
        (AdaptiveSchedule(look_every=0), "--look-every 0 must be >= 1"),
        (AdaptiveSchedule(error_rate=0.001), "--error-rate 0.001 is below the smallest measured setting"),
    ],
)
def test_adaptive_schedule_is_validated_up_front(params, message):
    with pytest.raises(DiffclsError) as e:
        params.validate(10)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_alpha_above_one_is_a_constant_with_levels_below_one():
    """alpha in [1, 2) (the knob's cheapest rows): each stage's pair level stays below 1, so the
    constants are finite and the rule still decides; kim-nelson's eta needs 2 alpha_1 / (K - 1) < 1."""
    params = AdaptiveSchedule(alpha=1.5, min_samples=4, max_samples=12, final_samples=20).validate(2)
    assert params.stage_alphas == (0.75, 0.75)
    rng = np.random.default_rng(0)
    X = 1.0 + rng.normal(0, 0.1, (params.grid_size, 2)) + np.array([0.0, 0.15])
    policy = SequentialPolicy(2, params)
    while not policy.done:
        block = policy.next_block()
        policy.feed_block(*zip(*[(c, k, j, X[k, c]) for c, k, j in block]))
    assert policy.result().prediction == 0 and policy.n_evals < params.evals_upper_bound(2)
    with pytest.raises(DiffclsError, match="kim-nelson needs 2 x alpha_1"):
        AdaptiveSchedule(alpha=1.2, rule="kim-nelson").validate(2)


def test_final_stage_keeps_the_best_and_leaves_defaults_untouched():
    """With --final-samples 0 nothing changes (grid, noise bank, description); with a final stage
    an undecided image keeps its survivors (or its best final_keep) for final_samples more
    timesteps, in blocks: the stage's first n0 samples, then one look at a time."""
    plain = AdaptiveSchedule(final_samples=0)
    assert plain.grid_size == plain.max_samples and plain.noise_bank_size() == plain.max_samples
    assert "final" not in plain.describe()
    default = AdaptiveSchedule()  # the final stage is on by default: a 250-point grid
    assert default.grid_size == default.max_samples + default.final_samples and "final_samples=" in default.describe()
    assert default.alpha is None and f"error_rate={default.error_rate:g} alpha={default.resolved_alpha:g}" in default.describe()
    s = AdaptiveSchedule(alpha=0.02, min_samples=4, max_samples=10, final_samples=8, final_keep=2, final_error_rate=0.01)
    assert s.grid_size == 18 and s.noise_bank_size() == 18 and "final_samples=8 final_alpha=0.01 final_keep=2" in s.describe()
    assert s.evals_upper_bound(5) == 5 * 10 + 2 * 8
    order = s.timestep_order()
    assert sorted(order) == s.grid() and len(set(order)) == 18
    # the grid spans [0, T) whether or not its size divides T, and is the fixed grid where it does
    assert s.grid()[0] == 27 and s.grid()[-1] == 972
    assert AdaptiveSchedule(max_samples=50, final_samples=0).grid() == Schedule((50,), (1,)).grid()
    assert AdaptiveSchedule(max_samples=30, final_samples=120).grid()[-1] == 996
    means = [1.0, 1.0005, 1.001, 2.0, 3.0]  # three near-ties no test separates in 10 samples
    rng = np.random.default_rng(0)
    pol = SequentialPolicy(5, s, 1000)
    fed = []
    while not pol.done:
        block = pol.next_block()
        fed.append((pol.phase, sorted({c for c, _, _ in block}), sorted({k for _, k, _ in block})))
        for c, k, j in block:
            pol.feed(c, k, j, float(means[c] + rng.normal(0, 0.2)))
    final = [b for b in fed if b[0] == 2]
    assert all(len(b[1]) == 2 and set(b[1]) <= {0, 1, 2} for b in final)
    assert [b[2] for b in final] == [[10, 11, 12, 13], [14], [15], [16], [17]]
    assert pol.n_evals == sum(len(b[1]) * len(b[2]) for b in fed) <= s.evals_upper_bound(5)
    assert pol.result().prediction in final[0][1] and set(pol.result().ranking) == set(range(5))


def test_each_image_gets_its_own_rotation_of_the_grid(tiny_engines, inputs):
    """An adaptive run gives every image its own rotation of the timestep grid (a function of
    the image: the Scorer's grid_offset, by default of the latent's bytes), every rotation a
    stratified sample of [0, T) in every prefix, so no one set of timesteps is shared by all."""
    s = AdaptiveSchedule(max_samples=16, final_samples=16)
    grids = set()
    for offset in (0, 5, 31, 2**40 + 3, 2**63 - 1):
        order = s.timestep_order(1000, offset)
        grid = s.grid(1000, offset)
        assert order == plain_order(32, 1000, offset) and sorted(order) == grid
        assert all(math.floor(i * 1000 / 32) <= t < math.ceil((i + 1) * 1000 / 32) for i, t in enumerate(grid))  # one per stratum
        for m in (2, 4, 8, 16, 32):  # every power-of-two prefix takes one grid point from each of m equal blocks
            assert sorted(grid.index(t) * m // 32 for t in order[:m]) == list(range(m))
        grids.add(tuple(sorted(order)))
    assert len(grids) > 1  # not only another order: other timesteps
    assert s.timestep_order(1000, 3)[:4] != s.timestep_order(1000, 4)[:4]
    latents, emb = inputs
    schedule = AdaptiveSchedule(alpha=0.5, min_samples=4, max_samples=16, final_samples=0)
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)
    got, _ = run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=5)
    first = {i: [t for _, t, _, _ in r.errors][:1] for i, r in got.items()}
    assert len({tuple(v) for v in first.values()}) > 1  # the images started on different timesteps
    for i, r in got.items():
        assert r.errors[0][1] == schedule.timestep_order(1000, plain_offset(latents[i]))[0]
    # a given grid_offset wins over the latent's bytes
    scorer = Scorer(tiny_engines.unet, emb, tiny_engines.alphas_cumprod, schedule, bank, 5, grid_offset=lambda key, x0: 7)
    res = dict(scorer.run((i, latents[i]) for i in range(len(latents))))
    order7 = schedule.timestep_order(1000, 7)
    assert all({t for _, t, _, _ in r.errors} <= set(order7[: r.n_evals]) for r in res.values())


@pytest.mark.parametrize(
    "schedule",
    [Schedule((4, 8), (3, 1), n_trials=2), AdaptiveSchedule(min_samples=3, max_samples=10, final_samples=6, final_keep=2, n_trials=2),
     AdaptiveSchedule(rule="kim-nelson", alpha=0.9, min_samples=3, max_samples=10, final_samples=0)],
    ids=["fixed", "mixture", "kim-nelson"],
)
def test_feeding_a_block_at_once_is_feeding_it_item_by_item(schedule):
    """The Scorer feeds a batch's items of one image with feed_block: same decisions, same sums."""
    rng = np.random.default_rng(0)
    level = rng.uniform(0.5, 1.0, size=6)
    one, many = make_policy(schedule, 6, 1000, 7), make_policy(schedule, 6, 1000, 7)
    while not one.done:
        block, block2 = one.next_block(), many.next_block()
        assert block == block2
        errs = [float(level[c] + rng.normal(0, 0.2)) for c, _, _ in block]
        cut = len(block) // 3  # in two pieces, as two batches would split it
        for (c, k, j), e in zip(block, errs):
            one.feed(c, k, j, e)
        for part in (slice(0, cut), slice(cut, None)):
            items = block[part]
            many.feed_block([c for c, _, _ in items], [k for _, k, _ in items], [j for _, _, j in items], errs[part])
        assert one.done == many.done and one.phase == many.phase
    assert many.done and one.result() == many.result() and one.n_evals == many.n_evals
    assert np.array_equal(np.asarray(one.sums), np.asarray(many.sums))
