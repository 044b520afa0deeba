"""Flux (`FluxPipeline` directories): a tiny random Flux built from configs.

Its prompt embeddings must be diffusers' own (`FluxPipeline.encode_prompt`), its errors those of
a plain re-implementation of Flux's noising and loss written here (packing by pixel_unshuffle,
the sigmas from the pipeline's own `calculate_shift` and the scheduler's `set_timesteps`, the
transformer called with ids, guidance and pooled projections as the pipeline calls it), its
exported engines must classify as torch does, `info` must describe it, and Flux variants
conditioned on more than text must be refused in one line.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from diffcls.errors import DiffclsError
from diffcls.runtime.algorithm.schedule import Schedule
from diffcls.runtime.algorithm.scoring import Scorer, make_noise_bank

PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car"]
SIZE = 16  # px: an 8x8 latent, 16 packed tokens


@pytest.fixture(scope="module")
def flux_dev():
    from diffcls.models.tiny import tiny_flux

    return tiny_flux(seed=0)


def pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    parts = model.tokenizer.parts
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config), vae=model.vae,
                        text_encoder=model.text_encoder, tokenizer=parts["tokenizer"], text_encoder_2=model.text_encoder_2,
                        tokenizer_2=parts["tokenizer_2"], transformer=model.transformer)


def test_prompt_embeddings_are_the_pipelines(flux_dev):
    with torch.no_grad():
        emb, pooled, text_ids = pipeline(flux_dev).encode_prompt(PROMPTS, device="cpu", max_sequence_length=flux_dev.t5_length)
        packed = flux_dev.wrap("text_encoder")(flux_dev.tokenizer(PROMPTS).input_ids)
    assert packed.shape == (3, flux_dev.t5_length + 1, 32) and pooled.shape == (3, 16)
    assert torch.allclose(packed[:, :-1], emb, atol=1e-6)
    assert torch.allclose(packed[:, -1, :16], pooled, atol=1e-6) and not packed[:, -1, 16:].any()
    assert text_ids.shape == (flux_dev.t5_length, 3) and not text_ids.any()  # what the wrapper feeds: zeros


def reference_sigmas(config: dict, image_seq_len: int):
    """(σ, timestep) per training index t, as the FluxPipeline would set them for this many image
    tokens: its own calculate_shift, and the scheduler's set_timesteps over all T sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    T = sched.config.num_train_timesteps
    mu = calculate_shift(image_seq_len, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"], config["max_shift"])
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=mu)
    return (lambda t: sched.sigmas[T - 1 - t]), (lambda t: sched.timesteps[T - 1 - t])


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_flux_scoring_matches_a_plain_reimplementation(flux_dev, guidance):
    from diffcls.engines import open_engines
    from diffcls.models.tiny import tiny_flux

    model = flux_dev if guidance else tiny_flux(seed=1, guidance=False)
    engines = open_engines("torch", model=model, device="cpu", image_size=SIZE)
    assert engines.prediction_type == "flow" and engines.latent_shape == (16, 8, 8)
    with torch.no_grad():
        emb, pooled, text_ids = pipeline(model).encode_prompt(PROMPTS, device="cpu", max_sequence_length=model.t5_length)
    torch.manual_seed(0)
    image = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        packed_emb = engines.text_encoder({"input_ids": engines.tokenize(PROMPTS)})["last_hidden_state"]
        x0 = engines.vae_encoder({"image": image})["latent"][0]
        ref_x0 = (model.vae.encode(image).latent_dist.mean[0] - 0.1159) * 0.3611  # Flux's VAE shift and scale
    assert torch.allclose(x0, ref_x0, atol=1e-6)
    schedule = Schedule((3, 6), (2, 1))
    bank = make_noise_bank(schedule, engines.latent_shape, seed=1)
    scorer = Scorer(engines.unet, packed_emb, engines.alphas_cumprod, schedule, bank, 4, prediction_type="flow", sigmas=engines.sigmas)
    (_, got), = scorer.run([(0, x0)])
    sigma_at, timestep_at = reference_sigmas(model.scheduler_config, (SIZE // 2 // 2) ** 2)
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    img_ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=1)

    def tokens(x):  # (C, 8, 8) -> (16, 4C): 2x2 patches, features (channel, dy, dx)
        return F.pixel_unshuffle(x[None], 2).flatten(2).transpose(1, 2)

    seen = []
    for c, t, j, err in got.errors:
        k = seen.index(t) if t in seen else len(seen)
        seen += [] if t in seen else [t]
        eps, sigma = bank[k], sigma_at(t)
        with torch.no_grad():
            pred = model.transformer(
                hidden_states=tokens((1 - sigma) * x0 + sigma * eps), encoder_hidden_states=emb[c][None], pooled_projections=pooled[c][None],
                timestep=timestep_at(t)[None] / 1000, img_ids=img_ids, txt_ids=text_ids,
                guidance=torch.tensor([3.5]) if guidance else None).sample
        assert err == pytest.approx(float(F.mse_loss(pred, tokens(eps - x0))), rel=1e-5, abs=1e-6), (c, t)
    assert len(got.errors) == 3 * 3 + 2 * 3


def test_sigmas_follow_the_image_size(flux_dev):
    """The grid's σ are shifted by the μ of the classified size: more tokens, more noise."""
    from diffcls.models.noising import dynamic_shift_mu, noise_from_scheduler_config

    cfg = flux_dev.scheduler_config
    assert dynamic_shift_mu(cfg, 256) == pytest.approx(0.5) and dynamic_shift_mu(cfg, 4096) == pytest.approx(1.15)
    s16, s32 = flux_dev.noise_tables(16)[1], flux_dev.noise_tables(32)[1]
    assert (s32[:-1] > s16[:-1]).all() and s16[-1] == s32[-1] == 1.0
    sigma_at, _ = reference_sigmas(cfg, 64)
    assert torch.allclose(s32, torch.stack([sigma_at(t) for t in range(1000)]), atol=1e-6)
    with pytest.raises(DiffclsError, match="use_dynamic_shifting"):  # in an SD3 or SD directory: refused, not guessed
        noise_from_scheduler_config(cfg, "scheduler_config.json")


def test_flux_directory_info_export_and_engines(tmp_path, flux_dev, monkeypatch):
    pytest.importorskip("onnxruntime")
    from conftest import random_image

    from diffcls.cli.app import app
    from diffcls.engines import open_engines
    from diffcls.export import ExportConfig, export_model
    from diffcls.export import onnx_export as ox
    from diffcls.models.flux import save_flux_directory
    from diffcls.models.loading import load_model
    from diffcls.runtime.execution.classifier import Classifier

    d = save_flux_directory(flux_dev, tmp_path / "flux")
    loaded = load_model(d)
    assert loaded.kind == "flux" and loaded.fingerprint() == flux_dev.fingerprint() and loaded.t5_length == flux_dev.t5_length
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["info", str(d)])
    assert r.exit_code == 0, r.output
    assert "(flux): prediction type flow, default image size 256" in r.output and "FluxTransformer2DModel" in r.output
    assert "guidance embedding: fed 3.5" in r.output and "mu 0.5 at 256 to 1.15 at 4096 image tokens" in r.output
    monkeypatch.setattr(ox, "LARGE_BYTES", 0)  # weights in <file>.data, the path a 12 B transformer takes
    export_model(ExportConfig(out=tmp_path / "e", model=d, batch_sizes=(4,), image_size=SIZE, device="cpu"))
    assert (tmp_path / "e" / "unet.onnx.data").is_file()
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["kind"] == "flux" and manifest["prediction_type"] == "flow"
    assert manifest["specs"]["unet"]["inputs"][2] == ["encoder_hidden_states", "float", ["B", flux_dev.t5_length + 1, 32]]
    assert all(manifest["components"][c]["max_abs_err"] is not None for c in ("text_encoder", "vae_encoder", "unet"))
    ort = open_engines("onnxruntime", engine_dir=tmp_path / "e", device="cpu")
    torch_engines = open_engines("torch", model=loaded, device="cpu", image_size=SIZE)
    assert torch.equal(ort.sigmas, torch_engines.sigmas)  # the export's σ are those of its image size
    images = [random_image(i) for i in range(3)]
    schedule = Schedule((4, 8), (2, 1), weighting="logit-normal")
    out = {name: Classifier(e, cache=None).classify(images, PROMPTS, schedule, batch_size=4) for name, e in (("torch", torch_engines), ("ort", ort))}
    assert [r.prompt for r in out["torch"]] == [r.prompt for r in out["ort"]]
    for a, b in zip(out["torch"], out["ort"]):
        ea, eb = ({(c, t, j): e for c, t, j, e in r.errors} for r in (a, b))
        assert ea.keys() == eb.keys() and max(abs(ea[k] - eb[k]) for k in ea) < 1e-4

    # a FluxPipeline directory holding a Fill transformer (masked-image channels): refused before any weight loads
    fill = tmp_path / "fill"
    shutil.copytree(d, fill)
    cfg = json.loads((fill / "transformer" / "config.json").read_text())
    (fill / "transformer" / "config.json").write_text(json.dumps({**cfg, "in_channels": 384 // 4}))
    with pytest.raises(DiffclsError) as e:
        load_model(fill)
    assert "in_channels 96 is not 4 x the VAE's 16 latent channels" in str(e.value) and "FluxPipeline" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("index, fragment", [("FluxFillPipeline", "Flux Fill"), ("FluxKontextPipeline", "Flux Kontext"),
                                             ("FluxPriorReduxPipeline", "Redux")])
def test_flux_variants_are_refused_in_one_line(tmp_path, index, fragment):
    from diffcls.cli.app import app
    from diffcls.models.loading import load_model

    d = tmp_path / "m"
    for sub in ("transformer", "text_encoder_2"):
        (d / sub).mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": index}))
    with pytest.raises(DiffclsError) as e:
        load_model(d)
    msg = str(e.value)
    assert fragment in msg and "(FluxPipeline)" in msg and "\n" not in msg
    r = CliRunner().invoke(app, ["info", str(d)])
    assert r.exit_code != 0 and fragment in r.output


def test_no_t5_is_refused_for_flux(tmp_path):
    """--no-t5 is SD3's (T5 optional there); a Flux directory has the same folders, and is refused."""
    from diffcls.models.loading import check_no_t5

    d = tmp_path / "flux"
    for sub in ("transformer", "text_encoder_2"):
        (d / sub).mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(DiffclsError, match="is a Flux directory, not an SD3/3.5 model"):
        check_no_t5(d)
