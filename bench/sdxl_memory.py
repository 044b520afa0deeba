"""Export memory of SDXL-shaped UNets of growing depth, under a watchdog (the machine is shared).

    python bench/sdxl_memory.py build /tmp/sdxl-k1 --deep-layers 1     # SDXL's UNet with 1 transformer layer per deepest block
    python bench/sdxl_memory.py watch --limit-gb 14 --log /tmp/k1.tsv -- \\
        python bench/export_rss.py /tmp/sdxl-k1 /tmp/eng-k1 --component unet --precision fp16 --image-size 256

`build` writes a diffusers `StableDiffusionXLPipeline` directory with random weights: SDXL base's
UNet config exactly (channels 320/640/1280, attention heads, 2048-wide cross-attention,
`text_time` additions) except `transformer_layers_per_block` = (1, 2, K) (SDXL: K = 10, 2.57 B
parameters); the text encoders have SDXL's widths (768, 1280; so the UNet's conditioning is
SDXL's) but one layer each, and the VAE is SD's (84 M): only the UNet's export is measured.

`watch` runs a command, sums the resident memory of its process tree every 0.2 s from /proc,
kills the tree when it passes `--limit-gb` (GB = 10^9 bytes), and prints the peak overall and
per phase (the child's lines `phase: NAME`, which `export_rss.py --phases` prints).

`session` opens an exported graph as diffcls's ONNX Runtime engines do on a CPU, once (what a
second run pays for the UNet after the export: no fingerprinting, see bench/startup.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    transformer_layers_per_block=(1, 2, 10), norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
)


def build(out: Path, deep_layers: int, seed: int = 0) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffcls.models.noising import noise_from_scheduler_config
    from diffcls.models.packed import MultiTokenizer
    from diffcls.models.sdxl import SDXLModel, save_sdxl_directory
    from diffcls.models.tiny import TinyConfig, scheduler_config
    from diffcls.models.tokenizer import build_tokenizer
    from sd21 import SD21_VAE

    tok = build_tokenizer(["a", "photo", "of", "cat", "dog"], 77)

    def clip(width: int, cls):
        return cls(CLIPTextConfig(vocab_size=49408, hidden_size=width, projection_dim=width, intermediate_size=4 * width,
                                  num_hidden_layers=1, num_attention_heads=width // 64, max_position_embeddings=77,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))

    torch.manual_seed(seed)
    cfg = {**SDXL_UNET, "transformer_layers_per_block": (1, 2, deep_layers)}
    unet = UNet2DConditionModel(**cfg)
    sched = {**scheduler_config(TinyConfig()), "_class_name": "EulerDiscreteScheduler"}
    alphas, prediction_type, _ = noise_from_scheduler_config(sched, "SDXL-shaped")
    model = SDXLModel(MultiTokenizer({"tokenizer": tok, "tokenizer_2": tok}, {"tokenizer": 77, "tokenizer_2": 77}),
                      clip(768, CLIPTextModel), clip(1280, CLIPTextModelWithProjection), unet,
                      AutoencoderKL(**{**SD21_VAE, "sample_size": 1024, "scaling_factor": 0.13025}), alphas,
                      prediction_type=prediction_type)
    # in 1 GB shards: safetensors serialises a shard in memory before writing it (one 10 GB shard
    # beside SDXL's 10 GB of fp32 weights would not fit the shared machine)
    unet.save_pretrained = functools.partial(unet.save_pretrained, max_shard_size="1GB")
    save_sdxl_directory(model, out, sched)
    n = sum(p.numel() for p in unet.parameters())
    print(json.dumps({"out": str(out), "deep_layers": deep_layers, "unet_parameters": n, "unet_fp32_gb": round(4 * n / 1e9, 3)}))


def session(onnx_path: Path, threads: int) -> None:
    """Open the exported graph as diffcls's ONNX Runtime engines do on a CPU (`engines.ort_backend`:
    all graph optimisations, no spinning) and print the seconds and this process's RSS after."""
    import onnxruntime as ort

    t = time.perf_counter()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    seconds = time.perf_counter() - t
    rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    print(json.dumps({"onnx": str(onnx_path), "session_s": round(seconds, 1), "rss_gb": round(rss / 1e9, 2),
                      "inputs": [i.type for i in sess.get_inputs()]}))


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and every descendant (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            total += int(open(f"/proc/{pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            pass
    return total


def watch(cmd: list[str], limit_gb: float, log: Path | None) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    phase, peaks, t0 = ["start"], {}, time.time()

    def read():
        for line in proc.stdout:
            sys.stdout.write(f"[{time.time() - t0:7.1f}s] {line}")
            sys.stdout.flush()
            if line.startswith("phase: "):
                phase[0] = line[7:].strip()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = False
    out = open(log, "w") if log else None
    while proc.poll() is None:
        rss = tree_rss(proc.pid)
        peaks[phase[0]] = max(peaks.get(phase[0], 0), rss)
        if out:
            out.write(f"{time.time() - t0:.1f}\t{rss}\t{phase[0]}\n")
        if rss > limit_gb * 1e9:
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    rc = proc.wait()
    reader.join(timeout=5)
    if out:
        out.close()
    print(json.dumps({"peak_gb": round(max(peaks.values(), default=0) / 1e9, 2), "killed_over_limit": killed, "rc": rc,
                      "wall_s": round(time.time() - t0, 1), "phases_gb": {k: round(v / 1e9, 2) for k, v in peaks.items()}}))
    return 1 if killed else rc


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--deep-layers", type=int, default=10, help="transformer layers per block at the deepest level (SDXL: 10)")
    b.add_argument("--seed", type=int, default=0)
    o = sub.add_parser("session")
    o.add_argument("onnx", type=Path)
    o.add_argument("--threads", type=int, default=1)
    w = sub.add_parser("watch")
    w.add_argument("--limit-gb", type=float, default=14.0)
    w.add_argument("--log", type=Path)
    w.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args.out, args.deep_layers, args.seed)
    elif args.cmd == "session":
        session(args.onnx, args.threads)
    else:
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        sys.exit(watch(cmd, args.limit_gb, args.log))


if __name__ == "__main__":
    main()
