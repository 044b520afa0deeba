"""bench/bench_speed.py --tiny: the CPU smoke test of the speed benchmark (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "bench_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_bench_agrees_with_reference(tmp_path):
    out = tmp_path / "bench.json"
    report = _bench().main(["--tiny", "--json", str(out)])
    assert json.loads(out.read_text())["mode"] == "tiny"
    a = report["agreement"]
    assert a["predictions_agree"] and a["n_agree"] == a["n_images"] == 3
    assert a["n_errors_compared"] == 3 * report["evals_per_image"]
    assert a["max_abs_error_diff"] < 1e-4
    for path in ("reference", "diffcls"):
        r = report[path]
        assert r["unet_evals"] == 3 * report["evals_per_image"]
        assert r["unet_evals_per_s"] > 0 and r["s_per_image"] > 0
    assert report["unet_gflop_per_eval"] > 0 and report["matmul_peak_tflops"] > 0
    assert report["diffcls"]["peak_gpu_memory_bytes"] is None


def test_reference_loop_matches_diffcls_with_n_trials_and_uneven_batches(tmp_path):
    # 3 prompts x 3 t x 2 trials = 18 items: reference batches of 4 end with a partial batch
    report = _bench().main(["--tiny", "--classes", "3", "--n-samples", "3", "6", "--to-keep", "2", "1", "--n-trials", "2",
                            "--batch-size", "8", "--ref-batch-size", "4", "--images", "2", "--json", str(tmp_path / "b.json")])
    assert report["agreement"]["predictions_agree"]
    assert report["agreement"]["n_errors_compared"] == 2 * report["evals_per_image"] == 2 * (3 * 3 * 2 + 2 * 3 * 2)
    assert report["reference"]["mean_batch_fill"] < 1.0


def test_demo_mode_says_what_is_missing(tmp_path, monkeypatch):
    import diffcls.models.loading as loading

    monkeypatch.setattr(loading, "default_model_path", lambda: tmp_path / "no-demo")
    with pytest.raises(SystemExit, match="demo model"):
        _bench().main(["--demo", "--json", str(tmp_path / "d.json")])


def test_demo_mode_on_held_out_digits(tmp_path):
    pytest.importorskip("sklearn")
    report = _bench().main(["--demo", "--images", "4", "--threads", "1", "--json", str(tmp_path / "d.json")])
    assert report["mode"] == "demo"
    assert report["evals_per_image"] == 10 * 10 + 3 * 40  # the demo default schedule 10,50 -> 3,1
    assert report["agreement"]["predictions_agree"]
    assert report["reference"]["accuracy"] == report["diffcls"]["accuracy"] >= 0.75


def test_tiny_bench_on_onnxruntime_agrees_with_reference(tmp_path):
    pytest.importorskip("onnxruntime")
    report = _bench().main(["--tiny", "--backend", "onnxruntime", "--json", str(tmp_path / "o.json")])
    assert report["backend"] == "onnxruntime" and report["diffcls"]["export_s"] > 0
    a = report["agreement"]
    assert a["predictions_agree"] and a["n_errors_compared"] == 3 * report["evals_per_image"]
    assert a["max_abs_error_diff"] < 1e-4


def test_tiny_bench_runs_the_adaptive_variant_and_the_vae_check(tmp_path):
    report = _bench().main(["--tiny", "--variants", "eager,adaptive", "--json", str(tmp_path / "v.json")])
    assert set(report["variants"]) == {"eager", "adaptive"}
    ada = report["variants"]["adaptive"]
    assert ada["on"] == "eager" and ada["unet_evals"] == sum(ada["evals_per_image_each"])
    assert ada["agreement"]["n_images"] == 3
    # the fixed run is the one compared with the reference
    assert report["diffcls"]["unet_evals"] == 3 * report["evals_per_image"]
    vae = report["vae"]
    assert vae["vae_engine_dtype"] == "float32" and vae["force_upcast"] is True
    assert vae["max_abs_diff_vs_cpu_fp32"] < 1e-5


def test_bench_refuses_an_unknown_variant(tmp_path):
    with pytest.raises(SystemExit, match="unknown"):
        _bench().main(["--tiny", "--variants", "eager,fast", "--json", str(tmp_path / "u.json")])


def test_ort_gpu_bench_smoke_on_cpu(tmp_path):
    """bench/bench_ort_gpu.py --tiny: export, fp16 conversion, fusion and timing run end to end
    (it once broke unnoticed when the exporter started asking the model for its wrappers)."""
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("bench_ort_gpu", ROOT / "bench" / "bench_ort_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--tiny", "--json", str(tmp_path / "o.json")])
    assert report["fused_ops"] and report["variants"]
    for name, r in report["variants"].items():
        assert "error" not in r, (name, r)
        assert r["evals_per_s"] > 0
