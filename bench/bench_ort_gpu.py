"""ONNX Runtime CUDA EP (plain fp16, fused fp16) vs the torch backend on an SD-2.1-base UNet.

Speed does not depend on weight values, so the UNet is SD-2.1-base-shaped with random weights
(sample_size 64, 4 channels, blocks (320, 640, 1280, 1280), heads dims (5, 10, 20, 20),
cross-attention 1024, linear projections). One device call:

  1. torch -> fp32 ONNX (diffcls.export.onnx_export, TorchScript exporter, weights in .data)
  2. plain fp16: ORT float16 conversion (Resize scales, GroupNorm params kept fp32)
  3. fused fp16: ORT `optimize_model(model_type="unet")` with the CUDA fusions, then fp16
  4. each variant as a diffcls `OrtEngine` on CUDA (IO binding on torch tensors, torch's stream),
     and the torch backend's `TorchEngine` (fp16, SDPA; `--compile` adds torch.compile);
     warm-up, then `--iters` calls at batch `--batch` between torch.cuda.synchronize()
  5. UNet evals/s (= batch x calls / s), ms per call, max |out - torch fp16 out|

  python bench/bench_ort_gpu.py               # GPU, batch 32
  python bench/bench_ort_gpu.py --tiny        # CPU smoke test: tiny UNet, fp32 + CPU fusions

JSON goes to --json PATH, else to $OUT/bench_ort_gpu.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffcls.engines.ort_backend import OrtEngine, resolve_providers  # noqa: E402
from diffcls.engines.torch_backend import TorchEngine  # noqa: E402
from diffcls.export import onnx_export as ox  # noqa: E402
from diffcls.models.spec import component_specs  # noqa: E402
from diffcls.models.wrappers import UNetWrapper, wrap  # noqa: E402
from sd21 import SD21_UNET  # noqa: E402  (bench/sd21.py)

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


def build_unet(cfg: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg).eval().requires_grad_(False)


def time_engine(engine, feed: dict, iters: int, warmup: int, cuda: bool) -> dict:
    for _ in range(warmup):
        engine(feed)
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        out = engine(feed)
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    batch = next(iter(feed.values())).shape[0]
    return {"evals_per_s": batch * iters / secs, "ms_per_call": 1000 * secs / iters, "out": next(iter(out.values()))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test with a tiny UNet")
    p.add_argument("--batch", type=int, default=None, help="UNet batch (default 32, tiny 4)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per variant (default 20, tiny 3)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile (CUDA graphs) for the torch backend")
    p.add_argument("--workdir", type=Path, default=None, help="where the ONNX files go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write results here (default $OUT/bench_ort_gpu.json)")
    args = p.parse_args(argv)

    tiny = args.tiny
    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (4 if tiny else 32)
    iters = args.iters or (3 if tiny else 20)
    cfg = TINY_UNET if tiny else SD21_UNET
    hidden = cfg["cross_attention_dim"]
    latent = cfg["sample_size"]
    spec = component_specs(max_length=77, hidden_size=hidden, image_size=latent * 8, latent_shape=(4, latent, latent))["unet"]
    report: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "unet": "tiny" if tiny else "sd-2.1-base-shaped (random weights)",
        "batch": batch,
        "iters": iters,
        "versions": {"torch": torch.__version__},
        "variants": {},
    }
    import onnxruntime as ort

    report["versions"]["onnxruntime"] = ort.__version__
    report["providers_available"] = ort.get_available_providers()

    unet = build_unet(cfg)
    # just enough of a model for the exporter: the UNet and its wrapper (no text encoder or VAE)
    model = SimpleNamespace(unet=unet, num_train_timesteps=1000, wrap=lambda component: UNetWrapper(unet))
    g = torch.Generator().manual_seed(0)
    feed = {
        "sample": torch.randn(spec.inputs[0].concrete(batch), generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g).float(),
        "encoder_hidden_states": torch.randn(spec.inputs[2].concrete(batch), generator=g),
    }
    feed_dev = {k: v.to(device) for k, v in feed.items()}

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        fp32 = ox.export_onnx(model, "unet", spec, work / "unet_fp32.onnx")
        report["export_fp32_s"] = time.perf_counter() - t
        paths = {"ort_fp32": fp32}
        t = time.perf_counter()
        ox.convert_fp16(fp32, work / "unet_fp16.onnx")
        report["convert_fp16_s"] = time.perf_counter() - t
        paths["ort_fp16"] = work / "unet_fp16.onnx"
        t = time.perf_counter()
        fused = ox.optimize_unet(fp32, gpu=cuda, for_fp16=cuda)
        report["fused_ops"] = ox.fused_ops(fused)
        if cuda:
            ox.convert_fp16(fused, work / "unet_fused_fp16.onnx")
            paths["ort_fused_fp16"] = work / "unet_fused_fp16.onnx"
        else:
            ox.save_onnx_model(fused, work / "unet_fused_fp32.onnx")
            paths["ort_fused_fp32"] = work / "unet_fused_fp32.onnx"
        report["optimize_s"] = time.perf_counter() - t
        del fused

        # torch backend reference (fp16 on GPU, fp32 on CPU)
        dtype = torch.float16 if cuda else torch.float32
        ref_engine = TorchEngine(wrap(model, "unet"), spec, device, dtype)
        ref = time_engine(ref_engine, feed_dev, iters, args.warmup, cuda)
        ref_out = ref.pop("out").float()
        report["variants"]["torch_eager"] = ref
        if args.compile and cuda:
            t = time.perf_counter()
            comp = TorchEngine(wrap(model, "unet"), spec, device, dtype, batch_sizes=(batch,), compile=True)
            r = time_engine(comp, feed_dev, iters, args.warmup, cuda)
            r["compile_s"] = time.perf_counter() - t
            r["max_abs_err_vs_torch"] = float((r.pop("out").float() - ref_out).abs().max())
            report["variants"]["torch_compile"] = r
        unet.to("cpu")
        del ref_engine
        if cuda:
            torch.cuda.empty_cache()

        try:
            _, providers = resolve_providers(device.type)
        except Exception as e:  # noqa: BLE001 - report, do not crash the benchmark
            report["error"] = str(e)
            providers = None
        for name, path in paths.items() if providers else ():
            if cuda and name == "ort_fp32":
                continue  # the GPU comparison is fp16 vs fp16
            try:
                t = time.perf_counter()
                engine = OrtEngine(path, spec, (batch,), device, providers)
                load_s = time.perf_counter() - t
                r = time_engine(engine, feed_dev, iters, args.warmup, cuda)
                r["session_load_s"] = load_s
                r["max_abs_err_vs_torch"] = float((r.pop("out").float() - ref_out).abs().max())
                r["speedup_vs_torch_eager"] = r["evals_per_s"] / ref["evals_per_s"]
                r["providers"] = engine.providers
                report["variants"][name] = r
                del engine
            except Exception as e:  # noqa: BLE001
                report["variants"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}

    print(json.dumps(report, indent=2, default=str))
    out = args.json or (Path(os.environ["OUT"]) / "bench_ort_gpu.json" if os.environ.get("OUT") else None)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
