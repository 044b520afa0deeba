"""`diffcls info [PATH]`: installed backends and devices; what a model or an engine directory holds
(the data is `diffcls.engines.describe`'s and `diffcls.models.describe`'s; this prints it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from diffcls.cli.common import app, out, user_errors
from diffcls.cli.settings import shared
from diffcls.errors import DiffclsError

ConfigOpt = shared("config")  # as classify declares it


@app.command("info")
def info_cmd(
    path: Annotated[Optional[Path], typer.Argument(help="A model to describe (diffusers directory, checkpoint file, cached org/name, demo, demo-dit) or an engine directory from diffcls export.", metavar="PATH", show_default=False)] = None,
    config: ConfigOpt = None,
) -> None:
    """Show installed backends, ONNX Runtime providers, torch/CUDA, and what an engine or model directory holds
    (a checkpoint file with --config: the model it loads as)."""
    from diffcls.engines.describe import engine_dir_view, environment, environment_lines, is_model
    from diffcls.models.describe import model_view

    with user_errors():
        for line in environment_lines(environment()):
            out.print(line)
        if path is not None:
            if config is not None and not is_model(path):
                raise DiffclsError(f"--config describes a checkpoint file; {path} is an engine directory, drop --config")
            out.print(model_view(path, config) if is_model(path) else engine_dir_view(path))
