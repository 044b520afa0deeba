"""Startup that does not grow with the model (issue 9 item 2): file sha256s and model fingerprints
are computed once and remembered by file size + mtime, so a second run hashes nothing."""

from __future__ import annotations

import os
import shutil

import pytest

from diffcls.models import filehash, loading


@pytest.fixture
def counted(monkeypatch, tmp_path):
    """A fresh hash store, and counters on the two functions that read every byte/weight."""
    monkeypatch.setenv("DIFFCLS_CACHE", str(tmp_path / "cache"))
    calls = {"files": [], "weights": 0}
    real_file, real_weights = filehash.sha256_file, loading.hash_weights

    def count_file(path, *a, **k):
        calls["files"].append(os.path.basename(path))
        return real_file(path, *a, **k)

    def count_weights(model):
        calls["weights"] += 1
        return real_weights(model)

    monkeypatch.setattr(filehash, "sha256_file", count_file)
    monkeypatch.setattr(loading, "hash_weights", count_weights)
    return calls


def _reset(calls):
    calls["files"].clear()
    calls["weights"] = 0


def test_torch_backend_fingerprints_once(counted, tiny, tiny_dir, tmp_path):
    from diffcls.engines import open_engines

    model_dir = shutil.copytree(tiny_dir, tmp_path / "model")
    first = open_engines("torch", model=model_dir, device="cpu")
    assert counted["weights"] == 1 and first.fingerprint == tiny.fingerprint()
    _reset(counted)
    second = open_engines("torch", model=model_dir, device="cpu")
    assert counted["weights"] == 0 and second.fingerprint == first.fingerprint
    # a changed file (same bytes, new mtime) is not trusted: the weights are hashed again
    cfg = model_dir / "unet" / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    third = open_engines("torch", model=model_dir, device="cpu")
    assert counted["weights"] == 1 and third.fingerprint == first.fingerprint


def test_engine_dir_with_model_hashes_nothing_the_second_time(counted, engine_dir, tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from diffcls.engines import manifest as mf
    from diffcls.engines import open_engines

    engines = shutil.copytree(engine_dir, tmp_path / "engines")
    model_dir = shutil.copytree(tiny_dir, tmp_path / "model")
    open_engines("onnxruntime", engine_dir=engines, model=model_dir, device="cpu")
    # the engines, and the small files beside them that change scores (tokenizer, schedule), once each
    hashed = sorted(counted["files"])
    assert {"text_encoder.onnx", "unet.onnx", "vae_encoder.onnx", "alphas_cumprod.json"} <= set(hashed)
    assert len(hashed) == len(set(hashed))
    assert counted["weights"] == 1  # the model was loaded once to fingerprint it

    _reset(counted)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded to fingerprint it again")

    monkeypatch.setattr(mf, "load_model", no_load)
    second = open_engines("onnxruntime", engine_dir=engines, model=model_dir, device="cpu")
    assert counted["files"] == [] and counted["weights"] == 0
    assert second.fingerprint == mf.read_manifest(engines)["fingerprint"]


def test_a_changed_engine_file_is_hashed_again(counted, engine_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from diffcls.engines import open_engines
    from diffcls.errors import DiffclsError

    engines = shutil.copytree(engine_dir, tmp_path / "engines")
    open_engines("onnxruntime", engine_dir=engines, device="cpu")
    _reset(counted)
    unet = engines / "unet.onnx"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes, new mtime
    unet.write_bytes(bytes(data))
    with pytest.raises(DiffclsError, match="corrupted"):
        open_engines("onnxruntime", engine_dir=engines, device="cpu")
    assert counted["files"] == ["unet.onnx"]


def test_export_remembers_what_it_wrote(counted, tiny_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from diffcls.engines import open_engines
    from diffcls.export import ExportConfig, export_model

    out = tmp_path / "engines"
    export_model(ExportConfig(out=out, model=tiny_dir, batch_sizes=(2,), image_size=16, device="cpu"))
    _reset(counted)
    open_engines("onnxruntime", engine_dir=out, model=tiny_dir, device="cpu")
    assert counted["files"] == [] and counted["weights"] == 0


def test_unreadable_store_is_ignored(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFCLS_CACHE", str(tmp_path))
    f = tmp_path / "data.bin"
    f.write_bytes(b"x" * 100)
    filehash.store_path().write_text("{not json")
    assert filehash.file_sha256(f) == filehash.sha256_file(f)
    assert filehash.file_sha256(f) == filehash.sha256_file(f)  # and the store was rewritten


def test_dit_directory_fingerprints_once(monkeypatch, tmp_path):
    """A DiT directory's fingerprint is remembered like an SD directory's (it was hashed on every load)."""
    from diffcls.models import dit
    from diffcls.models.loading import bundled_model_path, cached_fingerprint, load_model

    monkeypatch.setenv("DIFFCLS_CACHE", str(tmp_path / "cache"))
    calls = []
    real = dit.hash_dit_weights
    monkeypatch.setattr(dit, "hash_dit_weights", lambda m: calls.append(1) or real(m))
    model_dir = shutil.copytree(bundled_model_path("demo-dit"), tmp_path / "dit")
    assert cached_fingerprint(model_dir) is None
    first = load_model(model_dir).fingerprint()
    assert len(calls) == 1
    assert load_model(model_dir).fingerprint() == first and len(calls) == 1
    assert cached_fingerprint(model_dir) == first  # --engines with --model need not load it
    cfg = model_dir / "transformer" / "config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert load_model(model_dir).fingerprint() == first and len(calls) == 2
