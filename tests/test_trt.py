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
    assert 'pip install -e ".[tensorrt]"' in str(e.value)


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


# --- build_engine against a recording stand-in for TensorRT's builder API ----------------------
# TensorRT cannot be installed here; this double implements just the documented calls that
# build_engine makes (TensorRT 10 Python API) and records them, so that the plumbing (profiles,
# flags, workspace, timing cache round trip, atomic writes, parse errors) is tested for real.
class _FakeTRT:
    class Logger:
        ERROR, INFO = "error", "info"

        def __init__(self, level):
            self.level = level

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16 = "fp16"

    def __init__(self, parse_ok=True, build_ok=True, fast_fp16=True):
        self.__version__ = "10.0.fake"
        self.parse_ok, self.build_ok, self.fast_fp16 = parse_ok, build_ok, fast_fp16
        self.log: list = []
        fake = self

        class TimingCache:
            def __init__(self, data: bytes):
                self.data = data

            def serialize(self):
                return self.data + b"+timed"

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, mn, opt, mx):
                self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

        class Config:
            def __init__(self):
                self.flags, self.profiles, self.pool, self.cache = set(), [], {}, None

            def set_memory_pool_limit(self, pool, size):
                self.pool[pool] = size

            def set_flag(self, flag):
                self.flags.add(flag)

            def create_timing_cache(self, data):
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch):
                self.cache = cache

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                return len(self.profiles) - 1

        class Parser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.log.append(("parse", path))
                return fake.parse_ok

            def get_error(self, i):
                return "In node 3 (Resize): unsupported"

        class Builder:
            def __init__(self, logger):
                self.platform_has_fast_fp16 = fake.fast_fp16

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.log.append(("build", config))
                return bytearray(b"PLAN") if fake.build_ok else None

        self.Builder, self.OnnxParser = Builder, Parser


def _build(monkeypatch, tmp_path, fake, fp16=False, sizes=(16, 8)):
    import sys

    from diffcls.export.trt_build import build_engine

    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    onnx = tmp_path / "unet.onnx"
    onnx.write_bytes(b"onnx")
    return build_engine(onnx, tmp_path / "unet.plan", SPECS["unet"], sizes, fp16=fp16,
                        timing_cache=tmp_path / "timing.cache", workspace_gb=2)


def test_build_engine_profiles_flags_and_timing_cache(monkeypatch, tmp_path):
    fake = _FakeTRT()
    out = _build(monkeypatch, tmp_path, fake, fp16=True)
    assert out.read_bytes() == b"PLAN" and not list(tmp_path.glob("*.tmp"))
    (_, config), = [e for e in fake.log if e[0] == "build"]
    assert config.flags == {"fp16"} and config.pool == {"workspace": 2 << 30}
    # one fixed profile per batch size, in sorted order (profile k serves sorted(sizes)[k])
    assert [p.shapes["sample"] for p in config.profiles] == [((b, 4, 64, 64),) * 3 for b in (8, 16)]
    assert [p.shapes["timestep"] for p in config.profiles] == [((8,),) * 3, ((16,),) * 3]
    assert (tmp_path / "timing.cache").read_bytes() == b"+timed"
    # the next build starts from the saved timing cache and grows it
    _build(monkeypatch, tmp_path, fake)
    assert (tmp_path / "timing.cache").read_bytes() == b"+timed+timed"
    assert not [e for e in fake.log if e[0] == "build"][-1][1].flags  # fp32: no FP16 flag


@pytest.mark.parametrize(
    "fake, fp16, fragments",
    [
        (_FakeTRT(parse_ok=False), False, ["cannot parse", "unet.onnx", "Resize", "re-export"]),
        (_FakeTRT(build_ok=False), False, ["failed to build unet", "[8, 16]", "DIFFCLS_VERBOSE=1"]),
        (_FakeTRT(fast_fp16=False), True, ["no fast fp16", "--precision fp32"]),
    ],
)
def test_build_engine_failures_are_one_line_and_write_nothing(monkeypatch, tmp_path, fake, fp16, fragments):
    with pytest.raises(DiffclsError) as e:
        _build(monkeypatch, tmp_path, fake, fp16=fp16)
    msg = str(e.value)
    assert "\n" not in msg and all(f in msg for f in fragments), msg
    assert not (tmp_path / "unet.plan").exists() and not (tmp_path / "timing.cache").exists()
