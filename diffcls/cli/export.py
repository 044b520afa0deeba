"""`diffcls export`: a model -> an engine directory (ONNX Runtime sessions or TensorRT engines)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, out, user_errors
from diffcls.cli.settings import shared
from diffcls.config import ExportBackend, ExportPrecision, parse_device, parse_ints


ModelOpt, ConfigOpt, ImageSizeOpt = shared("model"), shared("config"), shared("image_size")  # as classify declares them


@app.command("export")
def export_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Engine directory to write (created; stale parts are rebuilt).")] = Path("engines"),
    model: ModelOpt = None,
    config: ConfigOpt = None,
    no_t5: Annotated[bool, typer.Option("--no-t5", help="SD3/3.5: export without the T5-XXL text encoder (zeros in its place, as diffusers with text_encoder_3 set to None); classify with these engines as with `--no-t5`.")] = False,
    backend: Annotated[ExportBackend, typer.Option("--backend", help="What the engines are for (torch runs a model itself and needs no export).")] = ExportBackend.onnxruntime,
    precision: Annotated[ExportPrecision, typer.Option("--precision", help="auto = fp16 for TensorRT and ONNX Runtime on CUDA, else fp32 (bf16 runs only on the torch backend).")] = ExportPrecision.auto,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batch sizes the engines accept (TensorRT: one profile each), e.g. 8,16,32.")] = "8,16,32",
    vae_batch_size: Annotated[int, typer.Option("--vae-batch-size", min=1, help="The VAE encoder's batch size (the runtime encodes images this many at a time).")] = 8,
    text_batch_size: Annotated[Optional[int], typer.Option("--text-batch-size", min=1, help="The text encoder's batch size (default: the model's prompt count rounded up to 8, else 16).")] = None,
    image_size: ImageSizeOpt = None,
    optimize: Annotated[Optional[bool], typer.Option("--optimize/--no-optimize", help="ONNX Runtime UNet fusion (attention, GroupNorm, ...); default on for fp16 on CUDA.")] = None,
    device: Annotated[str, typer.Option("--device", help="Where exported graphs are checked against torch: auto (cuda if usable), cpu, cuda or cuda:N.")] = "auto",
    workspace_gb: Annotated[float, typer.Option("--workspace-gb", min=0.1, help="TensorRT builder workspace memory limit.")] = 8.0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild everything, even fresh parts; also replaces another model's engines in --out.")] = False,
) -> None:
    """Export the model's networks to ONNX (and TensorRT), checked against torch: SD's text encoder, VAE encoder and UNet; a DiT's VAE encoder and transformer."""
    from diffcls.export import ExportConfig, SpinnerReporter, export_model
    from diffcls.runtime.results.outputs import output_errors

    with user_errors():
        cfg = ExportConfig(
            out=out_dir, model=model, config=config, no_t5=no_t5, backend=backend.value, device=parse_device(device),
            precision=None if precision == ExportPrecision.auto else precision.value, optimize=optimize, workspace_gb=workspace_gb,
            batch_sizes=parse_ints(batch_sizes, "--batch-sizes", example="8,16,32"), vae_batch_size=vae_batch_size,
            text_batch_size=text_batch_size, image_size=image_size, force=force,
        )
        with SpinnerReporter(console) as report, output_errors("--out", out_dir):  # a full disk: one line; finished parts are kept
            result = export_model(cfg, report)
        out.print(result.summary())
        out.print(f"classify with: diffcls classify FOLDER --engines {result.engine_dir}")
