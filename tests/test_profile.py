"""`diffcls profile`: per-stage latency report through the CLI on a tiny saved model."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from diffcls.cli.app import app

STAGES = ("load", "preprocess", "text_encode", "vae_encode", "unet_round_1", "unet_round_2", "unet_call", "total")


def _run(args):
    return CliRunner().invoke(app, args)


def test_profile_writes_json_and_plot(tiny_dir, image_folder, tmp_path):
    out_json, out_png = tmp_path / "p.json", tmp_path / "p.png"
    r = _run([
        "profile", str(image_folder), "--model", str(tiny_dir), "--classes", "cat,dog,car",
        "--n-samples", "2,4", "--to-keep", "2,1", "--batch-size", "4", "--limit", "4",
        "--warmup", "--cache-dir", str(tmp_path / "cache"), "--json", str(out_json), "--plot", str(out_png),
    ])
    assert r.exit_code == 0, r.output
    rep = json.loads(out_json.read_text())
    for s in STAGES:
        assert s in rep["stages"], s
        assert {"calls", "total_s", "p50_ms", "p90_ms"} <= set(rep["stages"][s])
    assert rep["n_images"] == 4
    assert rep["stages"]["vae_encode"]["calls"] >= 1
    assert rep["unet_evals"] == 4 * (3 * 2 + 2 * 2)  # 3 prompts x 2 t, then 2 x 2 new t
    assert rep["unet_evals_per_s"] > 0 and rep["images_per_s"] > 0
    assert 0 <= rep["padding_fraction"] < 1
    assert rep["peak_gpu_memory_bytes"] is None  # a number or null, never a string
    assert rep["warmup"] is not None and rep["warmup"]["total_s"] > 0
    # the warm-up ran with the cache off: the measured run misses every prompt and image once
    assert rep["cache"]["misses"] == 3 + 4 and rep["cache"]["hits"] == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "UNet round 1" in r.output and "VAE encode" in r.output


def test_profile_second_run_hits_cache(tiny_dir, image_folder, tmp_path):
    args = [
        "profile", str(image_folder), "--model", str(tiny_dir), "--classes", "cat,dog",
        "--n-samples", "2", "--to-keep", "1", "--batch-size", "4", "--limit", "2",
        "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "p.json"),
    ]
    assert _run(args).exit_code == 0
    r = _run(args)
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "p.json").read_text())
    assert rep["cache"] == {**rep["cache"], "hits": 2 + 2, "misses": 0}
    assert rep["stages"]["text_encode"]["calls"] == 0 and rep["stages"]["vae_encode"]["calls"] == 0
    assert re.search(r"text encode \(cached\)\W+0\W", r.output) and re.search(r"VAE encode \(cached\)\W+0\W", r.output), r.output


def test_profile_bad_folder_is_a_user_error(tmp_path):
    r = _run(["profile", str(tmp_path / "nope"), "--classes", "a,b"])
    assert r.exit_code == 2
    assert "does not exist" in r.output
