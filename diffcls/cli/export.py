"""`diffcls export`: a model -> an engine directory (ONNX Runtime sessions or TensorRT engines)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, console, out, user_errors
from diffcls.cli.settings import parse_ints
from diffcls.config import Backend, Precision, parse_device
from diffcls.errors import DiffclsError


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    sizes = parse_ints(text, "--batch-sizes", example="8,16,32")
    if min(sizes) < 1:
        raise DiffclsError(f"--batch-sizes {text!r} must be positive integers, e.g. --batch-sizes 8,16,32")
    return sizes


class _Reporter:
    """Renders `StepEvent`s: a spinner while a step runs, one line when it ends."""

    def __init__(self, progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, event) -> None:
        if event.status == "start":
            self.tasks[event.step] = self.progress.add_task(event.step, total=None)
            return
        task = self.tasks.pop(event.step, None)
        if task is not None:
            self.progress.remove_task(task)
        style = {"done": "green", "cached": "cyan"}.get(event.status, "")
        text = event.message or event.status
        self.progress.console.print(f"[bold]{event.step}[/bold]: [{style}]{text}[/{style}]" if style else f"{event.step}: {text}")


class ExportBackend(str, Enum):
    """The backends an export is for (config.Backend without auto and torch)."""

    onnxruntime = Backend.onnxruntime.value
    tensorrt = Backend.tensorrt.value


class ExportPrecision(str, Enum):
    """The precisions an export can have (config.Precision without bf16)."""

    auto = Precision.auto.value
    fp32 = Precision.fp32.value
    fp16 = Precision.fp16.value


@app.command("export")
def export_cmd(
    out_dir: Annotated[Path, typer.Option("--out", help="Engine directory to write (created; stale parts are rebuilt).")] = Path("engines"),
    model: Annotated[Optional[Path], typer.Option("--model", help="Diffusers model directory (Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 or DiT), Hugging Face model id from the local cache (org/name), checkpoint file (SD 1.x/2.x, SDXL), or a bundled model: demo (the default, SD), demo-dit, demo-shapes or demo-flow.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="For a checkpoint --model: the diffusers directory or cached model id whose configs describe it (needed for SD 2.x and SDXL).")] = None,
    no_t5: Annotated[bool, typer.Option("--no-t5", help="SD3/3.5: export without the T5-XXL text encoder (zeros in its place, as diffusers with text_encoder_3=None); classify with these engines as with `--no-t5`.")] = False,
    backend: Annotated[ExportBackend, typer.Option("--backend", help="What the engines are for (torch runs a model itself and needs no export).")] = ExportBackend.onnxruntime,
    precision: Annotated[ExportPrecision, typer.Option("--precision", help="auto = fp16 for TensorRT and ONNX Runtime on CUDA, else fp32 (bf16 runs only on the torch backend).")] = ExportPrecision.auto,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Batch sizes the engines accept (TensorRT: one profile each), e.g. 8,16,32.")] = "8,16,32",
    vae_batch_size: Annotated[int, typer.Option("--vae-batch-size", min=1, help="The VAE encoder's batch size (the runtime encodes images this many at a time).")] = 8,
    text_batch_size: Annotated[Optional[int], typer.Option("--text-batch-size", min=1, help="The text encoder's batch size (default: the model's prompt count rounded up to 8, else 16).")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", min=8, help="Input resolution S (default: the model's, 512 for SD 2.x base).")] = None,
    optimize: Annotated[Optional[bool], typer.Option("--optimize/--no-optimize", help="ONNX Runtime UNet fusion (attention, GroupNorm, ...); default on for fp16 on CUDA.")] = None,
    device: Annotated[str, typer.Option("--device", help="Where exported graphs are checked against torch: auto (cuda if usable), cpu, cuda or cuda:N.")] = "auto",
    workspace_gb: Annotated[float, typer.Option("--workspace-gb", min=0.1, help="TensorRT builder workspace memory limit.")] = 8.0,
    force: Annotated[bool, typer.Option("--force", help="Rebuild everything, even fresh parts; also replaces another model's engines in --out.")] = False,
) -> None:
    """Export the model's networks to ONNX (and TensorRT), checked against torch: SD's text encoder, VAE encoder and UNet; a DiT's VAE encoder and transformer."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from diffcls.export import ExportConfig, export_model

    with user_errors():
        if config is not None and model is None:
            raise DiffclsError("--config describes a checkpoint file; pass it with --model FILE")
        if config is not None or no_t5:
            from diffcls.models.loading import load_model

            model = load_model(model, config=config, no_t5=no_t5)
        cfg = ExportConfig(
            out=out_dir,
            model=model,
            backend=backend.value,
            precision=None if precision == ExportPrecision.auto else precision.value,
            batch_sizes=parse_batch_sizes(batch_sizes),
            vae_batch_size=vae_batch_size,
            text_batch_size=text_batch_size,
            image_size=image_size,
            optimize=optimize,
            device=parse_device(device),
            workspace_gb=workspace_gb,
            force=force,
        )
        progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), TimeElapsedColumn(), console=console, transient=True)
        from diffcls.runtime.results.outputs import output_errors

        with progress, output_errors("--out", out_dir):  # a full disk: one line; finished parts are kept
            result = export_model(cfg, _Reporter(progress))
        out.print(result.summary())
        out.print(f"classify with: diffcls classify FOLDER --engines {result.engine_dir}")
