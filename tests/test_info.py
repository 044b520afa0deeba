"""`diffcls info` on a model (components, parameters, prediction type, image size) and on an
engine directory whose weights live in external-data files (issue 9 item 6)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from diffcls.cli.app import app


def test_info_describes_a_model_directory(tiny, tiny_dir):
    from diffcls.models.describe import describe_model

    d = describe_model(tiny_dir)
    for name in ("text_encoder", "vae", "unet"):
        assert d["components"][name]["parameters"] == sum(p.numel() for p in getattr(tiny, name).state_dict().values())
    assert d["prediction_type"] == "epsilon" and d["default_image_size"] == tiny.default_image_size

    r = CliRunner().invoke(app, ["info", str(tiny_dir)])
    assert r.exit_code == 0, r.output
    assert "model directory" in r.output and "prediction type epsilon" in r.output
    assert f"default image size {tiny.default_image_size}" in r.output
    assert "UNet2DConditionModel" in r.output and "AutoencoderKL" in r.output
    assert "diffcls export --model" in r.output and "no manifest.json" not in r.output


def test_info_on_a_folder_that_is_neither(tmp_path):
    r = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "neither an engine directory" in r.output


def test_info_lists_and_counts_external_data(tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from diffcls.export import ExportConfig, export_model
    from diffcls.export import onnx_export as ox

    monkeypatch.setattr(ox, "LARGE_BYTES", 0)  # every graph keeps its weights in <file>.data, as SD's UNet does
    out = tmp_path / "engines"
    export_model(ExportConfig(out=out, model=tiny_dir, batch_sizes=(2,), image_size=16, device="cpu"))
    assert (out / "unet.onnx.data").is_file()
    r = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["info", str(out)])
    assert r.exit_code == 0, r.output
    assert "unet.onnx + unet.onnx.data (external data)" in r.output
    from diffcls.render import human_size

    total = (out / "unet.onnx").stat().st_size + (out / "unet.onnx.data").stat().st_size
    unet_row = next(line for line in r.output.splitlines() if re.match(r"\W*unet\b", line))
    assert human_size(total) in unet_row


@pytest.mark.parametrize("arg", ["demo-dit", "DIR"])
def test_info_describes_a_dit_directory_and_bundled_names(arg):
    """A DiT directory (transformer/, vae/, no text encoder) was reported as 'neither an engine
    directory nor a diffusers model directory'; bundled names were taken for engine folders."""
    from diffcls.models.describe import describe_model
    from diffcls.models.loading import bundled_model_path, load_model

    path = str(bundled_model_path("demo-dit")) if arg == "DIR" else arg
    d = describe_model(path)
    model = load_model("demo-dit")
    assert d["model_kind"] == "dit" and set(d["components"]) == {"vae", "transformer"}
    assert d["components"]["transformer"]["parameters"] == sum(p.numel() for p in model.transformer.state_dict().values())
    assert d["default_image_size"] == 32 and d["labels"][:2] == ["zero", "one"] and d["num_classes"] == 10
    r = CliRunner().invoke(app, ["info", path])
    assert r.exit_code == 0, r.output
    assert "(dit)" in r.output and "DiTTransformer2DModel" in r.output and "neither" not in r.output


def test_info_takes_the_bundled_sd_demo_by_name():
    r = CliRunner().invoke(app, ["info", "demo"])
    assert r.exit_code == 0, r.output
    assert "(stable-diffusion)" in r.output and "UNet2DConditionModel" in r.output
