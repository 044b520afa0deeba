"""Flux single-file checkpoints (BFL's original key layout), read offline with `--config DIR`.

A tiny random Flux is written in the original layout by an inverse of diffusers' conversion (the
inverse itself checked against diffusers' own `convert_flux_transformer_checkpoint_to_diffusers`),
as BFL distributes it (the transformer alone, bare names) and as ComfyUI's all-in-one files do
(under `model.diffusion_model.`, with the VAE and both text encoders). Loaded with the tiny Flux
directory as --config, it must hold the directory's weights, have its fingerprint and classify
with its errors; without --config, or with another family's, it is refused in one line.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from diffcls.errors import DiffclsError

# diffusers FluxTransformer2DModel names -> BFL's (whole prefixes), outside the blocks
TOP_NAMES = {"time_text_embed.timestep_embedder.linear_1.": "time_in.in_layer.", "time_text_embed.timestep_embedder.linear_2.": "time_in.out_layer.",
             "time_text_embed.text_embedder.linear_1.": "vector_in.in_layer.", "time_text_embed.text_embedder.linear_2.": "vector_in.out_layer.",
             "time_text_embed.guidance_embedder.linear_1.": "guidance_in.in_layer.",
             "time_text_embed.guidance_embedder.linear_2.": "guidance_in.out_layer.",
             "context_embedder.": "txt_in.", "x_embedder.": "img_in.", "proj_out.": "final_layer.linear.",
             "norm_out.linear.": "final_layer.adaLN_modulation.1."}
# inside transformer_blocks.N. (double_blocks.N.): the image stream is img_*, the text stream txt_*
DOUBLE_NAMES = {"norm1.linear.": "img_mod.lin.", "norm1_context.linear.": "txt_mod.lin.",
                "attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale", "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
                "attn.to_out.0.": "img_attn.proj.", "attn.to_add_out.": "txt_attn.proj.",
                "ff.net.0.proj.": "img_mlp.0.", "ff.net.2.": "img_mlp.2.", "ff_context.net.0.proj.": "txt_mlp.0.", "ff_context.net.2.": "txt_mlp.2."}
# inside single_transformer_blocks.N. (single_blocks.N.)
SINGLE_NAMES = {"norm.linear.": "modulation.lin.", "attn.norm_q.weight": "norm.query_norm.scale",
                "attn.norm_k.weight": "norm.key_norm.scale", "proj_out.": "linear2."}
# fused in BFL's layout: (its name, the diffusers names stacked into it, in order)
DOUBLE_FUSED = (("img_attn.qkv.", ("attn.to_q.", "attn.to_k.", "attn.to_v.")),
                ("txt_attn.qkv.", ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj.")))
SINGLE_FUSED = (("linear1.", ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp.")),)
SIZE = 16  # px: an 8x8 latent


def _rename(rest: str, names: dict) -> str | None:
    hf = next((p for p in names if rest.startswith(p)), None)
    return None if hf is None else names[hf] + rest[len(hf):]


def to_bfl(sd: dict, prefix: str = "") -> dict:
    """A diffusers FluxTransformer2DModel state dict -> BFL's names, under `prefix`: q, k, v (and a
    single block's MLP input) stacked into one tensor, the final norm's (scale, shift) as (shift, scale)."""
    out = {}
    for k, v in sd.items():
        block, _, rest = k.partition(".")
        if block in ("transformer_blocks", "single_transformer_blocks"):
            i, _, rest = rest.partition(".")
            bfl, names = ("double_blocks", DOUBLE_NAMES) if block == "transformer_blocks" else ("single_blocks", SINGLE_NAMES)
            name = _rename(rest, names)
            if name is not None:
                out[f"{bfl}.{i}.{name}"] = v
            continue
        name = _rename(k, TOP_NAMES)
        assert name is not None, k
        scale, shift = v.chunk(2, dim=0)
        out[name] = torch.cat([shift, scale]) if k.startswith("norm_out.") else v
    for block, bfl, fused in (("transformer_blocks", "double_blocks", DOUBLE_FUSED), ("single_transformer_blocks", "single_blocks", SINGLE_FUSED)):
        for i in sorted({k.split(".")[1] for k in sd if k.startswith(block + ".")}):
            for name, parts in fused:
                for w in ("weight", "bias"):
                    out[f"{bfl}.{i}.{name}{w}"] = torch.cat([sd[f"{block}.{i}.{p}{w}"] for p in parts])
    return {prefix + k: v for k, v in out.items()}


def test_the_bfl_layout_round_trips_through_diffusers_conversion():
    """The test writer's inverse, checked against diffusers' own forward conversion: exact. That
    conversion splits a single block's fused rows at FLUX.1's width (3072 q, k, v, 12288 MLP
    rows), so the single blocks' q, k, v and MLP inputs get those many rows here (few columns)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
                                         axes_dims_rope=(2, 2, 4))
    want = transformer.state_dict()
    for k, v in want.items():  # FLUX.1's rows, random values: a misplaced row cannot go unseen
        if k.startswith("single_transformer_blocks.") and (".attn.to_" in k or ".proj_mlp." in k):
            want[k] = torch.randn((12288 if "proj_mlp" in k else 3072, *v.shape[1:]))
        else:
            want[k] = torch.randn_like(v)
    bfl = to_bfl(want, "model.diffusion_model.")
    assert "model.diffusion_model.double_blocks.1.img_attn.norm.key_norm.scale" in bfl
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)


def write_flux_checkpoint(model, path, *, all_in_one: bool) -> None:
    """A FluxModel as one original-layout .safetensors file: the transformer alone with bare names
    (BFL's flux1-dev.safetensors), or (`all_in_one`, ComfyUI's layout) under `model.diffusion_model.`
    with the VAE (`vae.`, the LDM layout), CLIP-L and T5 (`text_encoders.{clip_l,t5xxl}.transformer.`)."""
    from safetensors.torch import save_file
    from test_hub import _text_model_keys, vae_to_ldm

    sd = to_bfl(model.transformer.state_dict(), "model.diffusion_model." if all_in_one else "")
    if all_in_one:
        sd.update({"vae." + k.removeprefix("first_stage_model."): v for k, v in vae_to_ldm(model.vae).items()})
        sd.update({"text_encoders.clip_l.transformer." + k: v for k, v in _text_model_keys(model.text_encoder).items()})
        # `shared` and the encoder's input embedding are one tensor: written twice, as two (safetensors shares none)
        sd.update({"text_encoders.t5xxl.transformer." + k: v.clone() for k, v in model.text_encoder_2.state_dict().items()})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


@pytest.fixture(scope="module")
def flux_file(tmp_path_factory):
    """(the tiny Flux directory, its transformer alone as BFL's file, the whole model as one file)."""
    from diffcls.models.flux import save_flux_directory
    from diffcls.models.tiny import tiny_flux

    model = tiny_flux(seed=0)
    root = tmp_path_factory.mktemp("flux-file")
    d = save_flux_directory(model, root / "flux")
    write_flux_checkpoint(model, root / "flux1-dev.safetensors", all_in_one=False)
    write_flux_checkpoint(model, root / "flux1-dev-all-in-one.safetensors", all_in_one=True)
    return d, root / "flux1-dev.safetensors", root / "flux1-dev-all-in-one.safetensors"


def test_flux_single_file_loads_offline_as_its_directory(flux_file):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from typer.testing import CliRunner

    from diffcls.cli.app import app
    from diffcls.models.describe import describe_model
    from diffcls.models.loading import checkpoint_shapes, load_model

    d, bare, whole = flux_file
    assert infer_diffusers_model_type(checkpoint_shapes(bare)) == "flux-dev"
    a = load_model(d)
    for file in (bare, whole):  # the bare file's VAE and text encoders: the directory's
        b = load_model(file, config=d)
        assert b.kind == "flux" and b.source == str(file) and b.t5_length == a.t5_length and b.guidance == 3.5
        for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
            sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (file.name, name)
        assert b.fingerprint() == a.fingerprint()
    info = describe_model(whole)
    assert info["kind"] == "checkpoint" and info["model_type"].startswith("FLUX.1 [dev] (pass --config")
    assert {k: v["parameters"] for k, v in info["components"].items()} == {  # what the file holds of each (T5's tied embedding twice)
        name: sum(v.numel() for v in getattr(a, name).state_dict().values()) for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    assert set(describe_model(bare)["components"]) == {"transformer"}
    # with --config: the model it loads as, the transformer from the file and the rest from the directory
    both = describe_model(bare, d)
    assert both["kind"] == "checkpoint" and both["model_kind"] == "flux" and both["prediction_type"] == "flow" and both["guidance"] == 3.5
    assert both["components"]["transformer"]["files"] == [bare.name] and both["components"]["vae"]["files"][0].startswith(str(d))
    r = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["info", str(bare), "--config", str(d)])
    assert r.exit_code == 0, r.output
    assert f"with the configs of {d} (flux): prediction type flow" in r.output and "guidance embedding: fed 3.5" in r.output
    assert f"export engines with: diffcls export --model {bare} --config {d} --out ENGINES" in r.output


def test_flux_single_file_classifies_as_its_directory(tmp_path, flux_file, image_folder):
    from conftest import assert_one_line_error, invoke_cli, random_image

    from diffcls.runtime.algorithm.schedule import Schedule
    from diffcls.runtime.execution.classifier import Classifier

    d, bare, whole = flux_file
    base = ["classify", image_folder, "--classes", "cat,dog,car", "--n-samples", "2,4", "--to-keep", "2,1",
            "--batch-size", "4", "--image-size", str(SIZE), "--threads", "1", "--no-cache"]
    errors = {}
    for name, model in (("dir", ["--model", d]), ("file", ["--model", bare, "--config", d])):
        r = invoke_cli(*base, *model, "--out", tmp_path / f"{name}.csv", "--save-errors", tmp_path / f"{name}.jsonl")
        assert r.exit_code == 0, r.output
        errors[name] = (tmp_path / f"{name}.jsonl").read_text()
    assert errors["file"] == errors["dir"]
    # through the library: the all-in-one file scores as the directory
    images, prompts, schedule = [random_image(i, (SIZE, SIZE)) for i in range(2)], ["a cat", "a dog"], Schedule((2, 4), (2, 1))
    out = [Classifier.from_pretrained(m, config=c, image_size=SIZE, device="cpu", use_cache=False, threads=1).classify(
        images, prompts, schedule, batch_size=4) for m, c in ((d, None), (whole, d))]
    assert [r.errors for r in out[0]] == [r.errors for r in out[1]] and out[0][0].errors
    assert_one_line_error(invoke_cli(*base, "--model", bare), "single-file FLUX.1 [dev] checkpoint",
                          "--config black-forest-labs/FLUX.1-dev", "--exclude 'transformer/*.safetensors'")


def test_flux_single_file_with_the_wrong_configs_is_refused(flux_file, tiny_dir, tmp_path, image_folder):
    from conftest import assert_one_line_error, invoke_cli
    from test_hub import write_ldm_checkpoint

    from diffcls.models.flux import save_flux_directory
    from diffcls.models.loading import load_model
    from diffcls.models.sd3 import save_sd3_directory
    from diffcls.models.sdxl import save_sdxl_directory
    from diffcls.models.tiny import TinyConfig, flow_scheduler_config, scheduler_config, tiny_flux, tiny_model, tiny_sd3, tiny_sdxl

    d, bare, _ = flux_file
    sd3 = save_sd3_directory(tiny_sd3(seed=0), tmp_path / "sd3", flow_scheduler_config(1000, 3.0))
    sdxl = save_sdxl_directory(tiny_sdxl(seed=0), tmp_path / "sdxl", {**scheduler_config(TinyConfig()), "_class_name": "EulerDiscreteScheduler"})
    for other, what in ((sd3, "an SD3 directory"), (sdxl, "an SDXL directory"), (tiny_dir, "a Stable Diffusion 1.x/2.x directory")):
        with pytest.raises(DiffclsError, match=f"is a Flux checkpoint and --config .* is {what}; pass the configs") as e:
            load_model(bare, config=other)
        assert "\n" not in str(e.value)
    assert_one_line_error(invoke_cli("classify", image_folder, "--classes", "a,b", "--model", bare, "--config", sd3),
                          "is a Flux checkpoint and --config", "is an SD3 directory; pass the configs")
    sd1 = tmp_path / "sd1.safetensors"
    write_ldm_checkpoint(tiny_model(seed=0), sd1)
    with pytest.raises(DiffclsError, match="is a Stable Diffusion 1.x/2.x checkpoint and --config .* is a Flux directory"):
        load_model(sd1, config=d)
    schnell = save_flux_directory(tiny_flux(seed=0, guidance=False), tmp_path / "schnell")  # no guidance embedding: another transformer
    with pytest.raises(DiffclsError, match="the transformer in .* does not match .*config.json .*guidance.*; pass the --config of the Flux model"):
        load_model(bare, config=schnell)
    bare_dir = tmp_path / "configs-only"  # a --config without the VAE's weights, for a file without its VAE
    shutil.copytree(d, bare_dir)
    for f in (bare_dir / "vae").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(DiffclsError, match="holds no vae and the --config directory's .* has no weights; .*hf download black-forest-labs/FLUX.1-dev"):
        load_model(bare, config=bare_dir)


def test_flux_single_file_exports_with_its_configs_scheduler(tmp_path, flux_file, image_folder):
    """Engines exported from the file are the directory's model (its fingerprint) and carry the
    --config's scheduler: the sigmas' dynamic shift and the flow models' default weighting.
    classify checks them against the file loaded with its --config, and every export command it
    suggests repeats that --config (a single file needs it: SDXL, SD3, Flux, SD 2.x)."""
    pytest.importorskip("onnxruntime")
    from conftest import assert_one_line_error, invoke_cli
    from diffcls.export import ExportConfig, export_model
    from diffcls.models.loading import load_model, model_defaults

    d, bare, _ = flux_file
    assert model_defaults(bare, d)["weighting"] == model_defaults(d)["weighting"] == "logit-normal"
    export_model(ExportConfig(out=tmp_path / "e", model=bare, config=d, batch_sizes=(4,), image_size=SIZE, device="cpu"))
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["kind"] == "flux" and manifest["fingerprint"] == load_model(d).fingerprint() and manifest["source"] == str(bare)
    assert (tmp_path / "e" / "scheduler" / "scheduler_config.json").read_text() == (d / "scheduler" / "scheduler_config.json").read_text()
    assert model_defaults(tmp_path / "e")["weighting"] == "logit-normal"
    base = ["classify", image_folder, "--classes", "cat,dog", "--n-samples", "2", "--to-keep", "1", "--batch-size", "4",
            "--threads", "1", "--no-cache", "--model", bare, "--config", d]
    r = invoke_cli(*base, "--engines", tmp_path / "e", "--out", tmp_path / "ort.csv")
    assert r.exit_code == 0, r.output  # the file, loaded with its --config, is the model the engines were built from
    export = f"diffcls export --model {bare} --config {d} --out"
    assert_one_line_error(invoke_cli(*base, "--engines", tmp_path / "none", "--out", tmp_path / "a.csv"), "does not exist", export)
    assert_one_line_error(invoke_cli(*base, "--engines", tmp_path / "e", "--image-size", "32", "--out", tmp_path / "b.csv"),
                          "built for image size 16, not 32", export)


@pytest.mark.parametrize("channels, kind", [(384, "flux-fill"), (128, "flux-depth")])
def test_flux_fill_and_depth_files_are_refused_in_one_line(tmp_path, flux_file, channels, kind):
    """Fill and Depth transformers take image latents besides the noisy ones (diffusers tells them
    apart by img_in's width): refused with or without --config, before any weight is converted."""
    from safetensors.torch import save_file

    from diffcls.models.loading import load_model

    d, _, _ = flux_file
    f = tmp_path / f"{kind}.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(8), "guidance_in.in_layer.bias": torch.zeros(16),
               "img_in.weight": torch.zeros(16, channels)}, str(f))
    with pytest.raises(DiffclsError, match=f"is a single-file {kind} checkpoint .*supported: Flux text-to-image") as e:
        load_model(f, config=d)
    assert "\n" not in str(e.value)
    with pytest.raises(DiffclsError, match=f"diffusers reads it as '{kind}'"):
        load_model(f)
