"""Flow-matching models (SD3 / SD3.5's rectified flow) are scored with their own noising and target.

A model whose scheduler is `FlowMatchEulerDiscreteScheduler` was trained on
x_t = (1 - σ) x0 + σ eps to predict v = eps - x0, with σ from the scheduler's own table (its
`shift` applied) and the transformer fed σ * 1000. `reference_flow_classify` writes the loop of
docs/design.md out with exactly that, taking σ and the timestep from diffusers' scheduler itself;
the library must give the same errors and predictions, with and without a timestep weighting.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from diffcls.errors import DiffclsError
from diffcls.models import tiny_model
from diffcls.models.tiny import TinyConfig, flow_scheduler_config, save_model
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule
from diffcls.runtime.algorithm.scoring import Scorer, make_noise_bank

PROMPTS = [f"a photo of class {i}" for i in range(5)]
SCHEDULES = [
    Schedule((4, 12), (3, 1)),
    Schedule((3, 9), (2, 1), n_trials=2, loss="l1"),
    Schedule((4, 12), (3, 1), weighting="logit-normal"),
]


def logit_normal_weight(t: int, T: int) -> float:
    """SD3's timestep density at the grid point u = (t + 1/2) / T, before normalisation."""
    u = (t + 0.5) / T
    return math.exp(-0.5 * math.log(u / (1 - u)) ** 2) / (math.sqrt(2 * math.pi) * u * (1 - u))


def reference_flow_classify(model, scheduler, x0, emb, schedule: Schedule, bank):
    """The paper's loop, one image, rectified flow. Returns (prediction, {(c, t, j): err})."""
    T = scheduler.config.num_train_timesteps
    M = max(schedule.n_samples)
    grid = list(range(T // M // 2, T, T // M))[:M]
    norm = sum(logit_normal_weight(t, T) for t in range(T)) / T
    evaluated, remaining, errors, table = [], list(range(emb.shape[0])), {}, {}
    for n_i, k_i in zip(schedule.n_samples, schedule.to_keep):
        step = len(grid) // n_i
        for t in [t for t in grid[step // 2 :: step][:n_i] if t not in evaluated]:
            k = len(evaluated)
            evaluated.append(t)
            sigma = scheduler.sigmas[T - 1 - t]  # the scheduler's table runs from σ = 1 down
            timestep = scheduler.timesteps[T - 1 - t]  # what the SD3 pipeline feeds the model: σ * 1000
            for c in remaining:
                for j in range(schedule.n_trials):
                    eps = bank[k * schedule.n_trials + j]
                    x_t = (1 - sigma) * x0 + sigma * eps
                    v = eps - x0
                    with torch.no_grad():
                        pred = model.unet(x_t[None], timestep[None], encoder_hidden_states=emb[c][None]).sample[0]
                    err = float(F.mse_loss(pred, v) if schedule.loss == "l2" else F.l1_loss(pred, v))
                    if schedule.weighting == "logit-normal":
                        err *= logit_normal_weight(t, T) / norm
                    errors.setdefault(c, []).append(err)
                    table[(c, t, j)] = err
        scores = {c: sum(errors[c]) / len(errors[c]) for c in remaining}
        remaining = sorted(remaining, key=lambda c: scores[c])[:k_i]
    return remaining[0], table


@pytest.fixture(scope="module")
def fmodel():
    return tiny_model(seed=0, cfg=TinyConfig(prediction_type="flow", shift=3.0))


@pytest.fixture(scope="module")
def fengines(fmodel):
    from diffcls.engines import open_engines

    return open_engines("torch", model=fmodel, device="cpu")


@pytest.fixture(scope="module")
def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


@pytest.fixture(scope="module")
def inputs(fmodel, fengines):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = fmodel.vae.encode(images).latent_dist.mean * fmodel.scaling_factor
        emb = fmodel.text_encoder(fengines.tokenize(PROMPTS)).last_hidden_state
    return latents, emb


def test_the_sigma_table_is_the_schedulers_with_its_shift(fmodel, scheduler):
    assert fmodel.prediction_type == "flow"
    assert torch.equal(fmodel.sigmas, scheduler.sigmas.flip(0))
    assert fmodel.sigmas[499] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=2e-3)  # shift 3: σ(1/2) = 3/4
    unshifted = tiny_model(seed=0, cfg=TinyConfig(prediction_type="flow", shift=1.0))
    assert torch.allclose(unshifted.sigmas, torch.arange(1, 1001, dtype=torch.float32) / 1000)
    assert unshifted.fingerprint() != fmodel.fingerprint()  # same weights, other σ: another model


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.describe().replace(" ", "_"))
def test_flow_scoring_matches_reference(fmodel, fengines, scheduler, inputs, schedule):
    latents, emb = inputs
    bank = make_noise_bank(schedule, fengines.latent_shape, seed=3)
    scorer = Scorer(fengines.unet, emb, fengines.alphas_cumprod, schedule, bank, 8,
                    prediction_type=fengines.prediction_type, sigmas=fengines.sigmas)
    got = dict(scorer.run((i, latents[i]) for i in range(len(latents))))
    for i in range(len(latents)):
        pred, table = reference_flow_classify(fmodel, scheduler, latents[i], emb, schedule, bank)
        mine = {(c, t, j): e for c, t, j, e in got[i].errors}
        assert mine.keys() == table.keys()
        for key, err in table.items():
            assert mine[key] == pytest.approx(err, rel=1e-5, abs=1e-6), key
        assert got[i].prediction == pred


def test_the_weighting_changes_the_errors_by_the_density(fengines, inputs):
    """Weighted errors are the unweighted ones times w_t (mean 1 over the grid; large mid-grid)."""
    latents, emb = inputs
    plain, weighted = Schedule((6,), (1,)), Schedule((6,), (1,), weighting="logit-normal")
    bank = make_noise_bank(plain, fengines.latent_shape, seed=0)
    out = {}
    for s in (plain, weighted):
        scorer = Scorer(fengines.unet, emb, fengines.alphas_cumprod, s, bank, 8, prediction_type="flow", sigmas=fengines.sigmas)
        out[s.weighting] = {(c, t, j): e for c, t, j, e in dict(scorer.run([(0, latents[0])]))[0].errors}
    from diffcls.models.noising import timestep_weights

    w = timestep_weights("logit-normal", 1000)
    assert w.mean().item() == pytest.approx(1.0) and w[500] > 1.5 > 0.1 > w[0]
    for (c, t, j), e in out["none"].items():
        assert out["logit-normal"][(c, t, j)] == pytest.approx(e * float(w[t]), rel=1e-6)


def test_a_flow_directory_loads_and_its_sigmas_travel_with_its_engines(tmp_path, fmodel):
    pytest.importorskip("onnxruntime")
    from diffcls.engines import open_engines
    from diffcls.export import ExportConfig, export_model
    from diffcls.models.loading import load_model
    from diffcls.runtime.execution.classifier import Classifier

    d = save_model(fmodel, tmp_path / "flow", flow_scheduler_config(1000, 3.0))
    loaded = load_model(d)
    assert loaded.prediction_type == "flow" and torch.equal(loaded.sigmas, fmodel.sigmas)
    assert loaded.fingerprint() == fmodel.fingerprint()
    export_model(ExportConfig(out=tmp_path / "e", model=d, batch_sizes=(4,), image_size=16, device="cpu"))
    assert json.loads((tmp_path / "e" / "manifest.json").read_text())["prediction_type"] == "flow"
    ort = open_engines("onnxruntime", engine_dir=tmp_path / "e", device="cpu")
    assert ort.prediction_type == "flow" and torch.equal(ort.sigmas, fmodel.sigmas)
    from conftest import random_image

    images = [random_image(i) for i in range(4)]
    schedule = Schedule((4, 8), (3, 1), weighting="logit-normal")
    results = {}
    for name, engines in (("torch", open_engines("torch", model=loaded, device="cpu")), ("ort", ort)):
        rows = Classifier(engines, cache=None).classify(images, PROMPTS, schedule, batch_size=4)
        results[name] = rows
    assert [r.prompt for r in results["torch"]] == [r.prompt for r in results["ort"]]
    for a, b in zip(results["torch"], results["ort"]):
        ea = {(c, t, j): e for c, t, j, e in a.errors}
        eb = {(c, t, j): e for c, t, j, e in b.errors}
        assert ea.keys() == eb.keys() and max(abs(ea[k] - eb[k]) for k in ea) < 1e-4


@pytest.mark.parametrize(
    "config, fragment",
    [
        ({"_class_name": "FlowMatchHeunDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}, "FlowMatchHeunDiscreteScheduler is not supported"),
        ({**flow_scheduler_config(), "prediction_type": "epsilon"}, "predicts the flow velocity, not 'epsilon'"),
    ],
)
def test_other_flow_schedulers_are_refused_in_one_line(tmp_path, tiny_dir, config, fragment):
    from diffcls.models.loading import load_model

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    f = d / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps(config))
    with pytest.raises(DiffclsError) as e:
        load_model(d)
    assert fragment in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_the_weighting_is_part_of_the_schedule_a_results_file_is_bound_to():
    from diffcls.runtime.algorithm.schedule import schedule_from_dict
    from diffcls.runtime.execution.spec import JobSpec, build_schedule

    s = Schedule((4, 8), (3, 1), weighting="logit-normal")
    assert s.to_dict()["weighting"] == "logit-normal" and schedule_from_dict(s.to_dict()) == s
    assert "weighting" not in Schedule((4, 8), (3, 1)).to_dict()  # files written before weightings: unchanged
    a = AdaptiveSchedule(weighting="logit-normal")
    assert schedule_from_dict(a.to_dict()) == a and "weighting=logit-normal" in a.describe()
    # the model's diffcls.json gives the default; --weighting overrides it
    assert build_schedule(JobSpec(), 5, {"weighting": "logit-normal"}).weighting == "logit-normal"
    assert build_schedule(JobSpec(weighting="none"), 5, {"weighting": "logit-normal"}).weighting == "none"
    assert build_schedule(JobSpec(adaptive=True), 5, {"weighting": "logit-normal"}).weighting == "logit-normal"
    with pytest.raises(DiffclsError, match="--weighting 'cosine' is not one of none, logit-normal"):
        JobSpec(weighting="cosine")
    with pytest.raises(DiffclsError, match="unknown --weighting 'cosine'"):
        Schedule((4,), (1,), weighting="cosine").validate(2)


def test_a_flow_model_defaults_to_the_logit_normal_weighting(tmp_path, fmodel, tiny_dir):
    from diffcls.models.loading import model_defaults
    from diffcls.runtime.execution.spec import JobSpec, build_schedule

    d = save_model(fmodel, tmp_path / "flow", flow_scheduler_config(1000, 3.0))
    assert build_schedule(JobSpec(), 5, model_defaults(d)).weighting == "logit-normal"
    assert build_schedule(JobSpec(weighting="none"), 5, model_defaults(d)).weighting == "none"
    (d / "diffcls.json").write_text(json.dumps({"weighting": "none"}))  # the model's own choice wins
    assert build_schedule(JobSpec(), 5, model_defaults(d)).weighting == "none"
    assert build_schedule(JobSpec(), 5, model_defaults(tiny_dir)).weighting == "none"  # a DDPM model
