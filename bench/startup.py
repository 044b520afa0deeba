"""Startup cost on an SD-2.1-base-sized model (random weights): what a run pays before its first image.

    python bench/startup.py build /tmp/sd21                 # save a random-weight SD-2.1-base-shaped diffusers dir
    python bench/startup.py time --model /tmp/sd21          # torch backend: load + fingerprint
    python bench/startup.py time --model /tmp/sd21 --engines /tmp/sd21-eng   # ORT engines + --model check

Each `time` run is one fresh process (run it twice: the second run is what a returning user
pays). Prints one JSON line: seconds for `Classifier.from_pretrained` and how it split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(out: Path, seed: int) -> None:
    from bench_speed import sd21_model

    from diffcls.models.tiny import TinyConfig, scheduler_config

    model = sd21_model(torch.device("cpu"), seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save_pretrained(str(out / "tokenizer"))
    model.text_encoder.save_pretrained(str(out / "text_encoder"))
    model.vae.save_pretrained(str(out / "vae"))
    model.unet.save_pretrained(str(out / "unet"))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(TinyConfig())))
    print(f"saved {out}")


def time_startup(model: str, engines: str | None) -> dict:
    from diffcls.runtime.execution.classifier import Classifier

    t_import = time.perf_counter() - T0
    t = time.perf_counter()
    if engines:
        clf = Classifier.from_pretrained(model, backend="onnxruntime", engine_dir=engines, use_cache=False)
    else:
        clf = Classifier.from_pretrained(model, backend="torch", use_cache=False)
    t_open = time.perf_counter() - t
    return {
        "backend": clf.engines.backend,
        "fingerprint": clf.engines.fingerprint,
        "import_s": round(t_import, 2),
        "from_pretrained_s": round(t_open, 2),
        "total_s": round(time.perf_counter() - T0, 2),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("time")
    t.add_argument("--model", required=True)
    t.add_argument("--engines")
    t.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.cmd == "build":
        build(args.out, args.seed)
    else:
        torch.set_num_threads(args.threads)
        print(json.dumps(time_startup(args.model, args.engines)))


if __name__ == "__main__":
    main()
