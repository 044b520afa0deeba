"""`diffcls info [PATH]`: installed backends and devices; what a model or an engine directory holds
(the data is `diffcls.engines.describe`'s and `diffcls.models.describe`'s; this prints it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, out, user_errors


def print_model(path: Path) -> None:
    from rich.table import Table

    from diffcls.export.pipeline import human_size
    from diffcls.models.describe import describe_model

    d = describe_model(path)
    if d["kind"] == "checkpoint":
        out.print(f"\ncheckpoint {d['path']} ({human_size(d['bytes'])}): {d['model_type']}")
    else:
        out.print(
            f"\nmodel directory {d['path']} ({d.get('model_kind', 'stable-diffusion')}): prediction type {d['prediction_type']}, default image size "
            f"{d['default_image_size']}, {d['num_train_timesteps']} train timesteps ({d['scheduler']}"
            + (f", shift {d['shift']:g})" if d.get("shift") is not None else ")")
        )
        if d.get("dynamic_shift"):
            s = d["dynamic_shift"]
            out.print(f"sigmas shifted by image size as the pipeline does: mu {s['base_shift']:g} at {s['base_image_seq_len']} to "
                      f"{s['max_shift']:g} at {s['max_image_seq_len']} image tokens (mu {s['mu_at_default_size']:g} at the default size)")
        if d.get("model_kind") == "flux":
            g = d.get("guidance")
            out.print(f"guidance embedding: fed {g:g} (the pipeline's default)" if g is not None else "guidance embedding: none (not guidance-distilled)")
    table = Table()
    for col in ("component", "class", "parameters", "size"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("component", "class") else "right")
    for name, c in d["components"].items():
        table.add_row(name, str(c["class"] or "-"), f"{c['parameters'] / 1e6:,.1f} M", human_size(c["bytes"]) if c["bytes"] is not None else "-")
    out.print(table)
    if d["kind"] == "directory":
        out.print("weights: " + ", ".join(f for c in d["components"].values() for f in c["files"]))
        out.print(f"export engines with: diffcls export --model {path} --out ENGINES")


def print_engine_dir(path: Path) -> None:
    from rich.table import Table

    from diffcls.engines.describe import engine_dir_rows, files_text, model_kind_line, status_lines
    from diffcls.export.pipeline import human_size

    manifest, rows = engine_dir_rows(path)
    out.print(
        f"\nengine directory {path}: backend {manifest.get('backend')}, model {manifest.get('source')} "
        f"(fingerprint {manifest.get('fingerprint')}), image size {manifest.get('image_size')}"
    )
    for line in [model_kind_line(manifest), *status_lines(path, manifest)]:
        out.print(line)
    # short headers and no wrapping: the table fits 80 columns (file names are listed below it)
    table = Table()
    for col in ("component", "prec", "batches", "size", "abs err", "rel err", "status"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("component", "status") else "right")

    def err(x):
        return f"{x:.2g}" if x is not None else "-"

    for r in rows:  # no batch sizes recorded: dynamic ONNX graphs take any
        batches = ",".join(map(str, r["batch_sizes"] or [])) or "any"
        table.add_row(r["component"], str(r["precision"]), batches, human_size(r["bytes"]), err(r["max_abs_err"]), err(r["max_rel_err"]), r["status"])
    out.print(table)
    out.print("files: " + ", ".join(files_text(r) for r in rows) + "; errors: largest difference from torch on random inputs")


@app.command("info")
def info_cmd(
    path: Annotated[Optional[Path], typer.Argument(help="A model to describe (diffusers directory, checkpoint file, cached org/name, demo, demo-dit) or an engine directory from diffcls export.", metavar="PATH", show_default=False)] = None,
) -> None:
    """Show installed backends, ONNX Runtime providers, torch/CUDA, and what an engine or model directory holds."""
    from diffcls.engines.describe import environment, is_model

    with user_errors():
        env = environment()
        out.print(f"torch {env['torch']} (CUDA {env['cuda'] or 'none'}; GPU: {env['gpu'] or 'none'})")
        out.print("backends: " + ", ".join(f"{b} ({'installed' if ok else 'not installed'})" for b, ok in env["backends"].items()))
        if env["onnxruntime"]:
            out.print(f"onnxruntime {env['onnxruntime']}, providers: {', '.join(env['ort_providers'])}")
        out.print(f"tensorrt: {env['tensorrt'] or 'not installed'}")
        if path is not None and is_model(path):
            print_model(path)
        elif path is not None:
            print_engine_dir(path)
