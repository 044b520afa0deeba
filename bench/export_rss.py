"""Peak memory of exporting one component of an SD-2.1-base-size model (run under /usr/bin/time -v).

    /usr/bin/time -v python bench/export_rss.py /tmp/sd21 /tmp/eng16 --component unet --precision fp16

Runs `diffcls.export.export_model` for that component only, as the full export reaches it: the
components exported before it have had their torch weights freed. Prints the export's lines.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--component", default="unet", choices=("text_encoder", "vae_encoder", "unet"))
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16"))
    p.add_argument("--image-size", type=int, help="input size S (default: the model's; the weights' memory does not depend on it)")
    p.add_argument("--phases", action="store_true", help="print `phase: NAME` as each step starts (bench/sdxl_memory.py watch splits the peak by them)")
    args = p.parse_args(argv)

    from diffcls.export import ExportConfig, export_model
    from diffcls.export import pipeline

    order = ("text_encoder", "vae_encoder", "unet")
    load = pipeline.load_model

    def load_as_the_full_export_has_it(path, **kw):
        model = load(path, **kw)
        model.fingerprint()  # what export_model computes first
        for earlier in order[: order.index(args.component)]:
            pipeline.free_component(model, earlier)
        return model

    pipeline.load_model = load_as_the_full_export_has_it
    # this component only; the manifest lists just it
    pipeline.exported_components = lambda specs: [args.component]
    if args.phases:
        mark_phases(pipeline)
    cfg = ExportConfig(out=args.out, model=args.model, precision=args.precision, device="cpu", force=True, image_size=args.image_size)
    export_model(cfg, lambda e: print(f"{e.step}: {e.message or e.status}", flush=True))


def mark_phases(pipeline) -> None:
    """Print `phase: NAME` when each step of the export starts (and `phase: after NAME` when it ends)."""
    ox = pipeline.ox
    steps = {"load": (pipeline, "load_model"), "torch reference": (ox, "reference_pair"), "torch export": (ox, "export_onnx"),
             "free torch weights": (pipeline, "free_component"), "fp16 conversion": (ox, "convert_fp16"),
             "parity check": (ox, "check_against_reference")}
    for name, (owner, attr) in steps.items():
        fn = getattr(owner, attr)

        def marked(*a, _fn=fn, _name=name, **kw):
            print(f"phase: {_name}", flush=True)
            try:
                return _fn(*a, **kw)
            finally:
                print(f"phase: after {_name}", flush=True)

        setattr(owner, attr, marked)


if __name__ == "__main__":
    main()
