"""SDXL (`StableDiffusionXLPipeline` directories): a tiny random SDXL built from configs.

Its conditioning must be diffusers' own (`StableDiffusionXLPipeline.encode_prompt` for the text
and pooled embeddings, `_get_add_time_ids` for time_ids at the input size with crop (0, 0)),
its errors those of a plain re-implementation calling the UNet directly, and its exported
engines must classify as torch does.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diffcls.errors import DiffclsError
from diffcls.models.sdxl import save_sdxl_directory
from diffcls.models.tiny import tiny_sdxl
from diffcls.models.tiny import TinyConfig, scheduler_config
from diffcls.runtime.algorithm.schedule import Schedule
from diffcls.runtime.algorithm.scoring import Scorer, make_noise_bank

PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car"]


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl(seed=0)


def reference_conditioning(model, image_size: int):
    """(text embeddings, pooled, time_ids) as diffusers' SDXL pipeline computes them."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    parts = model.tokenizer.parts
    pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
                                     tokenizer=parts["tokenizer"], tokenizer_2=parts["tokenizer_2"], unet=model.unet,
                                     scheduler=EulerDiscreteScheduler())
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    size = (image_size, image_size)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32,
                                      text_encoder_projection_dim=model.text_encoder_2.config.projection_dim)
    return emb, pooled, time_ids


def test_sdxl_scoring_matches_the_pipelines_conditioning(sdxl):
    from diffcls.engines import open_engines

    engines = open_engines("torch", model=sdxl, device="cpu")
    emb, pooled, time_ids = reference_conditioning(sdxl, 16)
    assert time_ids.tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]
    with torch.no_grad():
        packed = engines.text_encoder({"input_ids": engines.tokenize(PROMPTS)})["last_hidden_state"]
    assert packed.shape == (3, 78, 32)
    assert torch.allclose(packed[:, :-1], emb, atol=1e-6) and torch.allclose(packed[:, -1, :16], pooled, atol=1e-6)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        x0 = engines.vae_encoder({"image": image})["latent"][0]
    assert torch.allclose(x0, sdxl.vae.encode(image).latent_dist.mean[0] * 0.13025, atol=1e-6)
    schedule = Schedule((3, 6), (2, 1))
    bank = make_noise_bank(schedule, engines.latent_shape, seed=1)
    (_, got), = Scorer(engines.unet, packed, engines.alphas_cumprod, schedule, bank, 4).run([(0, x0)])
    ac, seen = sdxl.alphas_cumprod, []
    for c, t, j, err in got.errors:
        k = seen.index(t) if t in seen else len(seen)
        seen += [] if t in seen else [t]
        eps = bank[k]
        x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
        with torch.no_grad():
            pred = sdxl.unet(x_t[None], torch.tensor([t]), encoder_hidden_states=emb[c][None],
                             added_cond_kwargs={"text_embeds": pooled[c][None], "time_ids": time_ids}).sample[0]
        assert err == pytest.approx(float(F.mse_loss(pred, eps)), rel=1e-5, abs=1e-6), (c, t)


def test_sdxl_directory_info_export_and_engines(tmp_path, sdxl):
    pytest.importorskip("onnxruntime")
    from conftest import random_image

    from diffcls.engines import open_engines
    from diffcls.export import ExportConfig, export_model
    from diffcls.models.describe import describe_model
    from diffcls.models.loading import load_model
    from diffcls.runtime.execution.classifier import Classifier

    d = save_sdxl_directory(sdxl, tmp_path / "sdxl", {**scheduler_config(TinyConfig()), "_class_name": "EulerDiscreteScheduler"})
    loaded = load_model(d)
    assert loaded.kind == "sdxl" and loaded.fingerprint() == sdxl.fingerprint() and loaded.vae_force_upcast
    info = describe_model(d)
    assert info["model_kind"] == "sdxl" and set(info["components"]) == {"text_encoder", "text_encoder_2", "vae", "unet"}
    export_model(ExportConfig(out=tmp_path / "e", model=d, batch_sizes=(4,), image_size=16, device="cpu"))
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["kind"] == "sdxl" and manifest["specs"]["unet"]["inputs"][2] == ["encoder_hidden_states", "float", ["B", 78, 32]]
    ort = open_engines("onnxruntime", engine_dir=tmp_path / "e", device="cpu")
    images = [random_image(i) for i in range(3)]
    schedule = Schedule((4, 8), (2, 1))
    out = {name: Classifier(e, cache=None).classify(images, PROMPTS, schedule, batch_size=4)
           for name, e in (("torch", open_engines("torch", model=loaded, device="cpu")), ("ort", ort))}
    assert [r.prompt for r in out["torch"]] == [r.prompt for r in out["ort"]]
    for a, b in zip(out["torch"], out["ort"]):
        ea, eb = ({(c, t, j): e for c, t, j, e in r.errors} for r in (a, b))
        assert ea.keys() == eb.keys() and max(abs(ea[k] - eb[k]) for k in ea) < 1e-4


@pytest.mark.parametrize("index, fragment", [("StableDiffusionXLImg2ImgPipeline", "SDXL refiner"), ("FluxFillPipeline", "Flux Fill model")])
def test_refiner_and_flux_are_refused_in_one_line(tmp_path, index, fragment):
    from diffcls.models.loading import load_model

    d = tmp_path / "m"
    (d / "text_encoder_2").mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": index}))
    with pytest.raises(DiffclsError) as e:
        load_model(d)
    assert fragment in str(e.value) and "StableDiffusionXLPipeline" in str(e.value) and "\n" not in str(e.value)


def test_tensorrt_profiles_for_sdxl_base_sizes():
    """SDXL base at 1024 px: the UNet's profiles carry the packed conditioning (77 text rows + the
    pooled row, width 2048) per batch size, and the prompt encoder takes both tokenizers' ids."""
    from diffcls.export.trt_build import plan_profiles
    from diffcls.models.spec import packed_component_specs

    specs = packed_component_specs(ids_length=154, emb_length=78, hidden_size=2048, image_size=1024, latent_shape=(4, 128, 128))
    profiles = plan_profiles(specs["unet"], [2, 8])
    assert [p["encoder_hidden_states"][0] for p in profiles] == [(2, 78, 2048), (8, 78, 2048)]
    assert profiles[1]["sample"] == ((8, 4, 128, 128),) * 3 and profiles[0]["timestep"][2] == (2,)
    assert plan_profiles(specs["text_encoder"], [4])[0]["input_ids"][0] == (4, 154)


# --- single-file SDXL checkpoints (SGM layout), read offline with --config DIR -----------------
@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    """(the diffusers directory, the same weights as one SGM-layout .safetensors file); CLIP-L and
    CLIP-G of different widths, as in SDXL (diffusers tells the two apart by width)."""
    from test_hub import write_sgm_checkpoint

    model = tiny_sdxl(seed=0, widths=(16, 24))
    root = tmp_path_factory.mktemp("sdxl-file")
    d = save_sdxl_directory(model, root / "sdxl", {**scheduler_config(TinyConfig()), "_class_name": "EulerDiscreteScheduler"})
    write_sgm_checkpoint(model, root / "sdxl-base.safetensors")
    return d, root / "sdxl-base.safetensors"


def test_sdxl_single_file_loads_offline_as_its_directory(sdxl_file):
    from diffcls.models.describe import describe_model
    from diffcls.models.loading import load_model

    d, f = sdxl_file
    a, b = load_model(d), load_model(f, config=d)
    assert b.kind == "sdxl" and b.source == str(f)
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert b.fingerprint() == a.fingerprint()
    info = describe_model(f)
    assert info["kind"] == "checkpoint" and info["model_type"].startswith("SDXL (pass --config")
    assert info["components"]["text_encoder_2"]["parameters"] == sum(p.numel() for p in a.text_encoder_2.parameters())


def test_sdxl_single_file_classifies_as_its_directory(tmp_path, sdxl_file, image_folder):
    from conftest import assert_one_line_error, invoke_cli

    d, f = sdxl_file
    base = ["classify", image_folder, "--classes", "cat,dog,car", "--n-samples", "2,4", "--to-keep", "2,1",
            "--batch-size", "4", "--image-size", "16", "--threads", "1", "--no-cache"]
    errors = {}
    for name, model in (("dir", ["--model", d]), ("file", ["--model", f, "--config", d])):
        r = invoke_cli(*base, *model, "--out", tmp_path / f"{name}.csv", "--save-errors", tmp_path / f"{name}.jsonl")
        assert r.exit_code == 0, r.output
        errors[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert errors["file"] == errors["dir"]  # same predictions, same errors, to the last digit
    assert_one_line_error(invoke_cli(*base, "--model", f), "single-file SDXL checkpoint", "--config stabilityai/stable-diffusion-xl-base-1.0")


def test_sdxl_single_file_with_the_wrong_configs_is_refused(sdxl_file, tiny_dir, tmp_path):
    from test_hub import write_ldm_checkpoint

    from diffcls.models.loading import load_model
    from diffcls.models.tiny import tiny_model

    d, f = sdxl_file
    with pytest.raises(DiffclsError, match="is an SDXL checkpoint and --config .* is a Stable Diffusion 1.x/2.x directory"):
        load_model(f, config=tiny_dir)
    sd1 = tmp_path / "sd1.safetensors"
    write_ldm_checkpoint(tiny_model(seed=0), sd1)
    with pytest.raises(DiffclsError, match="is a Stable Diffusion 1.x/2.x checkpoint and --config .* is an SDXL directory"):
        load_model(sd1, config=d)
