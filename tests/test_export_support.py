"""Shared by the export/onnxruntime tests: one fp32 export of the tiny model per test session.

(Not a conftest fixture: conftest.py belongs to the runtime tests; this module holds no tests.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

BATCH_SIZES = (2, 4)
IMAGE_SIZE = 16
_CACHE: dict[str, Path] = {}


def exported_dir(tiny_dir: Path, root: Path) -> Path:
    """The tiny model exported to ONNX fp32 (batch sizes 2, 4; 16 px), built once per session."""
    from diffcls.export import ExportConfig, export_model

    key = str(tiny_dir)
    if key not in _CACHE:
        out = Path(root) / "engines_fp32"
        export_model(ExportConfig(out=out, model=tiny_dir, batch_sizes=BATCH_SIZES, image_size=IMAGE_SIZE, device="cpu"))
        _CACHE[key] = out
    return _CACHE[key]


def copy_of(engine_dir: Path, dest: Path) -> Path:
    """A private copy to break (delete, corrupt) without touching the shared export."""
    shutil.copytree(engine_dir, dest)
    return dest
