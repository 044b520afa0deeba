"""`diffcls info [PATH]`: installed backends and devices; what a model or an engine directory holds
(the data is `diffcls.engines.describe`'s and `diffcls.models.describe`'s; this prints it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, out, table, user_errors


def print_model(path: Path) -> None:
    from diffcls.export.pipeline import human_size
    from diffcls.models.describe import describe_model, model_notes

    d = describe_model(path)
    if d["kind"] == "checkpoint":
        out.print(f"\ncheckpoint {d['path']} ({human_size(d['bytes'])}): {d['model_type']}")
    else:
        out.print(
            f"\nmodel directory {d['path']} ({d.get('model_kind', 'stable-diffusion')}): prediction type {d['prediction_type']}, default image size "
            f"{d['default_image_size']}, {d['num_train_timesteps']} train timesteps ({d['scheduler']}"
            + (f", shift {d['shift']:g})" if d.get("shift") is not None else ")")
        )
        for line in model_notes(d):
            out.print(line)
    rows = [(name, str(c["class"] or "-"), f"{c['parameters'] / 1e6:,.1f} M", human_size(c["bytes"]) if c["bytes"] is not None else "-")
            for name, c in d["components"].items()]
    out.print(table(("component", "class", "parameters", "size"), rows, left=("component", "class")))
    if d["kind"] == "directory":
        out.print("weights: " + ", ".join(f for c in d["components"].values() for f in c["files"]))
        out.print(f"export engines with: diffcls export --model {path} --out ENGINES")


def print_engine_dir(path: Path) -> None:
    from diffcls.engines.describe import engine_dir_line, engine_dir_rows, files_text, model_kind_line, status_lines
    from diffcls.export.pipeline import human_size

    manifest, rows = engine_dir_rows(path)
    for line in ["\n" + engine_dir_line(path, manifest), model_kind_line(manifest), *status_lines(path, manifest)]:
        out.print(line)

    def err(x):
        return f"{x:.2g}" if x is not None else "-"

    # short headers and no wrapping: the table fits 80 columns (file names are listed below it);
    # no batch sizes recorded: dynamic ONNX graphs take any
    cells = [(r["component"], str(r["precision"]), ",".join(map(str, r["batch_sizes"] or [])) or "any", human_size(r["bytes"]),
              err(r["max_abs_err"]), err(r["max_rel_err"]), r["status"]) for r in rows]
    out.print(table(("component", "prec", "batches", "size", "abs err", "rel err", "status"), cells, left=("component", "status")))
    out.print("files: " + ", ".join(files_text(r) for r in rows) + "; errors: largest difference from torch on random inputs")


@app.command("info")
def info_cmd(
    path: Annotated[Optional[Path], typer.Argument(help="A model to describe (diffusers directory, checkpoint file, cached org/name, demo, demo-dit) or an engine directory from diffcls export.", metavar="PATH", show_default=False)] = None,
) -> None:
    """Show installed backends, ONNX Runtime providers, torch/CUDA, and what an engine or model directory holds."""
    from diffcls.engines.describe import environment, environment_lines, is_model

    with user_errors():
        for line in environment_lines(environment()):
            out.print(line)
        if path is not None and is_model(path):
            print_model(path)
        elif path is not None:
            print_engine_dir(path)
