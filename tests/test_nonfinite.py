"""No silent wrong answer from non-finite numbers (issue 8, items 2 and 3).

NaN/inf noise is refused when it is loaded; a VAE encoder that returns NaN/inf stops the run
with one line naming the image, and nothing non-finite is cached; the VAE encoder runs in fp32
wherever its config asks for it (`force_upcast`, true for SD's VAE, which overflows in fp16) on
the torch, ONNX and TensorRT paths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.errors import DiffclsError
from diffcls.models import tiny_model
from diffcls.runtime.data.cache import DiskCache
from diffcls.runtime.execution.classifier import Classifier
from diffcls.runtime.algorithm.schedule import Schedule
from conftest import assert_one_line_error

SCHEDULE = Schedule(n_samples=(4, 8), to_keep=(2, 1))
FAST = ["--n-samples", "4,8", "--to-keep", "2,1", "--batch-size", "8"]


# --- item 3: non-finite noise -------------------------------------------------------------------
@pytest.mark.parametrize("bad, suffix, fragment", [
    (float("nan"), ".pt", "1 NaN and 0 inf values"),
    (float("inf"), ".npy", "0 NaN and 1 inf values"),
    (1e39, ".npy", "0 NaN and 1 inf values"),  # finite in float64, inf once cast to float32
])
def test_non_finite_noise_file_is_refused(tmp_path, tiny_dir, image_folder, bad, suffix, fragment):
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0)).double()
    noise[3, 1, 2, 2] = bad
    path = tmp_path / f"noise{suffix}"
    if suffix == ".npy":
        np.save(path, noise.numpy())
    else:
        torch.save(noise.float(), path)
    out = tmp_path / "r.csv"
    r = CliRunner().invoke(app, ["classify", str(image_folder), "--model", str(tiny_dir), "--classes", "cat,dog",
                                 *FAST, "--no-cache", "--noise", str(path), "--out", str(out)])
    assert_one_line_error(r, f"noise file {path}", fragment)
    assert not out.exists()


def test_non_finite_noise_tensor_is_refused_by_the_library(tiny_engines, image_folder):
    images = sorted(str(p) for p in image_folder.rglob("*.png"))[:1]
    noise = torch.randn(8, *tiny_engines.latent_shape)
    noise[0, 0, 0, 0] = float("nan")
    clf = Classifier(tiny_engines, cache=None)
    with pytest.raises(DiffclsError, match="noise tensor holds 1 NaN"):
        clf.classify(images, ["a cat", "a dog"], SCHEDULE, noise=noise)


# --- item 2: a non-finite latent is an error, never cached --------------------------------------
def test_non_finite_latent_stops_with_the_image_named_and_is_not_cached(tmp_path, image_folder):
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.vae.encoder.conv_out.bias[0] = float("nan")  # a broken VAE: NaN in every latent
    from diffcls.engines import open_engines

    engines = open_engines("torch", model=model, device="cpu")
    images = sorted(str(p) for p in image_folder.rglob("*.png"))[:2]
    cache = DiskCache(tmp_path / "cache")
    clf = Classifier(engines, cache=cache)
    with pytest.raises(DiffclsError) as e:
        clf.classify(images, ["a cat", "a dog"], SCHEDULE)
    msg = str(e.value)
    assert "\n" not in msg and images[0] in msg and "NaN/inf latents" in msg and "fp32" in msg
    assert list((tmp_path / "cache").glob("latent/**/*.safetensors")) == []  # nothing non-finite was cached


def test_non_finite_latent_from_a_low_precision_vae_names_the_overflow(image_folder):
    from diffcls.engines import open_engines

    model = tiny_model(seed=0)
    model.vae.register_to_config(force_upcast=False)
    with torch.no_grad():
        model.vae.encoder.conv_out.bias[0] = float("inf")
    engines = open_engines("torch", model=model, device="cpu", precision="bf16")
    image = sorted(str(p) for p in image_folder.rglob("*.png"))[0]
    with pytest.raises(DiffclsError, match="runs in bfloat16 and likely overflowed; use --precision fp32"):
        Classifier(engines, cache=None).classify([image], ["a cat", "a dog"], SCHEDULE)


# --- item 2: the VAE encoder stays fp32 where the model asks for it -----------------------------
def _no_upcast(model):
    model.vae.register_to_config(force_upcast=False)
    return model


def test_torch_backend_keeps_an_upcast_vae_in_fp32():
    from diffcls.engines import open_engines

    # bf16 stands in for fp16 here: torch refuses fp16 on CPU (see test_gpu.py for CUDA fp16)
    model = tiny_model(seed=0)
    assert model.vae.config.force_upcast  # diffusers' AutoencoderKL default, as in SD's VAE config
    e = open_engines("torch", model=model, device="cpu", precision="bf16")
    assert e.vae_encoder.dtype == torch.float32 and next(e.vae_encoder.module.parameters()).dtype == torch.float32
    assert e.unet.dtype == torch.bfloat16 and e.text_encoder.dtype == torch.bfloat16
    assert e.info["vae_encoder_dtype"] == "float32"
    plain = open_engines("torch", model=_no_upcast(tiny_model(seed=0)), device="cpu", precision="bf16")
    assert plain.vae_encoder.dtype == torch.bfloat16  # the config does not ask: the VAE follows --precision


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here; CI never has one)")
def test_cuda_fp16_keeps_an_upcast_vae_in_fp32():
    from diffcls.engines import open_engines

    e = open_engines("torch", model=tiny_model(seed=0), device="cuda", precision="fp16")
    assert e.vae_encoder.dtype == torch.float32 and e.unet.dtype == torch.float16
    out = e.vae_encoder({"image": torch.rand(2, 3, 16, 16, device="cuda") * 2 - 1})["latent"]
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_latent_cache_key_records_the_vae_dtype(tmp_path, image_folder):
    from diffcls.engines import open_engines

    images = sorted(str(p) for p in image_folder.rglob("*.png"))[:1]
    e = open_engines("torch", model=tiny_model(seed=0), device="cpu", precision="bf16")
    clf = Classifier(e, cache=DiskCache(tmp_path))
    clf.classify(images, ["a cat", "a dog"], SCHEDULE)
    from safetensors import safe_open

    (path,) = (tmp_path / "latent").rglob("*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        key = json.loads(f.metadata()["key"])
    assert key["precision"] == "bf16" and key["vae_dtype"] == "float32"


def _overflowing_vae_model():
    """A tiny model whose VAE overflows fp16 (first conv outputs ~1e5, weights still < 65504) but is fine in fp32."""
    model = tiny_model(seed=0)
    with torch.no_grad():
        model.vae.encoder.conv_in.weight.mul_(2e5)
        model.vae.encoder.conv_in.bias.zero_()
    return model


def _export_vae_only(monkeypatch, model, out, precision):
    pytest.importorskip("onnxruntime")
    from diffcls.export import ExportConfig, export_model
    from diffcls.export import pipeline

    monkeypatch.setattr(pipeline, "COMPONENTS", ("vae_encoder",))  # the part under test; seconds, not a minute
    return export_model(ExportConfig(out=out, model=model, batch_sizes=(2,), image_size=16, device="cpu", precision=precision))


def _input_elem_type(path):
    import onnx

    return onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type


def test_fp16_onnx_export_keeps_an_upcast_vae_encoder_in_fp32(monkeypatch, tmp_path):
    import onnx

    model = _overflowing_vae_model()
    res = _export_vae_only(monkeypatch, model, tmp_path / "e", "fp16")
    entry = res.manifest["components"]["vae_encoder"]
    assert entry["precision"] == "fp16" and entry["run_precision"] == "fp32"
    assert entry["settings"]["upcast_fp32"] is True
    assert entry["max_rel_err"] < 1e-4  # checked against torch at fp32 tolerance, and it is finite
    assert _input_elem_type(tmp_path / "e" / "vae_encoder.onnx") == onnx.TensorProto.FLOAT
    on_disk = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert on_disk["components"]["vae_encoder"]["run_precision"] == "fp32"
    # the same model with fp16 VAE arithmetic overflows: what an fp16 VAE export would have given
    plain = _overflowing_vae_model()
    plain.vae.register_to_config(force_upcast=False)
    with pytest.raises(DiffclsError, match="NaN/inf"):
        _export_vae_only(monkeypatch, plain, tmp_path / "f", "fp16")


def test_fp16_onnx_export_converts_a_vae_that_does_not_ask_for_fp32(monkeypatch, tmp_path):
    import onnx

    res = _export_vae_only(monkeypatch, _no_upcast(tiny_model(seed=0)), tmp_path / "e", "fp16")
    entry = res.manifest["components"]["vae_encoder"]
    assert entry["run_precision"] == "fp16" and "upcast_fp32" not in entry["settings"]
    assert _input_elem_type(tmp_path / "e" / "vae_encoder.onnx") == onnx.TensorProto.FLOAT16


def test_tensorrt_build_keeps_an_upcast_vae_encoder_in_fp32(monkeypatch, tmp_path):
    """TensorRT itself is not installable here: the build is stubbed, the pipeline's choices are real."""
    from diffcls.export import pipeline
    from diffcls.models.spec import model_component_specs

    model = tiny_model(seed=0)
    specs = model_component_specs(model, 16)
    builds = {}

    def fake_build(onnx_path, plan, spec, batch_sizes, *, fp16, timing_cache, workspace_gb):
        builds[spec.name] = fp16
        plan.write_bytes(b"plan")
        return plan

    monkeypatch.setattr(pipeline.trt_build, "build_engine", fake_build)
    monkeypatch.setattr(pipeline, "check_trt_against_torch",
                        lambda *a: {"max_abs_err": 0.0, "max_rel_err": 0.0, "check_batch": 2})
    monkeypatch.setattr(pipeline.ox, "export_onnx", lambda model, comp, spec, path, opset, **kw: path.write_bytes(b"onnx"))
    monkeypatch.setattr(pipeline.ox, "check_against_torch", lambda *a: {"max_abs_err": 0.0, "max_rel_err": 0.0, "check_batch": 2})
    cfg = pipeline.ExportConfig(out=tmp_path, model=model, backend="tensorrt", precision="fp16", batch_sizes=(2,))
    result = pipeline.ExportResult(tmp_path, {})
    entries = {}
    for comp in ("vae_encoder", "unet"):
        settings = {"backend": "tensorrt", "fingerprint": "f", "precision": "fp16", "image_size": 16, "opset": 17,
                    "optimize": False, "batch_sizes": [2]}
        if comp == "vae_encoder" and model.vae.config.force_upcast:  # as export_model decides
            settings["upcast_fp32"] = True
        entries[comp] = pipeline._export_trt(model, comp, specs[comp], tmp_path, settings, None, "cuda", cfg,
                                             lambda e: None, result)
    assert builds == {"vae_encoder": False, "unet": True}
    assert entries["vae_encoder"]["run_precision"] == "fp32" and entries["unet"]["run_precision"] == "fp16"
    # and the measurement uses the precision the engine computes in
    assert pipeline.run_precision(entries["vae_encoder"]["settings"]) == "fp32"
