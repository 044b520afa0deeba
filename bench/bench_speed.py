"""Speed of diffcls vs the paper's reference loop, on the same images, prompts and noise bank.

Diffusion Classifier (Li et al., ICCV 2023) spends almost all its time in UNet evaluations:
2,750 per image for the CIFAR-10 schedule (`--n-samples 50 500 --to-keep 5 1`, 10 classes).
This script runs

  (a) the reference: `bench/reference.py`, the paper's loop (eager, one image at a time, batches
      of 32 per round with a partial last batch), and
  (b) diffcls's fastest torch path: `Classifier` with the torch backend, `compile=True` (CUDA
      graphs per static batch size on GPU), full batches shared across images,

and reports UNet evals/s, s/image, the speed-up, the fraction of the physical ceiling (UNet FLOPs
x evals/s / measured matmul peak), peak GPU memory, compile time, and whether the two agree on
every prediction (and the largest difference of any (prompt, t, trial) error).

Modes (one device call of < 10 minutes on an H100 for the default):

  python bench/bench_speed.py                    # SD-2.1-base-shaped model, random weights, GPU fp16
  python bench/bench_speed.py --images 8 --batch-size 64
  python bench/bench_speed.py --tiny             # CPU smoke test: tiny model, small schedule, fp32
  python bench/bench_speed.py --demo             # CPU: the bundled demo model on held-out digits
  python bench/bench_speed.py --demo --backend onnxruntime   # ... with diffcls on ONNX Runtime

JSON goes to --json PATH, else to $OUT/bench_speed.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reference  # noqa: E402  (bench/reference.py)
from sd21 import SD21_UNET, SD21_VAE  # noqa: E402  (bench/sd21.py)

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# --- models -------------------------------------------------------------------------------------
def sd21_model(device: torch.device, text_layers: int = 23, seed: int = 0):
    """SD-2.1-base-shaped SDModel with random weights, built directly on `device`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffcls.models.loading import SDModel, alphas_cumprod_from_scheduler_config
    from diffcls.models.tiny import TinyConfig, scheduler_config
    from diffcls.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer([w for c in CIFAR10 for w in c.split()] + ["a", "photo", "of"], 77)
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD21_UNET)
        vae = AutoencoderKL(**SD21_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=text_layers,
                num_attention_heads=16,
                max_position_embeddings=77,
                hidden_act="gelu",
                projection_dim=512,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )
        )
    model = SDModel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        alphas_cumprod=alphas_cumprod_from_scheduler_config(scheduler_config(TinyConfig())),
        source=f"<SD-2.1-base-shaped, random weights, seed={seed}>",
        _fingerprint=f"sd21-random-{seed}-{text_layers}",  # skip hashing 1.3 B parameters
    )
    return model.eval()


def random_images(n: int, size: int, seed: int) -> list[torch.Tensor]:
    """n smooth random (3, size, size) images in [-1, 1] (low-res noise, upsampled)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, max(2, size // 16), max(2, size // 16)), generator=g)
    imgs = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return list((imgs.clamp(0, 1) * 2 - 1).unbind(0))


# --- physical ceiling ---------------------------------------------------------------------------
def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured FLOP/s of one n x n x n matmul."""
    a = torch.randn((n, n), device=device, dtype=dtype)
    b = torch.randn((n, n), device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    iters = 20 if device.type == "cuda" else 3
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


@torch.inference_mode()
def unet_flops(unet, latent_shape, hidden: int, max_length: int, device, dtype) -> int:
    """FLOPs of one UNet forward at batch 1, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn((1, *latent_shape), device=device, dtype=dtype)
    t = torch.tensor([500.0], device=device, dtype=dtype)
    e = torch.randn((1, max_length, hidden), device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=e)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device):
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# --- the two paths ------------------------------------------------------------------------------
def run_reference(model, images, prompts, schedule, bank, device, dtype, batch_size) -> dict:
    """The paper's loop: text once, then per image VAE encode + per-round batches of the UNet."""
    model.to(device, dtype)
    unet, vae = model.unet, model.vae
    L = model.max_length
    bank = bank.to(device)
    # warm-up (not counted): one call of each component, as any fair benchmark does
    reference.encode_prompts(model.text_encoder, model.tokenizer, prompts[:1], L, device)
    reference.encode_image(vae, images[0], model.scaling_factor, dtype, device)
    with torch.inference_mode():
        C, h, w = model.latent_shape(images[0].shape[-1])
        unet(torch.zeros((batch_size, C, h, w), device=device, dtype=dtype), torch.full((batch_size,), 500.0, device=device, dtype=dtype),
             encoder_hidden_states=torch.zeros((batch_size, L, model.hidden_size), device=device, dtype=dtype))
    _sync(device)
    _reset_peak(device)
    start = time.perf_counter()
    emb = reference.encode_prompts(model.text_encoder, model.tokenizer, prompts, L, device).to(dtype)
    results = []
    for img in images:
        x0 = reference.encode_image(vae, img, model.scaling_factor, dtype, device)
        results.append(
            reference.classify_one(
                unet, x0, emb, model.alphas_cumprod, bank, schedule.n_samples, schedule.to_keep,
                schedule.n_trials, schedule.loss, batch_size,
            )
        )
    _sync(device)
    wall = time.perf_counter() - start
    evals = sum(r.n_evals for r in results)
    unet_s = sum(r.unet_seconds for r in results)
    sizes = [s for r in results for s in r.batch_sizes]
    return {
        "predictions": [r.prediction for r in results],
        "errors": [r.errors for r in results],
        "wall_s": wall,
        "unet_s": unet_s,
        "unet_evals": evals,
        "unet_calls": sum(r.unet_calls for r in results),
        "mean_batch_fill": sum(sizes) / (len(sizes) * batch_size) if sizes else 0.0,
        "peak_gpu_memory_bytes": _peak(device),
    }


def open_diffcls(model, images, prompts, device, precision, batch_size, compile, backend="torch") -> tuple:
    """diffcls's engines (torch, compiled on request, or ONNX Runtime exported here), warmed up:
    the first UNet calls compile and record the CUDA graph for this batch size (timed apart)."""
    import tempfile

    from diffcls.engines import open_engines
    from diffcls.runtime.execution.classifier import run_batched

    facts = {"export_s": None}
    t0 = time.perf_counter()
    if backend == "onnxruntime":
        from diffcls.export import ExportConfig, export_model

        workdir = tempfile.mkdtemp(prefix="diffcls-bench-ort-")
        export_model(ExportConfig(out=Path(workdir), model=model, precision=precision, batch_sizes=(batch_size,),
                                  image_size=int(images[0].shape[-1]), device=str(device)), report=lambda ev: None)
        facts["export_s"] = time.perf_counter() - t0  # ONNX export + checks, not counted
        t0 = time.perf_counter()
        engines = open_engines("onnxruntime", engine_dir=workdir, device=str(device))
    else:
        engines = open_engines(
            "torch", model=model, device=str(device), precision=precision,
            batch_sizes=(batch_size,) if compile else None, compile=compile,
        )
    facts["engine_open_s"] = time.perf_counter() - t0
    feed = {t.name: torch.zeros(t.concrete(batch_size)) for t in engines.unet.spec.inputs}
    feed["timestep"] += 500.0
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(3 if compile else 1):
        engines.unet(feed)
    _sync(device)
    facts["compile_s"] = time.perf_counter() - t0  # first UNet calls: compile + CUDA-graph capture
    run_batched(engines.text_encoder, "input_ids", engines.tokenize(prompts[:1]), 8)
    run_batched(engines.vae_encoder, "image", images[0][None], 8)
    _sync(device)
    facts["warmup_s"] = time.perf_counter() - t0  # first calls of all three engines, compile included
    return engines, facts


def run_diffcls(engines, facts, images, prompts, schedule, bank, device, batch_size, seed=0) -> dict:
    """One timed classify of `images` with full interleaved batches and no disk cache. `schedule`
    is a fixed Schedule (noise = the shared bank) or an AdaptiveSchedule (noise from `seed`)."""
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.algorithm.schedule import AdaptiveSchedule

    clf = Classifier(engines, cache=None)
    _reset_peak(device)
    kw = {"seed": seed} if isinstance(schedule, AdaptiveSchedule) else {"noise": bank}
    _sync(device)
    start = time.perf_counter()
    results = clf.classify(images, list(prompts), schedule, batch_size=batch_size, workers=2, **kw)
    _sync(device)
    wall = time.perf_counter() - start
    stats = clf.last_stats
    per_image = [r.n_evals for r in results] if hasattr(results[0], "n_evals") else None
    return {
        **facts,
        "predictions": [r.prediction for r in results],
        "errors": [{(p, t, j): e for p, t, j, e in r.errors} for r in results],
        "wall_s": wall,
        "unet_s": sum(stats.unet_seconds),
        "unet_evals": stats.unet_evals,
        "unet_calls": stats.unet_calls,
        "evals_per_image_each": per_image,
        "padding_fraction": stats.padding_fraction,
        "stages": clf.timer.summary(),
        # every UNet call's seconds, in order: on the H200 the median call of the compiled SD-2.1
        # UNet took 63.7 ms but the mean 81 ms; which calls are slow says why (first calls of a
        # round, image arrivals, or a steady drift)
        "unet_call_seconds": [round(x, 6) for x in stats.unet_seconds],
        "peak_gpu_memory_bytes": _peak(device),
    }


def vae_check(model, engines, images, device) -> dict:
    """Issue 13 item 3: the engines' VAE latents on `device` against a CPU fp32 copy of the same
    VAE (plain diffusers encode, latent mean), and the dtype the VAE engine runs in."""
    import copy

    cpu_vae = copy.deepcopy(model.vae).to("cpu", torch.float32).eval()
    batch = torch.stack(images[:2])
    with torch.inference_mode():
        want = cpu_vae.encode(batch).latent_dist.mean * model.scaling_factor
    from diffcls.runtime.execution.classifier import run_batched

    got = run_batched(engines.vae_encoder, "image", batch, 8).float().cpu()
    diff = (got - want).abs().max().item()
    return {
        "vae_engine_dtype": str(engines.vae_encoder.dtype).removeprefix("torch."),
        "force_upcast": bool(model.vae_force_upcast),
        "max_abs_diff_vs_cpu_fp32": diff,
        "max_abs_latent": want.abs().max().item(),
        "rel_diff": diff / max(want.abs().max().item(), 1e-12),
    }


def compile_only(model, device, precision, batch_size, compile) -> dict:
    """Open the engines and time the UNet's first 3 calls; prints one JSON line."""
    from torch._dynamo.utils import counters

    from diffcls.engines import open_engines

    engines = open_engines("torch", model=model, device=str(device), precision=precision,
                           batch_sizes=(batch_size,) if compile else None, compile=compile)
    C, h, w = engines.latent_shape
    feed = {"sample": torch.zeros((batch_size, C, h, w)), "timestep": torch.full((batch_size,), 500.0),
            "encoder_hidden_states": torch.zeros((batch_size, engines.max_length, model.hidden_size))}
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(3 if compile else 1):
        engines.unet(feed)
    _sync(device)
    res = {"compile_s": time.perf_counter() - t0, "inductor": {k: v for k, v in counters["inductor"].items() if "cache" in k},
           "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}
    print("COMPILE_ONLY " + json.dumps(res), flush=True)
    return res


def second_process_compile(argv: list[str]) -> dict:
    import subprocess

    drop = {"--json", "--cache-check"}
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in drop:
            skip = a == "--json"
            continue
        args.append(a)
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args, "--compile-only"], capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("COMPILE_ONLY "):
            return json.loads(line[len("COMPILE_ONLY "):])
    return {"error": f"exit {p.returncode}: {p.stderr[-1000:]}"}


# --- the modes ----------------------------------------------------------------------------------
def setup(args):
    """(model, images, prompts, labels or None, schedule, device, precision, mode facts)."""
    from diffcls.runtime.algorithm.schedule import Schedule

    if args.tiny:
        from diffcls.models.tiny import tiny_model

        device = torch.device(args.device or "cpu")
        model = tiny_model(seed=args.seed)
        n_classes = args.classes or 4
        prompts = [f"a photo of a {c}." for c in CIFAR10[:n_classes]]
        schedule = Schedule(tuple(args.n_samples or (4, 8)), tuple(args.to_keep or (2, 1)), n_trials=args.n_trials)
        images = random_images(args.images or 3, model.default_image_size, args.seed)
        return model, images, prompts, None, schedule, device, "fp32", "tiny"
    if args.demo:
        import tempfile

        from diffcls.errors import DiffclsError
        from diffcls.models.digits import write_digits
        from diffcls.models.loading import default_model_path, load_model, model_defaults
        from diffcls.runtime.data.preprocess import load_and_preprocess
        from diffcls.runtime.data.prompts import PromptSet

        if not default_model_path().is_dir():
            raise SystemExit(
                f"--demo needs the bundled demo model at {default_model_path()}; "
                "recreate it with python -m diffcls.train.demo, or run --tiny"
            )
        device = torch.device(args.device or "cpu")
        try:
            model = load_model(None)
            defaults = model_defaults(None)
            pset = PromptSet.from_csv(defaults["prompts"])
            with tempfile.TemporaryDirectory(prefix="diffcls-digits-") as tmp:
                paths = write_digits(tmp, "heldout", limit=args.images or 20)
                size = int(defaults.get("image_size", model.default_image_size))
                images = [load_and_preprocess(p, size) for p in paths]
        except DiffclsError as e:
            raise SystemExit(f"--demo: {e}") from None
        by_name = {n: i for i, n in pset.classes.items()}
        labels = [by_name.get(p.parent.name) for p in paths]
        ns = tuple(args.n_samples or defaults.get("n_samples", (50, 500)))
        ks = tuple(args.to_keep or defaults.get("to_keep", (5, 1)))
        schedule = Schedule(ns, tuple(min(k, len(pset)) for k in ks), n_trials=args.n_trials)
        facts = {"classidx": list(pset.classidx), "image_size": size}
        return model, images, list(pset.prompts), (labels, facts), schedule, device, "fp32", "demo"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        raise SystemExit("the SD-2.1-shaped benchmark needs a CUDA GPU; on CPU run --tiny or --demo")
    model = sd21_model(device, text_layers=args.text_layers, seed=args.seed)
    prompts = [f"a photo of a {c}." for c in CIFAR10[: args.classes or 10]]
    schedule = Schedule(tuple(args.n_samples or (50, 500)), tuple(args.to_keep or (5, 1)), n_trials=args.n_trials)
    images = random_images(args.images or 6, 512, args.seed)
    return model, images, prompts, None, schedule, device, "fp16", "sd21"


def compare(ref: dict, ours: dict) -> dict:
    agree = [a == b for a, b in zip(ref["predictions"], ours["predictions"])]
    diffs, missing = [], 0
    for er, eo in zip(ref["errors"], ours["errors"]):
        for key, e in er.items():
            if key in eo:
                diffs.append(abs(e - eo[key]))
            else:
                missing += 1
    import math

    nonfinite = sum(1 for r in (ref, ours) for er in r["errors"] for e in er.values() if not math.isfinite(e))
    return {
        "nonfinite_errors": nonfinite,  # must be 0: fp16 overflow would show here
        "predictions_agree": all(agree),
        "n_agree": sum(agree),
        "n_images": len(agree),
        "max_abs_error_diff": max(diffs) if diffs else None,
        "n_errors_compared": len(diffs),
        "n_errors_only_in_reference": missing,  # nonzero only if round-1 survivors differed
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, fp32, small schedule")
    mode.add_argument("--demo", action="store_true", help="CPU: bundled demo model on held-out digits")
    p.add_argument("--images", type=int, default=None, help="images to classify (default 6 GPU, 3 tiny, 20 demo)")
    p.add_argument("--classes", type=int, default=None, help="classes (default 10; 4 with --tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="diffcls UNet batch (default 32; 4 with --tiny)")
    p.add_argument("--ref-batch-size", type=int, default=None, help="reference UNet batch (default 32, the paper's; 4 with --tiny)")
    p.add_argument("--n-samples", type=int, nargs="+", default=None, help="default 50 500 (tiny: 4 8)")
    p.add_argument("--to-keep", type=int, nargs="+", default=None, help="default 5 1 (tiny: 2 1)")
    p.add_argument("--n-trials", type=int, default=1, help="noise draws per timestep")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile diffcls's UNet (default: on for GPU, off on CPU)")
    p.add_argument("--text-layers", type=int, default=23, help="CLIP text encoder layers of the SD-shaped model (SD 2.x: 23)")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch",
                   help="diffcls's engines: torch, or ONNX Runtime exported on the spot (CPU modes; on GPU see bench_ort_gpu.py)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (CPU modes; default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="write results here (default $OUT/bench_speed.json if $OUT is set)")
    p.add_argument("--skip-reference", action="store_true", help="time diffcls only")
    p.add_argument("--variants", default=None,
                   help="comma list of diffcls runs: eager, compiled, adaptive (default: all three on GPU, eager on CPU)")
    p.add_argument("--vae-check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare the VAE engine's latents with a CPU fp32 copy of the VAE")
    p.add_argument("--cache-check", action="store_true",
                   help="after the run, compile again in a fresh process and report its compile time (persistent inductor cache)")
    p.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from diffcls.cli.common import quiet_third_party_logs

    quiet_third_party_logs()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_setup = time.perf_counter()
    model, images, prompts, demo, schedule, device, precision, mode_name = setup(args)
    setup_s = time.perf_counter() - t_setup
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    small = mode_name == "tiny"
    B = args.batch_size or (4 if small else 32)
    RB = args.ref_batch_size or (4 if small else 32)
    compile = args.compile if args.compile is not None else device.type == "cuda"
    schedule.validate(len(prompts), model.num_train_timesteps)
    from diffcls.runtime.algorithm.scoring import make_noise_bank

    size = images[0].shape[-1]
    latent_shape = model.latent_shape(size)
    bank = make_noise_bank(schedule, latent_shape, args.seed)
    evals_per_image = schedule.evals_upper_bound(len(prompts), model.num_train_timesteps)
    print(f"[{mode_name}] {len(images)} images, {len(prompts)} prompts, {schedule.describe()}, "
          f"{evals_per_image} UNet evals/image, device {device}, {precision}, diffcls batch {B} "
          f"(compile={compile}), reference batch {RB}; setup {setup_s:.1f} s", flush=True)

    if args.backend == "onnxruntime" and (device.type != "cpu" or compile):
        raise SystemExit("--backend onnxruntime is for the CPU modes without --compile; on a GPU run bench/bench_ort_gpu.py")
    if args.compile_only:  # the second process of --cache-check
        return compile_only(model, device, precision, B, compile)
    model.to(device, dtype)
    flops = unet_flops(model.unet, latent_shape, model.hidden_size, model.max_length, device, dtype)
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    print(f"UNet forward: {flops / 1e9:.1f} GFLOP per sample; matmul peak {peak / 1e12:.1f} TFLOP/s "
          f"-> ceiling {peak / flops:.0f} evals/s", flush=True)

    ref = None
    if not args.skip_reference:
        ref = run_reference(model, images, prompts, schedule, bank, device, dtype, RB)
        print(f"reference: {ref['wall_s'] / len(images):.2f} s/image, "
              f"{ref['unet_evals'] / ref['unet_s']:.0f} UNet evals/s (UNet time), "
              f"batch fill {100 * ref['mean_batch_fill']:.1f}%", flush=True)

    # diffcls variants, one engine set per compile setting (the compiled UNet is reused by the
    # adaptive run); "eager" must come before "compiled": compiling fuses QKV in place
    variants = [v for v in (args.variants or ("eager,compiled,adaptive" if device.type == "cuda" else "eager")).split(",") if v]
    unknown = set(variants) - {"eager", "compiled", "adaptive"}
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)} (eager, compiled, adaptive)")
    if args.compile is not None:  # the old single-run flag: --compile / --no-compile
        variants = ["compiled" if args.compile else "eager"] + (["adaptive"] if "adaptive" in variants else [])
    if args.backend == "onnxruntime":
        variants = ["eager"] + (["adaptive"] if "adaptive" in variants else [])
    runs: dict[str, dict] = {}
    engines = facts = None
    for name in variants:
        if name in ("eager", "compiled"):
            engines, facts = open_diffcls(model, images, prompts, device, precision, B, name == "compiled", args.backend)
            runs[name] = run_diffcls(engines, facts, images, prompts, schedule, bank, device, B)
        else:
            if engines is None:
                engines, facts = open_diffcls(model, images, prompts, device, precision, B, False, args.backend)
            from diffcls.runtime.algorithm.schedule import AdaptiveSchedule

            runs[name] = run_diffcls(engines, {**facts, "on": "compiled" if "compiled" in runs else "eager"},
                                     images, prompts, AdaptiveSchedule(), None, device, B, seed=args.seed)
        r = runs[name]
        print(f"diffcls {name} ({args.backend}): {r['wall_s'] / len(images):.2f} s/image, "
              f"{r['unet_evals'] / len(images):.0f} evals/image, "
              f"{r['unet_evals'] / r['unet_s']:.0f} UNet evals/s (UNet time), padding "
              f"{100 * r['padding_fraction']:.2f}%, first UNet calls {r['compile_s']:.1f} s", flush=True)
    vae = None
    if engines is not None and args.vae_check:
        vae = vae_check(model, engines, images, device)
        print(f"VAE on {device}: engine dtype {vae['vae_engine_dtype']} (force_upcast={vae['force_upcast']}), "
              f"max |latent - CPU fp32 latent| {vae['max_abs_diff_vs_cpu_fp32']:.3g} "
              f"(relative {vae['rel_diff']:.2g})", flush=True)
    fixed = [n for n in ("compiled", "eager") if n in runs]
    ours = runs[fixed[0]] if fixed else next(iter(runs.values()))

    def summarize(r):
        if r is None:
            return None
        d = {k: v for k, v in r.items() if k not in ("errors",)}
        d["s_per_image"] = r["wall_s"] / len(images)
        d["images_per_s"] = len(images) / r["wall_s"]
        d["evals_per_image"] = r["unet_evals"] / len(images)
        d["unet_evals_per_s"] = r["unet_evals"] / r["unet_s"] if r["unet_s"] else None
        d["end_to_end_evals_per_s"] = r["unet_evals"] / r["wall_s"]
        d["fraction_of_ceiling"] = d["unet_evals_per_s"] * flops / peak if d["unet_evals_per_s"] else None
        return d

    report = {
        "mode": mode_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "precision": precision,
        "model": model.source,
        "text_encoder_layers": args.text_layers if mode_name == "sd21" else None,
        "n_images": len(images),
        "n_prompts": len(prompts),
        "schedule": {"n_samples": list(schedule.n_samples), "to_keep": list(schedule.to_keep), "n_trials": schedule.n_trials, "loss": schedule.loss},
        "evals_per_image": evals_per_image,
        "unet_gflop_per_eval": flops / 1e9,
        "matmul_peak_tflops": peak / 1e12,
        "ceiling_evals_per_s": peak / flops,
        "diffcls_batch_size": B,
        "reference_batch_size": RB,
        "compile": fixed[0] == "compiled" if fixed else None,
        "backend": args.backend,
        "reference": summarize(ref),
        "diffcls": summarize(ours),  # the first of compiled, eager that ran
        "variants": {n: summarize(r) for n, r in runs.items()},
        "vae": vae,
    }
    if ref is not None:
        report["speedup_end_to_end"] = ref["wall_s"] / ours["wall_s"]
        report["speedup_unet_evals_per_s"] = (ours["unet_evals"] / ours["unet_s"]) / (ref["unet_evals"] / ref["unet_s"])
        report["agreement"] = compare(ref, ours)
        for n, r in runs.items():
            report["variants"][n]["agreement"] = compare(ref, r) if n != "adaptive" else {
                "predictions_agree": r["predictions"] == ref["predictions"],
                "n_agree": sum(a == b for a, b in zip(r["predictions"], ref["predictions"])),
                "n_images": len(images),
            }
            report["variants"][n]["speedup_end_to_end"] = ref["wall_s"] / r["wall_s"]
        a = report["agreement"]
        print(f"speed-up {report['speedup_end_to_end']:.2f}x end to end; predictions agree on "
              f"{a['n_agree']}/{a['n_images']} images; max |error diff| {a['max_abs_error_diff']}", flush=True)
    if demo is not None:
        labels, facts = demo
        classidx = facts["classidx"]
        for name, r, d in (("reference", ref, report["reference"]), *((n, r, report["variants"][n]) for n, r in runs.items())):
            if r is not None:
                correct = [classidx[p] == y for p, y in zip(r["predictions"], labels) if y is not None]
                d["accuracy"] = sum(correct) / len(correct) if correct else None
                if r is ours:
                    report["diffcls"]["accuracy"] = d["accuracy"]
    if args.cache_check and compile:
        report["second_process"] = second_process_compile(argv if argv is not None else sys.argv[1:])
        print(f"second process: UNet compile+capture {report['second_process'].get('compile_s')} s "
              f"(first: {ours['compile_s']:.1f} s), inductor counters {report['second_process'].get('inductor')}", flush=True)
    out = args.json or (Path(os.environ["OUT"]) / "bench_speed.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
