"""Shared by the export/onnxruntime tests: the tiny model, saved once and exported once per session.

Self-contained (no conftest fixtures): each test module wraps these in its own fixtures, and the
work is cached per process so the modules share one export.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

BATCH_SIZES = (2, 4)
IMAGE_SIZE = 16
_ROOT = Path(tempfile.mkdtemp(prefix="diffcls-export-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


@functools.lru_cache(maxsize=None)
def tiny():
    from diffcls.models import tiny_model

    return tiny_model(seed=0)


@functools.lru_cache(maxsize=None)
def tiny_dir() -> Path:
    from diffcls.models.tiny import save_model

    return save_model(tiny(), _ROOT / "tiny")


@functools.lru_cache(maxsize=None)
def exported_dir() -> Path:
    """The tiny model exported to ONNX fp32 (batch sizes 2, 4; 16 px), built once per session."""
    from diffcls.export import ExportConfig, export_model

    out = _ROOT / "engines_fp32"
    export_model(ExportConfig(out=out, model=tiny_dir(), batch_sizes=BATCH_SIZES, image_size=IMAGE_SIZE, device="cpu"))
    return out


def copy_of(engine_dir: Path, dest: Path) -> Path:
    """A private copy to break (delete, corrupt) without touching the shared export."""
    shutil.copytree(engine_dir, dest)
    return dest
