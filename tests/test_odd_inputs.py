"""Tampered or odd input never gives a silent answer or a traceback (issue 24, items 6-8, 11,
13-18): broken symlinks among images, NaN pixels, edited engine directories, a cache that cannot
be written or cleaned, huge resizes, out-of-range numbers, broken manifests, shard coverage,
and the messages that name the real cause."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.errors import DiffclsError
from conftest import assert_one_line_error, copy_of, random_image

runner = CliRunner()
FAST = ["--n-samples", "4,8", "--to-keep", "2,1", "--batch-size", "8", "--no-cache"]
ENGINE_FAST = ["--n-samples", "2,4", "--to-keep", "2,1", "--batch-size", "4", "--no-cache", "--device", "cpu"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


# --- 6: a broken symlink skips itself, not its folder ------------------------------------------
def test_dangling_and_looping_symlinks_are_skipped_one_by_one(image_folder):
    from diffcls.runtime.data.preprocess import find_images

    (image_folder / "cat" / "a_gone.png").symlink_to(image_folder / "nowhere.png")
    (image_folder / "dog" / "a_loop.png").symlink_to(image_folder / "dog" / "a_loop.png")
    (image_folder / "top_gone.png").symlink_to(image_folder / "nowhere.png")  # at the top level too
    problems = []
    found = find_images(image_folder, on_problem=lambda folder, msg: problems.append(msg))
    assert [p.relative_to(image_folder).as_posix() for p in found] == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    assert len(problems) == 3 and all("symbolic link" in m for m in problems)
    assert {Path(m.split(":")[0]).name for m in problems} == {"a_gone.png", "a_loop.png", "top_gone.png"}


# --- 7: NaN pixels are refused, not scaled to black --------------------------------------------
def test_a_float_image_with_nan_pixels_is_refused(tmp_path):
    from diffcls.runtime.data.preprocess import BadImage, open_image

    arr = np.full((8, 8), 0.5, dtype=np.float32)
    arr[2, 3] = np.nan
    Image.fromarray(arr, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(BadImage, match=r"nan.tif: 1 of 64 pixels are NaN or infinite"):
        open_image(tmp_path / "nan.tif")
    arr[2, 3] = 0.25  # finite: still fine
    Image.fromarray(arr, mode="F").save(tmp_path / "ok.tif")
    assert open_image(tmp_path / "ok.tif").size == (8, 8)


# --- 8: every file that shapes the scores is hashed, and results bind to it ---------------------
def test_edited_schedule_or_manifest_fields_are_refused(tmp_path, engine_dir):
    from diffcls.engines import open_engines

    d = copy_of(engine_dir, tmp_path / "alphas")
    data = json.loads((d / "alphas_cumprod.json").read_text())
    data["alphas_cumprod"][10] *= 0.5  # what another export's file would hold
    (d / "alphas_cumprod.json").write_text(json.dumps(data))
    with pytest.raises(DiffclsError, match="alphas_cumprod.json differs from the export"):
        open_engines("onnxruntime", engine_dir=d, device="cpu")
    assert "status: CHANGED" in invoke("info", d).output
    d = copy_of(engine_dir, tmp_path / "edited")
    m = json.loads((d / "manifest.json").read_text())
    m["prediction_type"] = "v_prediction"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DiffclsError, match="manifest.json was edited"):
        open_engines("onnxruntime", engine_dir=d, device="cpu")
    d = copy_of(engine_dir, tmp_path / "tok")
    (d / "tokenizer" / "added_tokens.json").write_text('{"zebra": 5}')
    with pytest.raises(DiffclsError, match="added_tokens.json was not written by the export"):
        open_engines("onnxruntime", engine_dir=d, device="cpu")


def test_results_bind_to_the_engine_directory(tmp_path, engine_dir, image_folder):
    from diffcls.engines.manifest import read_manifest, write_manifest

    d = copy_of(engine_dir, tmp_path / "e")
    out = tmp_path / "r.csv"
    args = ["classify", image_folder, "--engines", d, "--classes", "cat,dog", *ENGINE_FAST, "--out", out]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    write_manifest(d, {**read_manifest(d), "source": "elsewhere"})  # another (consistent) export into the folder
    assert_one_line_error(invoke(*args), "r.csv was written with other settings", "engines")


# --- 11, 13: the cache never stops a run --------------------------------------------------------
def test_a_full_cache_disk_warns_once_and_leaves_no_temp_file(tmp_path, monkeypatch):
    import safetensors.torch as st

    from diffcls.runtime.data.cache import CacheWriteWarning, DiskCache

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 10)
        raise st.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(st, "save_file", full)
    c = DiskCache(tmp_path / "cache")
    with pytest.warns(CacheWriteWarning, match="carrying on without caching"):
        c.put("text", {"k": 1}, torch.ones(2))
    c.put("text", {"k": 2}, torch.ones(2))  # no second attempt, no second warning
    assert c.write_error and not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_classify_with_a_full_cache_disk_finishes_and_says_so(tmp_path, tiny_dir, image_folder, monkeypatch):
    import safetensors.torch as st

    def full(tensors, filename, metadata=None):
        raise st.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(st, "save_file", full)
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST[:-1], "--cache-dir", tmp_path / "c", "--out", tmp_path / "r.csv")
    assert r.exit_code == 0, r.output
    assert r.output.count("warning: cannot write to the cache directory") == 1 and "classified 6 images" in r.output


def test_a_bad_entry_that_cannot_be_deleted_is_a_miss(tmp_path, monkeypatch):
    from diffcls.runtime.data.cache import DiskCache

    c = DiskCache(tmp_path / "cache")
    fields = {"k": 1}
    path = c._path("text", c._canonical(fields))
    path.mkdir(parents=True)  # a folder where the entry should be
    assert c.get("text", fields) is None and c.rejected == 1
    path.rmdir()
    path.write_bytes(b"corrupt")
    real_unlink = Path.unlink

    def read_only(self, missing_ok=False):
        if self == path:
            raise PermissionError(errno.EROFS, "Read-only file system")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", read_only)
    assert c.get("text", fields) is None and c.rejected == 2


# --- 14, 15: sizes and seeds that cannot work ----------------------------------------------------
def test_an_elongated_image_is_refused_before_the_huge_resize(monkeypatch):
    from diffcls.runtime.data.preprocess import BadImage, MAX_PIXELS, resize_center_crop

    real = Image.Image.resize

    def resize(self, size, *a, **kw):
        assert size[0] * size[1] <= MAX_PIXELS, f"a {size} resize was attempted"
        return real(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", resize)
    tall = Image.new("RGB", (1, 2_000_000))
    with pytest.raises(BadImage, match="1x2000000 would be resized to 16x32000000"):
        resize_center_crop(tall, 16)
    from diffcls.config import Interpolation

    with pytest.raises(BadImage, match="would be resized"):
        resize_center_crop(tall, 16, Interpolation.adm)


def test_classify_skips_the_elongated_image_and_records_the_good_one(tmp_path, tiny_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("L", (1, 2_000_000)).save(folder / "tall.png")
    random_image(1).save(folder / "good.png")
    r = invoke("classify", folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", tmp_path / "r.csv")
    assert r.exit_code == 0, r.output
    assert "tall.png" in r.output and "would be resized" in r.output and "1 skipped" in r.output
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 2


@pytest.mark.parametrize("flag,value,fragment", [
    ("--image-size", "100000", "--image-size 100000 is too large"),
    ("--seed", str(2**64), f"--seed {2**64} is out of range"),
    ("--seed", str(-(2**63) - 1), "is out of range"),
])
def test_numbers_that_cannot_work_are_refused_up_front(tmp_path, tiny_dir, image_folder, flag, value, fragment):
    out = tmp_path / "r.csv"
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out, flag, value)
    assert_one_line_error(r, fragment)
    assert not out.exists()


# --- 16, 18: broken manifests and interrupted exports: one line naming the cause -----------------
@pytest.mark.parametrize("content", [b"[1, 2]", b'{"backend": "onnxruntime", "x": "\xff\xfe"}', "sealed", "unsealed"])
def test_classify_engines_with_a_broken_manifest_is_one_line(tmp_path, engine_dir, image_folder, content):
    d = copy_of(engine_dir, tmp_path / "e")
    if isinstance(content, str):  # valid JSON, a batch size that is not a number
        m = json.loads((d / "manifest.json").read_text())
        m["components"]["unet"]["batch_sizes"] = ["x"]
        if content == "unsealed":  # as a manifest from before the digest
            m.pop("digest", None)
        content = json.dumps(m).encode()
    (d / "manifest.json").write_bytes(content)
    r = invoke("classify", image_folder, "--engines", d, "--classes", "cat,dog", *ENGINE_FAST)
    assert_one_line_error(r, "manifest.json")
    assert "--batch-sizes x" not in r.output


def test_classify_engines_on_an_interrupted_export_says_so(tmp_path, engine_dir, image_folder):
    from diffcls.engines.manifest import read_manifest, write_manifest

    d = copy_of(engine_dir, tmp_path / "e")
    write_manifest(d, {**read_manifest(d), "complete": False})
    r = invoke("classify", image_folder, "--engines", d, *ENGINE_FAST)  # no --classes: the export's defaults
    assert_one_line_error(r, "did not finish", "diffcls export")


def test_info_fix_command_of_an_export_killed_before_the_unet_repeats_its_batch_sizes(tmp_path, tiny_dir, monkeypatch):
    pytest.importorskip("onnxruntime")
    from diffcls.engines.manifest import fix_command, read_manifest
    from diffcls.export import ExportConfig, export_model, pipeline

    real = pipeline._export_ort

    def killed_at_the_unet(model, comp, *a, **kw):
        if comp == "unet":
            raise KeyboardInterrupt
        return real(model, comp, *a, **kw)

    monkeypatch.setattr(pipeline, "_export_ort", killed_at_the_unet)
    d = tmp_path / "e"
    with pytest.raises(KeyboardInterrupt):
        export_model(ExportConfig(out=d, model=tiny_dir, batch_sizes=(8,), text_batch_size=16, image_size=16, device="cpu"))
    m = read_manifest(d)
    assert m["complete"] is False and "unet" not in m["components"]
    cmd = fix_command(d, m)
    assert "--batch-sizes 8" in cmd and "--batch-sizes 16" not in cmd
    r = invoke("info", d)
    assert "--batch-sizes 8" in r.output and "--batch-sizes 16" not in r.output, r.output


@pytest.mark.parametrize("tensor", [
    torch.zeros(4, 4, 2, 2, dtype=torch.int64),
    torch.zeros(4, 4, 2, 2, dtype=torch.bool),
    torch.zeros(4, 4, 2, 2, dtype=torch.uint8),
    torch.zeros(4, 4, 2, 2, dtype=torch.complex64),
])
def test_noise_that_is_not_real_floats_is_refused(tmp_path, tensor):
    from diffcls.runtime.execution.resolve import load_noise

    path = tmp_path / "noise.pt"
    torch.save(tensor, path)
    with pytest.raises(DiffclsError, match=rf"noise file {path} holds {str(tensor.dtype).removeprefix('torch.')} values"):
        load_noise(path)


# --- 17, 18: merge checks the run's own inputs and its rows -------------------------------------
def _shard_runs(tmp_path, tiny_dir, folders, *extra):
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}.csv"
        r = invoke("classify", *folders, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--shard", f"{i}/2", "--out", out, *extra)
        assert r.exit_code == 0, r.output
        outs.append(out)
    return outs


def test_merge_checks_the_shards_against_their_own_inputs(tmp_path, tiny_dir, image_folder):
    (image_folder / "other").mkdir()  # beside the inputs, in their common folder: not part of the run
    for i in range(4):
        random_image(50 + i).save(image_folder / "other" / f"{i}.png")
    (image_folder / "cat" / "broken.png").write_bytes(b"not a png")  # classify skips it
    outs = _shard_runs(tmp_path, tiny_dir, [image_folder / "cat", image_folder / "dog"])
    r = invoke("merge", tmp_path / "all.csv", *outs)
    assert r.exit_code == 0, r.output
    assert "lacks" not in r.output and "broken.png" in r.output and "skipped" in r.output
    assert len((tmp_path / "all.csv").read_text().splitlines()) == 7
    r = invoke("classify", image_folder / "cat", image_folder / "dog", "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", tmp_path / "all.csv")
    assert r.exit_code == 0 and "6 of 7 images already done" in r.output, r.output  # the merged file resumes


def test_merge_drops_malformed_rows_and_refuses_errors_over_the_csv(tmp_path, tiny_dir, image_folder):
    outs = _shard_runs(tmp_path, tiny_dir, [image_folder])
    edited = max(outs, key=lambda o: len(o.read_text().splitlines()))
    lines = edited.read_text().splitlines()
    fields = lines[1].split(",")
    fields[2] = "x"  # classidx
    edited.write_text("\n".join([lines[0], ",".join(fields), *lines[2:]]) + "\n")
    r = invoke("merge", tmp_path / "all.csv", *outs)
    assert_one_line_error(r, "do not cover every image")
    assert "1 malformed row" in r.output and not (tmp_path / "all.csv").exists()


def test_merge_save_errors_equal_to_the_merged_csv_is_refused(tmp_path, tiny_dir, image_folder):
    outs, errs = [], []
    for i in range(2):
        out, err = tmp_path / f"s{i}.csv", tmp_path / f"e{i}.jsonl"
        r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--shard", f"{i}/2", "--out", out, "--save-errors", err)
        assert r.exit_code == 0, r.output
        outs.append(out)
        errs.append(err)
    merged = tmp_path / "all.csv"
    r = invoke("merge", merged, *outs, "--save-errors", merged, "--errors", errs[0], "--errors", errs[1])
    assert_one_line_error(r, "are the same file")
    assert not merged.exists()
