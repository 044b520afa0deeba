"""Model loading: diffusers directories, fingerprints, component specs, broken inputs."""

import shutil

import pytest
import torch

from diffcls.errors import DiffclsError
from diffcls.models import load_model
from diffcls.models.spec import model_component_specs
from diffcls.models.wrappers import wrap


def test_directory_round_trip_keeps_weights_and_fingerprint(tiny, tiny_dir):
    loaded = load_model(tiny_dir)
    assert loaded.fingerprint() == tiny.fingerprint()
    assert torch.equal(loaded.alphas_cumprod, tiny.alphas_cumprod)
    ids = loaded.tokenizer(["a photo of a cat."], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    with torch.no_grad():
        assert torch.equal(loaded.text_encoder(ids).last_hidden_state, tiny.text_encoder(ids).last_hidden_state)


def test_fingerprint_changes_with_weights(tiny):
    from diffcls.models import tiny_model

    assert tiny_model(0).fingerprint() == tiny.fingerprint()
    assert tiny_model(1).fingerprint() != tiny.fingerprint()


def test_alphas_cumprod_is_sd_scaled_linear(tiny):
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    assert torch.allclose(tiny.alphas_cumprod, torch.cumprod(1 - betas, 0), atol=1e-6)


def test_wrappers_follow_the_specs(tiny):
    specs = model_component_specs(tiny, 16)
    feeds = {
        "text_encoder": {"input_ids": torch.zeros(2, 77, dtype=torch.int64)},
        "vae_encoder": {"image": torch.rand(2, 3, 16, 16) * 2 - 1},
        "unet": {"sample": torch.randn(2, 4, 8, 8), "timestep": torch.tensor([1.0, 999.0]), "encoder_hidden_states": torch.randn(2, 77, 32)},
    }
    for name, spec in specs.items():
        with torch.no_grad():
            out = wrap(tiny, name)(*[feeds[name][t.name] for t in spec.inputs])
        assert tuple(out.shape) == spec.outputs[0].concrete(2)
    # the VAE wrapper returns the scaled latent mean, not a sample
    x = feeds["vae_encoder"]["image"]
    with torch.no_grad():
        assert torch.allclose(wrap(tiny, "vae_encoder")(x), tiny.vae.encode(x).latent_dist.mean * tiny.scaling_factor, atol=1e-6)


def test_missing_component_and_bad_files(tmp_path, tiny_dir):
    broken = tmp_path / "m"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(DiffclsError, match=r"lacks vae/"):
        load_model(broken)
    shutil.copytree(tiny_dir / "vae", broken / "vae")
    (broken / "vae" / "config.json").write_text("{not json")
    with pytest.raises(DiffclsError, match=r"cannot load .*vae") as e:
        load_model(broken)
    assert "\n" not in str(e.value)
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(DiffclsError, match="is not a checkpoint"):
        load_model(tmp_path / "model.txt")
    (tmp_path / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(DiffclsError, match="cannot load checkpoint"):
        load_model(tmp_path / "model.safetensors")


def test_tokenizer_keeps_every_given_word_one_token():
    """Each word passed to the builder is one token, even where an earlier word's merge ("re"
    from "red") would split it ("green" was g|re|e|n with merges added left to right blindly)."""
    from diffcls.models.shapes import CAPTION_WORDS
    from diffcls.models.tokenizer import build_tokenizer

    words = ["red", "green", "there", "tree", "a", *CAPTION_WORDS]
    tok = build_tokenizer(words)
    for w in words:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok("a green circle left of a red square", add_special_tokens=False).input_ids
    assert len(ids) == 8
