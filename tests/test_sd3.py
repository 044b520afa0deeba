"""Stable Diffusion 3 (`StableDiffusion3Pipeline` directories): a tiny random SD3 built from configs.

Its prompt embeddings must be diffusers' own (`StableDiffusion3Pipeline.encode_prompt`, with and
without T5), its errors those of a plain re-implementation of rectified-flow noising and loss
that calls the transformer directly, and its exported engines must classify as torch does.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diffcls.errors import DiffclsError
from diffcls.models.sd3 import save_sd3_directory
from diffcls.models.tiny import tiny_sd3
from diffcls.models.tiny import flow_scheduler_config
from diffcls.runtime.algorithm.schedule import Schedule
from diffcls.runtime.algorithm.scoring import Scorer, make_noise_bank

PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car"]
T5_LENGTH = 24  # tiny: SD3 itself uses 256


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3(seed=0, t5_length=T5_LENGTH)


def pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    parts = model.tokenizer.parts
    return StableDiffusion3Pipeline(
        transformer=model.transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=model.vae,
        text_encoder=model.text_encoder, tokenizer=parts["tokenizer"], text_encoder_2=model.text_encoder_2,
        tokenizer_2=parts["tokenizer_2"], text_encoder_3=model.text_encoder_3, tokenizer_3=parts.get("tokenizer_3"),
    )


def diffusers_embeddings(model):
    """(prompt_embeds, pooled) as diffusers' SD3 pipeline computes them."""
    with torch.no_grad():
        emb, _, pooled, _ = pipeline(model).encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=model.t5_length)
    return emb, pooled


@pytest.mark.parametrize("with_t5", [True, False])
def test_prompt_embeddings_are_the_pipelines(with_t5):
    model = tiny_sd3(seed=0, with_t5=with_t5, t5_length=T5_LENGTH)
    emb, pooled = diffusers_embeddings(model)
    with torch.no_grad():
        packed = model.wrap("text_encoder")(model.tokenizer(PROMPTS).input_ids)
    assert packed.shape == (3, 77 + T5_LENGTH + 1, 32)
    assert torch.allclose(packed[:, :-1], emb, atol=1e-6)
    assert torch.allclose(packed[:, -1, : pooled.shape[1]], pooled, atol=1e-6)
    if not with_t5:  # diffusers' zeros in T5's place
        assert not packed[:, 77:-1].any()


def test_sd3_scoring_matches_a_plain_reimplementation(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffcls.engines import open_engines

    engines = open_engines("torch", model=sd3, device="cpu")
    assert engines.prediction_type == "flow"
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    emb, pooled = diffusers_embeddings(sd3)
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        packed = engines.text_encoder({"input_ids": engines.tokenize(PROMPTS)})["last_hidden_state"]
        x0 = engines.vae_encoder({"image": image})["latent"][0]
        ref_x0 = (sd3.vae.encode(image).latent_dist.mean[0] - 0.0609) * 1.5305  # SD3's VAE shift and scale
    assert torch.allclose(x0, ref_x0, atol=1e-6)
    schedule = Schedule((3, 6), (2, 1))
    bank = make_noise_bank(schedule, engines.latent_shape, seed=1)
    scorer = Scorer(engines.unet, packed, engines.alphas_cumprod, schedule, bank, 4, prediction_type="flow", sigmas=engines.sigmas)
    (_, got), = scorer.run([(0, x0)])
    T, seen = 1000, []
    for c, t, j, err in got.errors:
        k = seen.index(t) if t in seen else len(seen)
        seen += [] if t in seen else [t]
        eps = bank[k]
        sigma, timestep = sched.sigmas[T - 1 - t], sched.timesteps[T - 1 - t]
        with torch.no_grad():
            pred = sd3.transformer(hidden_states=((1 - sigma) * x0 + sigma * eps)[None], encoder_hidden_states=emb[c][None],
                                   pooled_projections=pooled[c][None], timestep=timestep[None]).sample[0]
        assert err == pytest.approx(float(F.mse_loss(pred, eps - x0)), rel=1e-5, abs=1e-6), (c, t)
    assert len(got.errors) == 3 * 3 + 2 * 3


def test_sd3_directory_info_export_and_engines(tmp_path, sd3):
    pytest.importorskip("onnxruntime")
    from conftest import random_image

    from diffcls.engines import open_engines
    from diffcls.export import ExportConfig, export_model
    from diffcls.models.describe import describe_model
    from diffcls.models.loading import load_model
    from diffcls.runtime.execution.classifier import Classifier

    model = tiny_sd3(seed=0)  # T5's length as SD3's, 256: what a loaded directory uses
    d = save_sd3_directory(model, tmp_path / "sd3", flow_scheduler_config(1000, 3.0))
    loaded = load_model(d)
    assert loaded.kind == "sd3" and loaded.fingerprint() == model.fingerprint()
    info = describe_model(d)
    assert info["model_kind"] == "sd3" and info["prediction_type"] == "flow" and info["default_image_size"] == 16
    assert set(info["components"]) == {"text_encoder", "text_encoder_2", "text_encoder_3", "vae", "transformer"}
    res = export_model(ExportConfig(out=tmp_path / "e", model=d, batch_sizes=(4,), image_size=16, device="cpu"))
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["kind"] == "sd3" and manifest["prediction_type"] == "flow"
    assert all(manifest["components"][c]["max_abs_err"] is not None for c in ("text_encoder", "vae_encoder", "unet")), res
    ort = open_engines("onnxruntime", engine_dir=tmp_path / "e", device="cpu")
    images = [random_image(i) for i in range(3)]
    schedule = Schedule((4, 8), (2, 1), weighting="logit-normal")
    out = {name: Classifier(e, cache=None).classify(images, PROMPTS, schedule, batch_size=4)
           for name, e in (("torch", open_engines("torch", model=loaded, device="cpu")), ("ort", ort))}
    assert [r.prompt for r in out["torch"]] == [r.prompt for r in out["ort"]]
    for a, b in zip(out["torch"], out["ort"]):
        ea, eb = ({(c, t, j): e for c, t, j, e in r.errors} for r in (a, b))
        assert ea.keys() == eb.keys() and max(abs(ea[k] - eb[k]) for k in ea) < 1e-4


def test_unsupported_pipelines_are_refused_in_one_line(tmp_path):
    from diffcls.models.loading import load_model

    d = tmp_path / "kandinsky"
    (d / "unet").mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(DiffclsError) as e:
        load_model(d)
    msg = str(e.value)
    assert "KandinskyV22Pipeline" in msg and "StableDiffusion3Pipeline" in msg and "StableDiffusionPipeline" in msg and "\n" not in msg


# --- --no-t5: SD3 without its T5 encoder, as diffusers with text_encoder_3=None ----------------
@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """The tiny SD3 with T5 saved as a pipeline directory (T5's length: SD3's 256)."""
    return save_sd3_directory(tiny_sd3(seed=0), tmp_path_factory.mktemp("sd3") / "sd3", flow_scheduler_config(1000, 3.0))


def test_no_t5_embeddings_are_the_pipelines_without_t5(sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from diffcls.models.loading import load_model

    full, skipped = load_model(sd3_dir), load_model(sd3_dir, no_t5=True)
    assert full.text_encoder_3 is not None and skipped.text_encoder_3 is None
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_dir), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    with torch.no_grad():
        emb, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
        packed = skipped.wrap("text_encoder")(skipped.tokenizer(PROMPTS).input_ids)
        with_t5 = full.wrap("text_encoder")(full.tokenizer(PROMPTS).input_ids)
    assert emb.shape == packed[:, :-1].shape == (3, 77 + 256, 32)
    assert torch.allclose(packed[:, :-1], emb, atol=1e-6)
    assert torch.allclose(packed[:, -1, : pooled.shape[1]], pooled, atol=1e-6)
    assert not torch.allclose(with_t5[:, 77:-1], packed[:, 77:-1])  # T5 did contribute with it
    # another model: another fingerprint, hence other cache keys (the remembered one is the full model's)
    assert skipped.fingerprint() != full.fingerprint()
    assert load_model(sd3_dir).fingerprint() == full.fingerprint()
    assert load_model(sd3_dir, no_t5=True).fingerprint() == skipped.fingerprint()


def test_no_t5_classify_scores_otherwise_and_never_resumes_a_t5_run(tmp_path, sd3_dir, image_folder):
    from conftest import assert_one_line_error, csv_rows, invoke_cli

    base = ["classify", image_folder, "--model", sd3_dir, "--classes", "cat,dog,car", "--n-samples", "2,4", "--to-keep", "2,1",
            "--batch-size", "4", "--image-size", "16", "--threads", "1", "--cache-dir", tmp_path / "cache"]
    outs = {}
    for name, extra in (("t5", []), ("no_t5", ["--no-t5"])):
        out = tmp_path / f"{name}.csv"
        r = invoke_cli(*base, *extra, "--out", out, "--save-errors", tmp_path / f"{name}.errors.jsonl")
        assert r.exit_code == 0, r.output
        outs[name] = out
    a, b = csv_rows(outs["t5"]), csv_rows(outs["no_t5"])
    assert len(a) == len(b) == 6
    errors = {name: (tmp_path / f"{name}.errors.jsonl").read_text() for name in outs}
    assert errors["t5"] != errors["no_t5"]  # the cached with-T5 embeddings were not reused
    for name, extra in (("t5", ["--no-t5"]), ("no_t5", [])):  # the other setting on each file: refused
        r = invoke_cli(*base, *extra, "--out", outs[name])
        assert_one_line_error(r, f"{name}.csv", "written with other settings (model:")
    assert csv_rows(outs["t5"]) == a and csv_rows(outs["no_t5"]) == b


def test_no_t5_on_other_models_is_one_line(tmp_path, image_folder):
    from conftest import assert_one_line_error, invoke_cli

    from diffcls.models.loading import load_model

    assert_one_line_error(invoke_cli("classify", image_folder, "--model", "demo", "--no-t5"), "--no-t5", "not an SD3/3.5 model")
    with pytest.raises(DiffclsError, match="--no-t5 .* DiT directory, not an SD3"):
        load_model("demo-dit", no_t5=True)
    assert_one_line_error(invoke_cli("export", "--out", tmp_path / "e", "--model", "demo-shapes", "--no-t5"), "not an SD3/3.5 model")


# --- single-file SD3 checkpoints (the original MMDiT layout), read offline with --config DIR -----
# the original code's names for a diffusers SD3Transformer2DModel's (whole key prefixes or suffixes)
MMDIT_NAMES = {"pos_embed.proj.": "x_embedder.proj.", "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
               "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.", "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
               "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.", "context_embedder.": "context_embedder.",
               "proj_out.": "final_layer.linear.", "norm_out.linear.": "final_layer.adaLN_modulation.1."}
# inside transformer_blocks.N.: the image stream is x_block, the text stream context_block
BLOCK_NAMES = {"attn.to_out.0.": "x_block.attn.proj.", "attn.to_add_out.": "context_block.attn.proj.",
               "attn.norm_q.": "x_block.attn.ln_q.", "attn.norm_k.": "x_block.attn.ln_k.",
               "attn.norm_added_q.": "context_block.attn.ln_q.", "attn.norm_added_k.": "context_block.attn.ln_k.",
               "attn2.to_out.0.": "x_block.attn2.proj.", "attn2.norm_q.": "x_block.attn2.ln_q.", "attn2.norm_k.": "x_block.attn2.ln_k.",
               "norm1.linear.": "x_block.adaLN_modulation.1.", "norm1_context.linear.": "context_block.adaLN_modulation.1.",
               "ff.net.0.proj.": "x_block.mlp.fc1.", "ff.net.2.": "x_block.mlp.fc2.",
               "ff_context.net.0.proj.": "context_block.mlp.fc1.", "ff_context.net.2.": "context_block.mlp.fc2."}
# q, k, v projections, stacked into one `qkv` in the original
QKV = {"attn.to_": "x_block.attn.qkv.", "attn.add_": "context_block.attn.qkv.", "attn2.to_": "x_block.attn2.qkv."}


def _shift_scale(w):
    """diffusers' AdaLayerNormContinuous computes (scale, shift), the original (shift, scale)."""
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def transformer_to_mmdit(transformer) -> dict:
    """diffusers SD3Transformer2DModel -> the original MMDiT's keys, under `model.diffusion_model.`."""
    sd, last = transformer.state_dict(), transformer.config.num_layers - 1
    out = {"pos_embed": sd["pos_embed.pos_embed"]}
    for k, v in sd.items():
        hf = next((p for p in MMDIT_NAMES if k.startswith(p)), None)
        if hf is not None:
            out[MMDIT_NAMES[hf] + k[len(hf):]] = _shift_scale(v) if hf == "norm_out.linear." else v
            continue
        if not k.startswith("transformer_blocks."):
            assert k == "pos_embed.pos_embed", k
            continue
        _, i, rest = k.split(".", 2)
        hf = next((p for p in BLOCK_NAMES if rest.startswith(p)), None)
        if hf is not None:  # the last block's text stream ends in a final norm: (scale, shift) as norm_out
            swap = hf == "norm1_context.linear." and int(i) == last
            out[f"joint_blocks.{i}.{BLOCK_NAMES[hf]}{rest[len(hf):]}"] = _shift_scale(v) if swap else v
    for i in range(last + 1):
        for hf, orig in QKV.items():
            suffix = "_proj" if hf == "attn.add_" else ""
            for w in ("weight", "bias"):
                parts = [sd.get(f"transformer_blocks.{i}.{hf}{q}{suffix}.{w}") for q in "qkv"]
                if parts[0] is not None:
                    out[f"joint_blocks.{i}.{orig}{w}"] = torch.cat(parts, dim=0)
    return {"model.diffusion_model." + k: v for k, v in out.items()}


def write_sd3_checkpoint(model, path, *, encoders: bool = True) -> None:
    """An SD3Model as one original-format .safetensors file, laid out as SD3's `sd3_medium_incl_clips_t5xxlfp16`:
    the MMDiT, the VAE (`first_stage_model.`, the LDM layout) and, with `encoders`, CLIP-L, CLIP-G and
    T5 (when the model has it) under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` in transformers' layout."""
    from safetensors.torch import save_file
    from test_hub import _text_model_keys, vae_to_ldm

    sd = {**transformer_to_mmdit(model.transformer), **vae_to_ldm(model.vae)}
    if encoders:
        sd.update({"text_encoders.clip_l.transformer." + k: v for k, v in _text_model_keys(model.text_encoder).items()})
        sd.update({"text_encoders.clip_g.transformer." + k: v for k, v in _text_model_keys(model.text_encoder_2).items()})
        if model.text_encoder_3 is not None:
            # `shared` and the encoder's input embedding are one tensor: written twice, as two (safetensors shares none)
            sd.update({"text_encoders.t5xxl.transformer." + k: v.clone() for k, v in model.text_encoder_3.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def test_the_mmdit_layout_round_trips_through_diffusers_conversion():
    """The test writer's inverse, checked against diffusers' own forward conversion: exact."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    transformer = tiny_sd3(seed=0, widths=(8, 24)).transformer
    mmdit = transformer_to_mmdit(transformer)
    assert "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.bias" in mmdit
    back, want = convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit)), transformer.state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory):
    """(the diffusers directory, the same weights as one original-layout .safetensors file, the
    file without its text encoders). CLIP-L and CLIP-G of different widths, as in SD3 (diffusers
    tells the two apart by width), and CLIP-L's projection the identity: an SD3 file carries none
    that diffusers reads (it sets CLIP-L's to the identity)."""
    model = tiny_sd3(seed=0, widths=(8, 24))
    with torch.no_grad():
        model.text_encoder.text_projection.weight.copy_(torch.eye(8))
    root = tmp_path_factory.mktemp("sd3-file")
    d = save_sd3_directory(model, root / "sd3", flow_scheduler_config(1000, 3.0))
    write_sd3_checkpoint(model, root / "sd3_medium_incl_clips_t5xxl.safetensors")
    write_sd3_checkpoint(model, root / "sd3_medium.safetensors", encoders=False)
    return d, root / "sd3_medium_incl_clips_t5xxl.safetensors", root / "sd3_medium.safetensors"


def test_sd3_single_file_loads_offline_as_its_directory(sd3_file):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from diffcls.models.describe import describe_model
    from diffcls.models.loading import checkpoint_shapes, load_model

    d, f, bare = sd3_file
    assert infer_diffusers_model_type(checkpoint_shapes(f)) == "v1"  # tiny: diffusers' own guess is wrong; --config decides
    a = load_model(d)
    for file in (f, bare):  # the bare file's encoders: the directory's
        b = load_model(file, config=d)
        assert b.kind == "sd3" and b.source == str(file) and b.t5_length == 256
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"):
            sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (file.name, name)
        assert b.fingerprint() == a.fingerprint()
    skipped = load_model(f, config=d, no_t5=True)
    assert skipped.text_encoder_3 is None and skipped.fingerprint() == load_model(d, no_t5=True).fingerprint() != a.fingerprint()
    info = describe_model(f)
    assert info["kind"] == "checkpoint" and info["model_type"].startswith("SD3/3.5 (pass --config")
    assert {k: v["parameters"] for k, v in info["components"].items()} == {  # what the file holds of each (pos_embed, T5's tied embedding twice)
        name: sum(v.numel() for v in getattr(a, name).state_dict().values())
        for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    assert set(describe_model(bare)["components"]) == {"transformer", "vae"}


def test_sd3_single_file_classifies_as_its_directory(tmp_path, sd3_file, image_folder):
    from conftest import assert_one_line_error, invoke_cli

    d, f, _ = sd3_file
    base = ["classify", image_folder, "--classes", "cat,dog,car", "--n-samples", "2,4", "--to-keep", "2,1",
            "--batch-size", "4", "--image-size", "16", "--threads", "1", "--no-cache"]
    errors = {}
    for name, model in (("dir", ["--model", d]), ("file", ["--model", f, "--config", d]),
                        ("dir_no_t5", ["--model", d, "--no-t5"]), ("file_no_t5", ["--model", f, "--config", d, "--no-t5"])):
        r = invoke_cli(*base, *model, "--out", tmp_path / f"{name}.csv", "--save-errors", tmp_path / f"{name}.jsonl")
        assert r.exit_code == 0, r.output
        errors[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert errors["file"] == errors["dir"] and errors["file_no_t5"] == errors["dir_no_t5"] != errors["dir"]
    assert_one_line_error(invoke_cli(*base, "--model", f), "single-file SD3/3.5 checkpoint",
                          "--config stabilityai/stable-diffusion-3-medium-diffusers")


def test_sd3_single_file_with_the_wrong_configs_is_refused(sd3_file, tiny_dir, tmp_path):
    from test_hub import write_ldm_checkpoint

    from diffcls.models.loading import load_model
    from diffcls.models.tiny import tiny_model

    d, f, _ = sd3_file
    with pytest.raises(DiffclsError, match="is an SD3/3.5 checkpoint and --config .* is a Stable Diffusion 1.x/2.x directory"):
        load_model(f, config=tiny_dir)
    sd1 = tmp_path / "sd1.safetensors"
    write_ldm_checkpoint(tiny_model(seed=0), sd1)
    with pytest.raises(DiffclsError, match="is a Stable Diffusion 1.x/2.x checkpoint and --config .* is an SD3 directory"):
        load_model(sd1, config=d)
    with pytest.raises(DiffclsError, match="--no-t5 .* a checkpoint file, not an SD3"):
        load_model(sd1, config=tiny_dir, no_t5=True)


def test_sd3_single_file_exports_with_its_configs_scheduler(tmp_path, sd3_file):
    """Engines exported from the file score as the file does: its --config's scheduler travels
    with them, so they default to the flow models' logit-normal weighting too."""
    from diffcls.export import ExportConfig, export_model
    from diffcls.models.loading import load_model, model_defaults

    d, f, _ = sd3_file
    assert model_defaults(f, d)["weighting"] == model_defaults(d)["weighting"] == "logit-normal"
    assert "weighting" not in model_defaults(f)
    export_model(ExportConfig(out=tmp_path / "e", model=f, config=d, batch_sizes=(4,), image_size=16, device="cpu"))
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["kind"] == "sd3" and manifest["fingerprint"] == load_model(d).fingerprint()
    assert model_defaults(tmp_path / "e")["weighting"] == "logit-normal"
