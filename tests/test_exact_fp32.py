"""`exact_fp32`: a component asked to run in fp32 gets IEEE fp32 convolutions and matmuls on CUDA
(cuDNN's default is TF32), with the process-wide flags restored after the call. The flags can be
set without a GPU, so this runs everywhere; tests/test_gpu.py checks the latents on a GPU."""

from __future__ import annotations

import pytest
import torch

from diffcls.engines.torch_backend import TorchEngine, exact_fp32


def _flags():
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


IEEE = ("ieee", "ieee") if hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision") else (False, False)


def test_exact_fp32_sets_ieee_on_cuda_and_restores():
    before = _flags()
    with exact_fp32(torch.device("cuda")):
        assert _flags() == IEEE
    assert _flags() == before


def test_exact_fp32_restores_after_an_error():
    before = _flags()
    with pytest.raises(RuntimeError), exact_fp32(torch.device("cuda")):
        raise RuntimeError("boom")
    assert _flags() == before


def test_exact_fp32_leaves_cpu_alone():
    before = _flags()
    with exact_fp32(torch.device("cpu")):
        assert _flags() == before


@pytest.mark.parametrize("dtype, wrapped", [(torch.float32, True), (torch.float16, False)])
def test_fp32_engines_and_only_those_run_inside_exact_fp32(monkeypatch, dtype, wrapped):
    import diffcls.engines.torch_backend as tb
    from diffcls.models.spec import ComponentSpec, TensorSpec

    calls = []
    real = tb.exact_fp32

    def recording(device):
        calls.append(device.type)
        return real(device)

    monkeypatch.setattr(tb, "exact_fp32", recording)

    class Double(torch.nn.Module):
        def forward(self, x):
            return x * 2

    spec = ComponentSpec("probe", (TensorSpec("x", "float", ("B", 2)),), (TensorSpec("y", "float", ("B", 2)),))
    eng = TorchEngine(Double(), spec, torch.device("cpu"), dtype)
    out = eng({"x": torch.ones(3, 2)})
    assert calls == (["cpu"] if wrapped else [])
    assert torch.equal(out["y"].float(), torch.full((3, 2), 2.0))
