"""The scoring loop against a plain re-implementation of the algorithm in docs/design.md.

`reference_classify` below is written from the spec, one image at a time, with the diffusers
UNet called directly (no wrappers, no engines, no batching tricks). The library must give the
same prediction and the same error for every (prompt, t, trial).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffcls.runtime.algorithm.schedule import Schedule
from diffcls.runtime.algorithm.scoring import Scorer, make_noise_bank

PROMPTS = [f"a photo of class {i}" for i in range(6)]


def reference_classify(model, x0, emb, schedule: Schedule, bank):
    """docs/design.md, "The scoring loop", literally. Returns (prediction, {(prompt, t, trial): error})."""
    T = model.alphas_cumprod.shape[0]
    ac = model.alphas_cumprod
    M = max(schedule.n_samples)
    grid = list(range(T // M // 2, T, T // M))[:M]
    evaluated = []  # timesteps in evaluation order
    remaining = list(range(emb.shape[0]))
    errors = {c: [] for c in remaining}
    table = {}
    for n_i, k_i in zip(schedule.n_samples, schedule.to_keep):
        step = len(grid) // n_i
        ts = [t for t in grid[step // 2 :: step][:n_i] if t not in evaluated]
        for t in ts:
            k = len(evaluated)
            evaluated.append(t)
            for c in remaining:
                for j in range(schedule.n_trials):
                    eps = bank[k * schedule.n_trials + j]
                    x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
                    with torch.no_grad():
                        pred = model.unet(x_t[None], torch.tensor([t]), encoder_hidden_states=emb[c][None]).sample[0]
                    if schedule.loss == "l2":
                        err = F.mse_loss(pred, eps)
                    elif schedule.loss == "l1":
                        err = F.l1_loss(pred, eps)
                    else:
                        err = F.huber_loss(pred, eps, delta=1.0)
                    errors[c].append(float(err))
                    table[(c, t, j)] = float(err)
        scores = {c: sum(errors[c]) / len(errors[c]) for c in remaining}
        remaining = sorted(remaining, key=lambda c: scores[c])[:k_i]
    assert len(remaining) == 1
    return remaining[0], table


@pytest.fixture(scope="module")
def inputs(tiny, tiny_engines):
    torch.manual_seed(1)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = tiny.vae.encode(images).latent_dist.mean * tiny.scaling_factor
        ids = tiny_engines.tokenize(PROMPTS)
        emb = tiny.text_encoder(ids).last_hidden_state
    return latents, emb


def run_scorer(engines, emb, latents, schedule, bank, batch_size):
    scorer = Scorer(engines.unet, emb, engines.alphas_cumprod, schedule, bank, batch_size)
    return dict(scorer.run((i, latents[i]) for i in range(len(latents)))), scorer.stats


SCHEDULES = [
    Schedule((4, 12), (3, 1)),  # the paper's `--n_samples 50 500 --to_keep 5 1` shape, scaled down
    Schedule((5, 50), (3, 1)),  # 50/500-shaped with uneven grid steps
    Schedule((2, 4, 8), (4, 2, 1)),  # three rounds
    Schedule((6,), (1,)),  # no pruning: one round, all prompts
    Schedule((3, 9), (2, 1), n_trials=2),  # several noise draws per timestep
    Schedule((4, 8), (3, 1), loss="l1"),
    Schedule((4, 8), (3, 1), loss="huber"),
    Schedule((3, 3), (2, 1)),  # second round adds no new timestep
    Schedule((4, 4, 12), (4, 3, 1)),  # an empty middle round: it prunes, then round 3 runs
    Schedule((2, 2, 2, 8), (5, 4, 3, 1)),  # two empty rounds in a row, each pruning
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.describe().replace(" ", "_"))
def test_matches_reference(tiny, tiny_engines, inputs, schedule):
    latents, emb = inputs
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=3)
    got, _ = run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=8)
    for i in range(len(latents)):
        pred, table = reference_classify(tiny, latents[i], emb, schedule, bank)
        assert got[i].prediction == pred
        mine = {(c, t, j): e for c, t, j, e in got[i].errors}
        assert mine.keys() == table.keys()
        for key, err in table.items():
            assert mine[key] == pytest.approx(err, abs=1e-5), key
        # the score is the mean of the prompt's errors
        for c, s in got[i].scores.items():
            errs = [e for (cc, _t, _j), e in table.items() if cc == c]
            assert s == pytest.approx(sum(errs) / len(errs), abs=1e-6)


def test_evaluation_count_matches_schedule(tiny_engines, inputs):
    latents, emb = inputs
    schedule = Schedule((4, 12), (3, 1), n_trials=2)
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)
    got, stats = run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=8)
    per_image = 6 * 4 * 2 + 3 * 8 * 2
    assert schedule.evals_upper_bound(6) == per_image
    assert all(r.n_evals == per_image for r in got.values())
    assert stats.unet_evals == 3 * per_image


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batch_size_does_not_change_results(tiny_engines, inputs, batch_size):
    latents, emb = inputs
    schedule = Schedule((4, 12), (3, 1), n_trials=2)
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)
    base, _ = run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=5)
    got, stats = run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=batch_size)
    for i in base:
        assert got[i].prediction == base[i].prediction
        assert got[i].ranking == base[i].ranking
        a = {(c, t, j): e for c, t, j, e in base[i].errors}
        b = {(c, t, j): e for c, t, j, e in got[i].errors}
        assert a.keys() == b.keys()
        assert max(abs(a[k] - b[k]) for k in a) < 1e-5


def test_one_image_alone_equals_interleaved(tiny_engines, inputs):
    latents, emb = inputs
    schedule = Schedule((4, 12), (3, 1))
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)
    together, stats = run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=7)
    for i in range(len(latents)):
        alone, _ = run_scorer(tiny_engines, emb, latents[i : i + 1], schedule, bank, batch_size=7)
        a = {(c, t, j): e for c, t, j, e in alone[0].errors}
        b = {(c, t, j): e for c, t, j, e in together[i].errors}
        assert alone[0].prediction == together[i].prediction
        assert max(abs(a[k] - b[k]) for k in a) < 1e-5


def test_batches_are_full_until_the_last(tiny_engines, inputs):
    latents, emb = inputs
    schedule = Schedule((4, 12), (3, 1))  # 48 evals per image, 144 in all
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)

    class FixedSizes:  # an engine built for batch sizes 4 and 32 only
        def __init__(self, inner):
            self.inner, self.spec, self.device, self.dtype = inner, inner.spec, inner.device, inner.dtype
            self.component, self.batch_sizes, self.seen = "unet", (4, 32), []

        def __call__(self, feed):
            self.seen.append(feed["sample"].shape[0])
            return self.inner(feed)

    engine = FixedSizes(tiny_engines.unet)
    scorer = Scorer(engine, emb, tiny_engines.alphas_cumprod, schedule, bank, batch_size=32)
    results = dict(scorer.run((i, latents[i]) for i in range(3)))
    assert len(results) == 3
    assert engine.seen[:-1] == [32] * (len(engine.seen) - 1)  # 144 = 4 * 32 + 16 -> last call pads to 32
    assert engine.seen[-1] in (4, 32)
    assert scorer.stats.unet_evals == 144
    assert scorer.stats.padded == sum(engine.seen) - 144
    assert 0 < scorer.stats.padding_fraction < 0.2


def test_noise_bank_is_seeded():
    s = Schedule((4, 8), (2, 1), n_trials=3)
    a = make_noise_bank(s, (4, 8, 8), seed=5)
    assert a.shape == (8 * 3, 4, 8, 8)
    assert torch.equal(a, make_noise_bank(s, (4, 8, 8), seed=5))
    assert not torch.equal(a, make_noise_bank(s, (4, 8, 8), seed=6))


def test_ranking_puts_survivors_first(tiny_engines, inputs):
    latents, emb = inputs
    schedule = Schedule((4, 12), (3, 1))
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)
    got, _ = run_scorer(tiny_engines, emb, latents[:1], schedule, bank, batch_size=8)
    r = got[0]
    assert r.ranking[0] == r.prediction
    assert sorted(r.ranking) == list(range(6))
    # the three pruned after round 1 come last, ordered by their round-1 score
    pruned = r.ranking[3:]
    assert [r.scores[c] for c in pruned] == sorted(r.scores[c] for c in pruned)


def test_an_empty_round_prunes_and_the_later_rounds_run(tiny_engines, inputs):
    latents, emb = inputs
    schedule = Schedule((4, 4, 12), (4, 3, 1))  # rounds of 4, 0 and 8 new timesteps
    assert [len(r) for r in schedule.rounds(1000)] == [4, 0, 8]
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)
    got, stats = run_scorer(tiny_engines, emb, latents, schedule, bank, batch_size=8)
    per_image = 6 * 4 + 3 * 8  # 48: round 2 prunes 4 -> 3 without new work, round 3 scores 3 prompts
    assert schedule.evals_upper_bound(6) == per_image
    assert all(r.n_evals == per_image for r in got.values())
    assert stats.unet_evals == 3 * per_image
    for r in got.values():
        late = {c for c, t, _j, _e in r.errors if t not in {t for _k, t in schedule.rounds(1000)[0]}}
        assert len(late) == 3  # the third round ran on the three prompts the empty round kept


def test_non_finite_errors_stop_with_one_line_naming_the_image(tiny_engines, inputs):
    from diffcls.errors import DiffclsError

    latents, emb = inputs
    schedule = Schedule((4, 12), (3, 1))
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)
    bad = latents.clone()
    bad[1, 0, 2, 3] = float("nan")  # one NaN in the second image's latent
    scorer = Scorer(tiny_engines.unet, emb, tiny_engines.alphas_cumprod, schedule, bank, 8)
    with pytest.raises(DiffclsError) as e:
        dict(scorer.run((key, bad[i]) for i, key in enumerate(["a.png", "b.png", "c.png"])))
    msg = str(e.value)
    assert "\n" not in msg and "'b.png'" in msg and "not finite" in msg and "--precision fp32" in msg


def test_non_finite_latent_through_the_classifier_names_the_image(tiny_engines):
    from diffcls.errors import DiffclsError
    from diffcls.runtime.execution.classifier import Classifier

    clf = Classifier(tiny_engines, cache=None)
    size = tiny_engines.image_size
    good = torch.zeros(3, size, size)
    bad = good.clone()
    bad[0, 1, 1] = float("inf")  # the VAE turns it into a non-finite latent
    with pytest.raises(DiffclsError) as e:
        clf.classify([good, bad], ["a cat", "a dog"], Schedule((2,), (1,)), batch_size=4)
    assert "<image 1>" in str(e.value) and "\n" not in str(e.value)


def test_the_error_reduction_does_not_depend_on_the_batch():
    """Per-sample errors from one batch equal those of each sample alone, bit for bit."""
    from diffcls.runtime.algorithm.scoring import per_sample_loss

    g = torch.Generator().manual_seed(0)
    eps, pred = torch.randn(13, 4, 24, 24, generator=g), torch.randn(13, 4, 24, 24, generator=g)
    for loss in ("l2", "l1", "huber"):
        batched = per_sample_loss(eps, pred, loss)
        alone = torch.cat([per_sample_loss(eps[i : i + 1], pred[i : i + 1], loss) for i in range(13)])
        assert torch.equal(batched, alone)
        assert torch.equal(per_sample_loss(eps[3:9], pred[3:9], loss), batched[3:9])


def test_one_batch_of_lookahead_launches_the_next_batch_before_reading_this_one(tiny_engines, inputs):
    """With a full batch queued the Scorer launches it before it reads the errors of the batch in
    flight (what keeps a GPU busy while the host feeds the policies); the answers are those of a
    Scorer that waits for every batch, and only the last batch is padded."""
    latents, emb = inputs
    schedule = Schedule((4, 12), (3, 1), n_trials=2)
    bank = make_noise_bank(schedule, tiny_engines.latent_shape, seed=0)

    class Recording(Scorer):
        def _launch(self, items):
            events.append("launch")
            return super()._launch(items)

        def _collect(self, launched):
            events.append("collect")
            return super()._collect(launched)

    runs = {}
    for lookahead in (True, False):
        events: list[str] = []
        scorer = Recording(tiny_engines.unet, emb, tiny_engines.alphas_cumprod, schedule, bank, 8, lookahead=lookahead)
        runs[lookahead] = (dict(scorer.run((i, latents[i]) for i in range(3))), scorer.stats, events)
    (ahead, stats, events), (waited, stats_waited, events_waited) = runs[True], runs[False]
    assert events_waited == ["launch", "collect"] * stats_waited.unet_calls
    assert stats.launched_ahead > 0 and events.count("launch") == events.count("collect") == stats.unet_calls
    pairs = ["".join(e[0] for e in events[i : i + 3]) for i in range(len(events) - 2)]
    assert "llc" in pairs  # two batches launched, the first read back after the second went out
    assert stats.unet_evals == stats_waited.unet_evals == 3 * (6 * 4 * 2 + 3 * 8 * 2) and stats.padded == stats_waited.padded
    for i in waited:
        assert ahead[i].prediction == waited[i].prediction and ahead[i].ranking == waited[i].ranking
        a = {(c, t, j): e for c, t, j, e in ahead[i].errors}
        b = {(c, t, j): e for c, t, j, e in waited[i].errors}
        assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5
