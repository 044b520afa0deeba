"""v-prediction models are scored against their own target (issue 8 item 5).

A UNet trained with `prediction_type: v_prediction` (SD 2.x 768-v) predicts
v = sqrt(ᾱ_t) eps - sqrt(1 - ᾱ_t) x0, not the noise. `reference_v_classify` is the loop of docs/design.md
written out with that target; the library must give the same errors and predictions. Any other
prediction type is refused with one line, wherever it comes from (model directory, engine
manifest, the Scorer's keyword).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from diffcls.errors import DiffclsError
from diffcls.models import tiny_model
from diffcls.models.tiny import TinyConfig, save_model
from diffcls.runtime.algorithm.schedule import Schedule
from diffcls.runtime.algorithm.scoring import Scorer, make_noise_bank

PROMPTS = [f"a photo of class {i}" for i in range(5)]
SCHEDULES = [Schedule((4, 12), (3, 1)), Schedule((3, 9), (2, 1), n_trials=2, loss="l1")]


def reference_v_classify(model, x0, emb, schedule: Schedule, bank):
    """The paper's loop, one image, with the UNet's target v. Returns (prediction, {(c, t, j): err})."""
    T = model.alphas_cumprod.shape[0]
    ac = model.alphas_cumprod
    M = max(schedule.n_samples)
    grid = list(range(T // M // 2, T, T // M))[:M]
    evaluated, remaining, errors, table = [], list(range(emb.shape[0])), {}, {}
    for n_i, k_i in zip(schedule.n_samples, schedule.to_keep):
        step = len(grid) // n_i
        for t in [t for t in grid[step // 2 :: step][:n_i] if t not in evaluated]:
            k = len(evaluated)
            evaluated.append(t)
            for c in remaining:
                for j in range(schedule.n_trials):
                    eps = bank[k * schedule.n_trials + j]
                    x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
                    v = ac[t].sqrt() * eps - (1 - ac[t]).sqrt() * x0
                    with torch.no_grad():
                        pred = model.unet(x_t[None], torch.tensor([t]), encoder_hidden_states=emb[c][None]).sample[0]
                    err = float(F.mse_loss(pred, v) if schedule.loss == "l2" else F.l1_loss(pred, v))
                    errors.setdefault(c, []).append(err)
                    table[(c, t, j)] = err
        scores = {c: sum(errors[c]) / len(errors[c]) for c in remaining}
        remaining = sorted(remaining, key=lambda c: scores[c])[:k_i]
    return remaining[0], table


@pytest.fixture(scope="module")
def vmodel():
    return tiny_model(seed=0, cfg=TinyConfig(prediction_type="v_prediction"))


@pytest.fixture(scope="module")
def vengines(vmodel):
    from diffcls.engines import open_engines

    return open_engines("torch", model=vmodel, device="cpu")


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.describe().replace(" ", "_"))
def test_v_prediction_matches_reference(vmodel, vengines, schedule):
    assert vengines.prediction_type == "v_prediction"
    torch.manual_seed(1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = vmodel.vae.encode(images).latent_dist.mean * vmodel.scaling_factor
        emb = vmodel.text_encoder(vengines.tokenize(PROMPTS)).last_hidden_state
    bank = make_noise_bank(schedule, vengines.latent_shape, seed=3)
    scorer = Scorer(vengines.unet, emb, vengines.alphas_cumprod, schedule, bank, 8, prediction_type=vengines.prediction_type)
    got = dict(scorer.run((i, latents[i]) for i in range(len(latents))))
    for i in range(len(latents)):
        pred, table = reference_v_classify(vmodel, latents[i], emb, schedule, bank)
        mine = {(c, t, j): e for c, t, j, e in got[i].errors}
        assert mine.keys() == table.keys()
        for key, err in table.items():
            assert mine[key] == pytest.approx(err, abs=1e-5), key
        assert got[i].prediction == pred


def test_a_v_model_directory_is_scored_against_v(tmp_path, image_folder):
    """A diffusers directory whose scheduler config says v_prediction, through load_model and the
    Classifier (the route `classify --model DIR` takes), against the reference."""
    from diffcls.engines import open_engines
    from diffcls.models.loading import load_model
    from diffcls.models.tiny import scheduler_config
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.data.preprocess import Interpolation, image_to_tensor, open_image, resize_center_crop

    d = save_model(tiny_model(seed=0), tmp_path / "v", {**scheduler_config(TinyConfig()), "prediction_type": "v_prediction"})
    vmodel = load_model(d)
    vengines = open_engines("torch", model=vmodel, device="cpu")
    schedule = SCHEDULES[0]
    path = str(sorted(image_folder.rglob("*.png"))[0])
    r = Classifier(vengines, cache=None).classify([path], PROMPTS, schedule)[0]
    pixels = image_to_tensor(resize_center_crop(open_image(path), 16, Interpolation.bicubic))
    with torch.no_grad():
        x0 = vmodel.vae.encode(pixels[None]).latent_dist.mean[0] * vmodel.scaling_factor
        emb = vmodel.text_encoder(vengines.tokenize(PROMPTS)).last_hidden_state
    pred, table = reference_v_classify(vmodel, x0, emb, schedule, make_noise_bank(schedule, vengines.latent_shape, 0))
    assert r.prompt == pred
    mine = {(c, t, j): e for c, t, j, e in r.errors}
    assert max(abs(mine[k] - table[k]) for k in table) < 1e-4


def test_prediction_type_is_read_from_the_scheduler_config(tmp_path, vmodel):
    from diffcls.models.loading import load_model

    d = save_model(vmodel, tmp_path / "v")
    assert json.loads((d / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    loaded = load_model(d)
    assert loaded.prediction_type == "v_prediction"
    # same weights, other target: another model for caches and engine manifests
    assert loaded.fingerprint() != tiny_model(seed=0).fingerprint()
    cfg = json.loads((d / "scheduler" / "scheduler_config.json").read_text())
    del cfg["prediction_type"]  # diffusers' default
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    assert load_model(d).prediction_type == "epsilon"


@pytest.mark.parametrize("value", ["sample", "flow"])
def test_other_prediction_types_are_refused_on_load(tmp_path, tiny_dir, value):
    from typer.testing import CliRunner

    from diffcls.cli.app import app

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    f = d / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": value}))
    (tmp_path / "img").mkdir()
    from conftest import random_image

    random_image(0).save(tmp_path / "img" / "a.png")
    r = CliRunner().invoke(app, ["classify", str(tmp_path / "img"), "--model", str(d), "--classes", "a,b",
                                 "--n-samples", "2,4", "--to-keep", "2,1", "--no-cache"])
    assert r.exit_code == 2, r.output
    (line,) = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert str(f) in line and repr(value) in line and "v_prediction" in line and "Traceback" not in r.output


def test_scorer_refuses_an_unknown_prediction_type(tiny_engines):
    s = Schedule((2,), (1,))
    emb = torch.zeros(2, 77, 32)
    with pytest.raises(DiffclsError, match="'sample' cannot be scored"):
        Scorer(tiny_engines.unet, emb, tiny_engines.alphas_cumprod, s, make_noise_bank(s, (4, 8, 8), 0), 4, prediction_type="sample")


def test_engine_manifest_carries_the_prediction_type(tmp_path, engine_dir):
    from conftest import copy_of

    from diffcls.engines import open_engines

    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["prediction_type"] == "epsilon"  # export writes it
    d = copy_of(engine_dir, tmp_path / "e")

    def with_value(value):  # as an export of such a model would have written it
        from diffcls.engines.manifest import write_manifest

        m = dict(manifest)
        if value is None:
            m.pop("prediction_type")
        else:
            m["prediction_type"] = value
        write_manifest(d, m)
        return open_engines("onnxruntime", engine_dir=d, device="cpu")

    assert with_value("v_prediction").prediction_type == "v_prediction"
    assert with_value(None).prediction_type == "epsilon"  # a manifest from before it was recorded
    with pytest.raises(DiffclsError, match="prediction_type 'sample'"):
        with_value("sample")


def test_export_records_a_v_models_prediction_type(monkeypatch, tmp_path, vmodel):
    pytest.importorskip("onnxruntime")
    from diffcls.export import ExportConfig, export_model, pipeline

    monkeypatch.setattr(pipeline, "COMPONENTS", ("vae_encoder",))  # the manifest is under test, not the graphs
    res = export_model(ExportConfig(out=tmp_path, model=vmodel, batch_sizes=(2,), image_size=16, device="cpu"))
    assert res.manifest["prediction_type"] == "v_prediction"
    assert json.loads((tmp_path / "manifest.json").read_text())["prediction_type"] == "v_prediction"
