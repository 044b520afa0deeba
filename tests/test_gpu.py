"""CUDA paths: the torch fast path (fp16, compile + CUDA graphs) and ONNX Runtime's CUDA provider
with IO binding, each against a CPU fp32 run of the same model, images and noise.

They skip without a CUDA GPU (CI never has one); a GPU session runs them in one call with
`python -m pytest -q -m gpu` (see bench/gpu_session.sh). Each test builds its own model: opening
engines on CUDA moves the model's modules to the GPU in place.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here; CI never has one)"),
]

CUDA = "cuda"  # one name for the device, so the file can be dry-run elsewhere
EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples" / "digits").rglob("*.png"))


def _feed(engine, batch: int, seed: int, timestep: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = engine.spec.shape_dict(batch)
    return {
        "sample": torch.randn(shapes["sample"], generator=g).to(CUDA),
        "timestep": torch.full(shapes["timestep"], timestep).to(CUDA),
        "encoder_hidden_states": torch.randn(shapes["encoder_hidden_states"], generator=g).to(CUDA),
    }


def _demo_prompts():
    from diffcls.models.loading import model_defaults
    from diffcls.runtime.data.prompts import PromptSet

    return PromptSet.from_csv(model_defaults(None)["prompts"])


def _classify(device, precision, compile=False, batch_sizes=None, batch_size=32):
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.algorithm.schedule import Schedule

    clf = Classifier.from_pretrained(device=device, precision=precision, compile=compile,
                                     batch_sizes=batch_sizes, use_cache=False)
    results = clf.classify([str(p) for p in EXAMPLES], _demo_prompts(), Schedule((10, 50), (3, 1)), seed=0, batch_size=batch_size)
    return results, clf


def _assert_close(got, want, rel):
    assert [r.prediction for r in got] == [r.prediction for r in want]
    for g, w in zip(got, want):
        assert [e[:3] for e in g.errors] == [e[:3] for e in w.errors]  # same (prompt, t, trial) order
        a = torch.tensor([e[3] for e in g.errors])
        b = torch.tensor([e[3] for e in w.errors])
        assert torch.isfinite(a).all() and (a - b).abs().max() <= rel * b.abs().max()


def test_demo_examples_cuda_fp16_match_cpu_fp32():
    want, _ = _classify("cpu", "fp32")
    got, clf = _classify(CUDA, "fp16")
    assert clf.engines.unet.dtype == torch.float16 and clf.engines.device.type == CUDA
    assert [r.classname for r in got] == [p.parent.name for p in EXAMPLES]  # all 10 examples right
    _assert_close(got, want, rel=2e-2)


def test_compiled_cuda_graphs_match_eager_and_outputs_are_not_aliased():
    eager, _ = _classify(CUDA, "fp16")
    compiled, clf = _classify(CUDA, "fp16", compile=True, batch_sizes=(8, 32))
    _assert_close(compiled, eager, rel=1e-2)
    assert clf.last_stats.padding_fraction < 0.05
    # a CUDA-graph replay overwrites its static output: a returned tensor must survive the next call
    unet = clf.engines.unet
    feeds = [_feed(unet, 8, seed=s, timestep=100.0 * (s + 1)) for s in range(2)]
    first = unet(feeds[0])["out_sample"]
    kept = first.clone()
    unet(feeds[1])
    assert torch.equal(first, kept)


def test_cuda_scoring_is_batch_size_invariant():
    a, _ = _classify(CUDA, "fp32", batch_size=7)
    b, _ = _classify(CUDA, "fp32", batch_size=32)
    _assert_close(a, b, rel=1e-4)


def test_ort_cuda_io_binding_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    from diffcls.export import ExportConfig, export_model
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.algorithm.schedule import Schedule

    out = tmp_path / "ort16"
    export_model(ExportConfig(out=out, precision="fp16", batch_sizes=(8, 32), device=CUDA))  # fused fp16 by default
    clf = Classifier.from_pretrained(backend="onnxruntime", engine_dir=out, device=CUDA, use_cache=False)
    assert clf.engines.unet.providers[0] == "CUDAExecutionProvider"
    got = clf.classify([str(p) for p in EXAMPLES], _demo_prompts(), Schedule((10, 50), (3, 1)), seed=0, batch_size=32)
    want, _ = _classify("cpu", "fp32")
    _assert_close(got, want, rel=3e-2)
    # outputs are ready for torch work queued right after the call (no host sync in between)
    unet = clf.engines.unet
    feed = _feed(unet, 32, seed=0, timestep=500.0)
    ref = unet(feed)["out_sample"].float().cpu()
    for _ in range(3):
        y = unet(feed)["out_sample"].float().sum()  # reduction queued on torch's stream
        assert torch.allclose(y.cpu(), ref.sum(), rtol=1e-3)


def test_vae_stays_fp32_on_cuda_and_matches_cpu_fp32_latents():
    """Issue 13 item 3: with `force_upcast` the VAE runs in IEEE fp32 on CUDA (no fp16, no TF32
    convolutions) even when the rest runs in fp16, and its latents equal the CPU fp32 ones."""
    from diffcls.engines import open_engines
    from diffcls.models.tiny import tiny_model
    from diffcls.runtime.execution.classifier import run_batched

    g = torch.Generator().manual_seed(0)
    images = torch.rand((4, 3, 16, 16), generator=g) * 2 - 1
    cpu = open_engines("torch", model=tiny_model(seed=0), device="cpu", precision="fp32")
    gpu = open_engines("torch", model=tiny_model(seed=0), device=CUDA, precision="fp16")
    assert gpu.vae_encoder.dtype == torch.float32 and gpu.unet.dtype == torch.float16
    want = run_batched(cpu.vae_encoder, "image", images, 8)
    got = run_batched(gpu.vae_encoder, "image", images, 8).float().cpu()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_fp32_on_cuda_is_ieee_fp32_not_tf32():
    """`--precision fp32` on CUDA gives the CPU fp32 errors to ~1e-5 (TF32 convolutions would
    move them by ~1e-3)."""
    want, _ = _classify("cpu", "fp32")
    got, _ = _classify(CUDA, "fp32")
    _assert_close(got, want, rel=1e-4)
