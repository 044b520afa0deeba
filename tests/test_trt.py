"""TensorRT: profile planning (pure, always tested); real builds only where TensorRT and a GPU exist."""

from __future__ import annotations

import pytest
import torch

from diffcls.errors import DiffclsError
from diffcls.export.trt_build import normalize_batch_sizes, plan_profiles, profile_index
from diffcls.models.spec import component_specs



SPECS = component_specs(max_length=77, hidden_size=1024, image_size=512, latent_shape=(4, 64, 64))


def test_one_fixed_profile_per_batch_size():
    profiles = plan_profiles(SPECS["unet"], [32, 8, 16])
    assert len(profiles) == 3
    for profile, b in zip(profiles, (8, 16, 32)):
        assert set(profile) == {"sample", "timestep", "encoder_hidden_states"}
        assert profile["sample"] == ((b, 4, 64, 64),) * 3  # min = opt = max
        assert profile["timestep"] == ((b,),) * 3
        assert profile["encoder_hidden_states"] == ((b, 77, 1024),) * 3


def test_profiles_for_text_and_vae():
    (p,) = plan_profiles(SPECS["text_encoder"], [4])
    assert p == {"input_ids": ((4, 77),) * 3}
    (p,) = plan_profiles(SPECS["vae_encoder"], [2])
    assert p == {"image": ((2, 3, 512, 512),) * 3}


def test_batch_sizes_are_sorted_and_deduplicated():
    assert normalize_batch_sizes((16, 8, 16)) == [8, 16]
    assert profile_index((16, 8, 32), 16) == 1
    assert len(plan_profiles(SPECS["unet"], (16, 16))) == 1


@pytest.mark.parametrize("bad", [(), (0,), ("x",), None])
def test_bad_batch_sizes(bad):
    with pytest.raises(DiffclsError) as e:
        plan_profiles(SPECS["unet"], bad)
    assert "--batch-sizes" in str(e.value) and "\n" not in str(e.value)


def test_opening_a_tensorrt_dir_without_tensorrt_is_a_clear_error(tmp_path):
    from diffcls.engines import is_available, open_engines

    if is_available("tensorrt"):
        pytest.skip("TensorRT is installed here")
    with pytest.raises(DiffclsError) as e:
        open_engines("tensorrt", engine_dir=tmp_path)
    assert "pip install 'diffcls[tensorrt]'" in str(e.value)


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_and_run_tiny_engines_match_torch(tiny, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (its wheels are not reachable from CI machines)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU")
    from diffcls.engines import open_engines
    from diffcls.export import ExportConfig, export_model
    from diffcls.export.onnx_export import random_feed

    out = tmp_path / "trt"
    result = export_model(ExportConfig(out=out, model=tiny, backend="tensorrt", precision="fp32", batch_sizes=(2, 4), image_size=16))
    assert (out / "unet.plan").is_file() and (out / "timing.cache").is_file()
    assert result.manifest["gpu"]["compute_capability"]
    trt_e = open_engines("tensorrt", engine_dir=out, model=tiny)
    ref = open_engines("torch", model=tiny, image_size=16, device="cuda", precision="fp32")
    for comp in ("text_encoder", "vae_encoder", "unet"):
        feed = {k: v.cuda() for k, v in random_feed(tiny, getattr(trt_e, comp).spec, 4).items()}
        got = getattr(trt_e, comp)(feed)
        want = getattr(ref, comp)(feed)
        name = next(iter(got))
        assert torch.allclose(got[name].float(), want[name].float(), atol=1e-3, rtol=1e-3)
    again = export_model(ExportConfig(out=out, model=tiny, backend="tensorrt", precision="fp32", batch_sizes=(2, 4), image_size=16))
    assert again.built == []
