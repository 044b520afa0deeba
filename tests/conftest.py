"""Shared fixtures: tiny SD-shaped models built from configs, generated images. No network."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the remembered file hashes and fingerprints (diffcls.models.filehash) of this test session, not the user's
if "DIFFCLS_CACHE" not in os.environ:
    import tempfile

    os.environ["DIFFCLS_CACHE"] = tempfile.mkdtemp(prefix="diffcls-test-cache-")
# one thread: tiny models are overhead-bound, and two threads on a busy 2-core box stall badly;
# the environment variable is what the CLI's thread choice (engines.fastpath) honours
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny():
    from diffcls.models import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny):
    """The tiny model saved as a diffusers directory (what `--model DIR` reads)."""
    from diffcls.models.tiny import save_model

    return save_model(tiny, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    """A tiny random class-conditional DiT saved as a DiTPipeline directory (16 px, 5 classes)."""
    from diffcls.models.dit import dit_scheduler_config, save_dit_directory, tiny_dit

    return save_dit_directory(tiny_dit(seed=0), tmp_path_factory.mktemp("models") / "tiny-dit", dit_scheduler_config())


@pytest.fixture(scope="session")
def tiny_engines(tiny):
    from diffcls.engines import open_engines

    return open_engines("torch", model=tiny, device="cpu")


def assert_one_line_error(result, *fragments):
    """A CLI run that failed the way user errors must: exit code 2, exactly one `error:` line
    holding every fragment, and no traceback."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def random_image(seed: int, size=(20, 24), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


@pytest.fixture
def image_folder(tmp_path):
    """Two class subfolders (cat, dog) with three generated PNGs each."""
    root = tmp_path / "images"
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            random_image(10 * c + i).save(root / cls / f"{i}.png")
    return root


# --- exported engines (ONNX fp32 of the tiny model), built once per session -----------------
EXPORT_BATCH_SIZES = (2, 4)
EXPORT_IMAGE_SIZE = 16


@pytest.fixture(scope="session")
def engine_dir(tmp_path_factory, tiny_dir):
    pytest.importorskip("onnxruntime", reason="export checks graphs with onnxruntime (pip install 'diffcls[onnx]')")
    from diffcls.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("engines") / "engines_fp32"
    export_model(ExportConfig(out=out, model=tiny_dir, batch_sizes=EXPORT_BATCH_SIZES, image_size=EXPORT_IMAGE_SIZE, device="cpu"))
    return out


def copy_of(engine_dir, dest):
    """A private copy to break (delete, corrupt) without touching the shared export."""
    import shutil

    shutil.copytree(engine_dir, dest)
    return dest


# --- the CLI as the digits examples' tests drive it ----------------------------------------------
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "digits"
FAST_DIGITS = ["--n-samples", "4,8", "--to-keep", "3,1", "--batch-size", "16", "--no-cache", "--threads", "1"]


def invoke_cli(*args):
    """Run the `diffcls` app in-process (Typer's CliRunner); exceptions are raised, not caught."""
    from typer.testing import CliRunner

    from diffcls.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
