"""An export owns its engine directory (issue 8 items 11-13): stale files, killed exports,
manifest entries that point elsewhere or were edited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="export checks graphs with onnxruntime (pip install 'diffcls[onnx]')")

from conftest import EXPORT_BATCH_SIZES as BATCH_SIZES  # noqa: E402
from conftest import EXPORT_IMAGE_SIZE as IMAGE_SIZE  # noqa: E402
from conftest import assert_one_line_error, copy_of  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from diffcls.cli.app import app  # noqa: E402
from diffcls.errors import DiffclsError  # noqa: E402
from diffcls.export import ExportConfig, export_model  # noqa: E402

runner = CliRunner()


def cfg(out, tiny_dir, **kw):
    return ExportConfig(out=out, model=tiny_dir, batch_sizes=BATCH_SIZES, image_size=IMAGE_SIZE, device="cpu", **kw)


def images(tmp_path) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def classify(engines, tmp_path, *extra):
    return runner.invoke(app, ["classify", str(images(tmp_path)), "--engines", str(engines), "--n-samples", "2,4", "--to-keep", "2,1",
                               "--batch-size", "4", "--no-cache", "--device", "cpu", *map(str, extra)])


def edit_manifest(d: Path, fn) -> None:
    """The manifest as another export would have written it (sealed: an edited one is refused)."""
    from diffcls.engines.manifest import write_manifest

    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    write_manifest(d, m)


def as_if_another_model_exported_it(d: Path) -> None:
    """What exporting the demo model left: its defaults and prompts, another fingerprint."""
    (d / "diffcls.json").write_text(json.dumps({"prompts": "prompts/p.csv", "n_samples": [10, 50], "to_keep": [3, 1], "image_size": 32}))
    (d / "prompts").mkdir()
    (d / "prompts" / "p.csv").write_text("prompt,classname,classidx\nzero,zero,0\none,one,1\n")

    def other(m):
        m["fingerprint"], m["source"] = "0" * 16, "/models/demo"
        m["written"] = m["written"] + ["diffcls.json", "prompts/p.csv"]

    edit_manifest(d, other)


# --- 11: the whole directory is the export's ---------------------------------------------------
def test_another_models_directory_needs_force_and_then_holds_nothing_of_it(engine_dir, tiny_dir, tmp_path):
    d = copy_of(engine_dir, tmp_path / "e")
    as_if_another_model_exported_it(d)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(DiffclsError, match=r"holds engines of another model \(/models/demo.*pass --force"):
        export_model(cfg(d, tiny_dir))
    export_model(cfg(d, tiny_dir, force=True))
    assert not (d / "diffcls.json").exists() and not (d / "prompts").exists()
    assert (d / "notes.txt").read_text() == "mine"  # not an export's file: left alone
    # the old model's prompts and schedule are not used: without classes there are none
    assert_one_line_error(classify(d, tmp_path), "no class prompts")
    assert classify(d, tmp_path, "--classes", "cat,dog").exit_code == 0


def test_reexport_removes_files_this_export_did_not_write(engine_dir, tiny_dir, tmp_path):
    d = copy_of(engine_dir, tmp_path / "e")
    (d / "diffcls.json").write_text(json.dumps({"image_size": 32}))  # left by an earlier export
    (d / "unet.plan").write_bytes(b"a TensorRT engine of an earlier export")
    edit_manifest(d, lambda m: m.update(written=m["written"] + ["diffcls.json", "unet.plan"]))
    result = export_model(cfg(d, tiny_dir))
    assert result.built == [] and len(result.cached) == 3
    assert not (d / "diffcls.json").exists() and not (d / "unet.plan").exists()
    assert classify(d, tmp_path, "--classes", "cat,dog").exit_code == 0


_KILLED = """
import os, sys
from diffcls.export import onnx_export as ox
from diffcls.export import ExportConfig, export_model
real, n = ox.save_onnx, []
def dies(*a, **kw):  # kill -9 while the second component is being written
    n.append(1)
    if len(n) == 2:
        os._exit(9)
    return real(*a, **kw)
ox.save_onnx = dies
export_model(ExportConfig(out=sys.argv[1], model=sys.argv[2], batch_sizes=(2, 4), image_size=16, device="cpu"))
"""


def test_a_killed_export_leaves_no_temp_dirs_and_reads_as_incomplete(tiny_dir, tmp_path):
    d = tmp_path / "e"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-c", _KILLED, str(d), str(tiny_dir)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 9, p.stderr[-2000:]
    assert [x.name for x in d.iterdir() if x.name.startswith("tmp")] == []
    r = runner.invoke(app, ["info", str(d)])
    assert r.exit_code == 0 and "INCOMPLETE" in r.output and "diffcls export" in r.output, r.output
    assert_one_line_error(classify(d, tmp_path, "--classes", "cat,dog"), "its export did not finish", "diffcls export")
    result = export_model(cfg(d, tiny_dir))
    assert result.cached == ["text_encoder onnx"] and len(result.built) == 2  # the finished part is reused
    assert not (d / ".partial").exists() and not [x for x in d.iterdir() if x.name.startswith("tmp")]
    assert "INCOMPLETE" not in runner.invoke(app, ["info", str(d)]).output
    assert classify(d, tmp_path, "--classes", "cat,dog").exit_code == 0


# --- 12: the manifest's `file` is checked and stays inside the directory -----------------------
@pytest.mark.parametrize("where", ["../unet.onnx", "ABS", "unet2.onnx"])
def test_manifest_file_outside_or_unchecked_is_refused(engine_dir, tmp_path, where):
    d = copy_of(engine_dir, tmp_path / "e")
    target = tmp_path / "unet.onnx" if where != "unet2.onnx" else d / "unet2.onnx"
    target.write_bytes((d / "unet.onnx").read_bytes())  # a loadable graph, not the one hash-checked
    rel = str(target) if where == "ABS" else where

    def point(m):
        m["components"]["unet"]["file"] = rel

    edit_manifest(d, point)
    reason = "not among its checked files" if where == "unet2.onnx" else "outside the engine directory"
    assert_one_line_error(classify(d, tmp_path, "--classes", "cat,dog"), reason, "diffcls export")


# --- 13: an edited latent_shape ------------------------------------------------------------------
def test_an_edited_latent_shape_is_one_line(engine_dir, tmp_path):
    d = copy_of(engine_dir, tmp_path / "e")

    def edit(m):
        m["latent_shape"] = [4, 4, 4]

    edit_manifest(d, edit)
    assert_one_line_error(classify(d, tmp_path, "--classes", "cat,dog"), "latent_shape", "re-export")
