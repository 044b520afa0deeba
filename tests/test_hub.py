"""Models users actually have: Hugging Face model ids from the local cache, and single-file
(original LDM-format) checkpoints, both offline."""

from __future__ import annotations

import shutil

import pytest
import torch

from diffcls.errors import DiffclsError
from diffcls.models import load_model
from diffcls.models.loading import SD1_CONFIG_REPOS, check_model_path, resolve_model_path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache (what huggingface_hub reads: $HF_HUB_CACHE at import time)."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


def cache_model(hub, repo_id: str, model_dir) -> None:
    """Lay `model_dir` out as `hf download repo_id` leaves it: a snapshot named by commit, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)


def same_weights(a, b) -> bool:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        if sa.keys() != sb.keys() or any(not torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa):
            return False
    return True


# --- Hugging Face model ids -------------------------------------------------------------------
def test_model_id_loads_from_the_local_cache(hub_cache, tiny, tiny_dir):
    cache_model(hub_cache, "stabilityai/stable-diffusion-2-1-base", tiny_dir)
    path = check_model_path("stabilityai/stable-diffusion-2-1-base")
    assert path == hub_cache / "models--stabilityai--stable-diffusion-2-1-base" / "snapshots" / COMMIT
    model = load_model("stabilityai/stable-diffusion-2-1-base")
    assert model.fingerprint() == tiny.fingerprint()


def test_uncached_model_id_says_how_to_download(hub_cache):
    with pytest.raises(DiffclsError) as e:
        load_model("stabilityai/stable-diffusion-2-1-base")
    msg = str(e.value)
    assert "\n" not in msg and "not in the local cache" in msg
    assert "hf download stabilityai/stable-diffusion-2-1-base" in msg and str(hub_cache) in msg


def test_a_local_directory_wins_over_a_model_id(hub_cache, tiny_dir, tmp_path, monkeypatch):
    local = tmp_path / "org" / "name"
    shutil.copytree(tiny_dir, local)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/name") == local.relative_to(tmp_path)


def test_cli_classify_with_a_cached_model_id(hub_cache, tiny_dir, image_folder):
    from typer.testing import CliRunner

    from diffcls.cli.app import app

    cache_model(hub_cache, "someone/tiny-sd", tiny_dir)
    args = ["classify", str(image_folder), "--model", "someone/tiny-sd", "--classes", "cat,dog",
            "--n-samples", "2", "--to-keep", "1", "--image-size", "16", "--no-cache", "--device", "cpu"]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    missing = CliRunner().invoke(app, args[:3] + ["someone/other"] + args[4:])
    assert missing.exit_code == 2 and "hf download someone/other" in missing.output


# --- single-file checkpoints (original LDM key names) -----------------------------------------
def _swap_prefix(key: str, pairs) -> str:
    for ldm, hf in pairs:
        if key.startswith(hf):
            return ldm + key[len(hf):]
    return key


def unet_to_ldm(unet) -> dict:
    """diffusers UNet2DConditionModel -> `model.diffusion_model.*` keys of the original code."""
    c = unet.config
    n, L = len(c.block_out_channels), c.layers_per_block
    attn_down = [t.startswith("CrossAttn") for t in c.down_block_types]
    attn_up = [t.startswith("CrossAttn") for t in c.up_block_types]
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
        ("middle_block.0.", "mid_block.resnets.0."), ("middle_block.2.", "mid_block.resnets.1."),
        ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),  # SDXL's text_time
    ]
    for i in range(n):
        for j in range(L):
            pairs.append((f"input_blocks.{(L + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if attn_down[i]:
                pairs.append((f"input_blocks.{(L + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(L + 1):
            pairs.append((f"output_blocks.{(L + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if attn_up[i]:
                pairs.append((f"output_blocks.{(L + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            pairs.append((f"input_blocks.{(L + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            pairs.append((f"output_blocks.{(L + 1) * i + L}.{2 if attn_up[i] else 1}.", f"up_blocks.{i}.upsamplers.0."))
    resnet = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
              ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
    out = {}
    for k, v in unet.state_dict().items():
        new = _swap_prefix(k, pairs)
        if "resnets" in k:
            for ldm, hf in resnet:
                new = new.replace(hf, ldm)
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(vae) -> dict:
    """diffusers AutoencoderKL -> `first_stage_model.*` keys (attention projections as 1x1 convs)."""
    n, L = len(vae.config.block_out_channels), vae.config.layers_per_block
    pairs = []
    for p in ("encoder", "decoder"):
        pairs += [(f"{p}.mid.attn_1.", f"{p}.mid_block.attentions.0."), (f"{p}.norm_out.", f"{p}.conv_norm_out.")]
        pairs += [(f"{p}.mid.block_{i + 1}.", f"{p}.mid_block.resnets.{i}.") for i in range(2)]
    for i in range(n):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(L)]
        pairs += [(f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(L + 1)]
        if i < n - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for k, v in vae.state_dict().items():
        new = _swap_prefix(k, pairs).replace("conv_shortcut.", "nin_shortcut.")
        if ".mid.attn_1." in new:
            head, tail = new.split(".mid.attn_1.", 1)
            new = f"{head}.mid.attn_1.{_swap_prefix(tail, attn)}"
            if v.ndim == 2:
                v = v[:, :, None, None]
        out["first_stage_model." + new] = v
    return out


def write_ldm_checkpoint(model, path) -> None:
    """The model as one original-format (SD 1.x layout) .safetensors file."""
    from safetensors.torch import save_file

    sd = {**unet_to_ldm(model.unet), **vae_to_ldm(model.vae)}
    for k, v in model.text_encoder.state_dict().items():
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        sd["cond_stage_model.transformer.text_model." + k] = v
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def _text_model_keys(module) -> dict:
    """A transformers CLIP text model's state dict with `text_model.` keys (flattened or not)."""
    sd = module.state_dict()
    return {(k if k.startswith("text_model.") or k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}


def clip_to_open_clip(module, prefix: str) -> dict:
    """transformers CLIPTextModelWithProjection -> OpenCLIP's keys (SDXL's CLIP-G): q/k/v stacked
    into `in_proj_*`, layers as `resblocks`, the projection as a (width, proj) matrix."""
    sd = _text_model_keys(module)
    out = {prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           prefix + "text_projection": sd["text_projection.weight"].T}
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(module.config.num_hidden_layers):
        a, b = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[f"{b}attn.in_proj_{w}"] = torch.cat([sd[f"{a}self_attn.{q}_proj.{w}"] for q in "qkv"])
            for hf, oc in names.items():
                out[f"{b}{oc}.{w}"] = sd[f"{a}{hf}.{w}"]
    return out


def write_sgm_checkpoint(model, path) -> None:
    """An SDXLModel as one original-format (SGM, as SDXL base ships) .safetensors file."""
    from safetensors.torch import save_file

    sd = {**unet_to_ldm(model.unet), **vae_to_ldm(model.vae)}
    sd.update({"conditioner.embedders.0.transformer." + k: v for k, v in _text_model_keys(model.text_encoder).items()})
    sd.update(clip_to_open_clip(model.text_encoder_2, "conditioner.embedders.1.model."))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-v1.safetensors"
    write_ldm_checkpoint(tiny, path)
    return path


def test_single_file_with_config_dir_loads_offline(tiny, tiny_dir, tiny_ckpt):
    model = load_model(tiny_ckpt, config=tiny_dir)
    assert same_weights(model, tiny)
    assert torch.equal(model.alphas_cumprod, tiny.alphas_cumprod)
    assert model.source == str(tiny_ckpt)


def test_sd1_single_file_finds_its_configs_in_the_local_cache(hub_cache, tiny, tiny_dir, tiny_ckpt):
    with pytest.raises(DiffclsError) as e:  # nothing cached yet: says what to download
        load_model(tiny_ckpt)
    assert "Stable Diffusion 1.x" in str(e.value) and f"hf download {SD1_CONFIG_REPOS[0]}" in str(e.value)
    cache_model(hub_cache, SD1_CONFIG_REPOS[0], tiny_dir)
    assert same_weights(load_model(tiny_ckpt), tiny)


def test_sd2_single_file_needs_config(tmp_path, hub_cache):
    from safetensors.torch import save_file

    # SD 2.x's cross-attention reads 1024-wide text embeddings: base and 768-v look the same
    ckpt = tmp_path / "v2-1_512-ema-pruned.safetensors"
    save_file({"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024)}, str(ckpt))
    with pytest.raises(DiffclsError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "--config stabilityai/stable-diffusion-2-1-base" in msg and "--config stabilityai/stable-diffusion-2-1 " in msg


def test_cli_classify_a_single_file(tiny_dir, tiny_ckpt, image_folder, tmp_path):
    from typer.testing import CliRunner

    from diffcls.cli.app import app

    args = ["classify", str(image_folder), "--model", str(tiny_ckpt), "--config", str(tiny_dir), "--classes", "cat,dog",
            "--n-samples", "2", "--to-keep", "1", "--image-size", "16", "--no-cache", "--device", "cpu"]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, args[:5] + [str(tmp_path / "nowhere")] + args[6:])
    assert bad.exit_code == 2 and "--config" in bad.output
