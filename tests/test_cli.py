"""`diffcls classify` / `evaluate` end to end through Typer's runner, on a tiny model."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.cli.classify import join_list_flags

runner = CliRunner()
FAST = ["--n-samples", "4,8", "--to-keep", "2,1", "--batch-size", "8"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]


def test_classify_writes_results_and_errors(tmp_path, tiny_dir, image_folder):
    out, errs = tmp_path / "r.csv", tmp_path / "e.jsonl"
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog,bird", *FAST,
               "--out", out, "--save-errors", errs, "--cache-dir", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    assert re.search(r"speed: [\d.]+ ms preprocess, [\d.]+ ms text encode, [\d.]+ ms VAE encode, [\d.]+ ms UNet per image", r.output)
    got = rows(out)
    assert sorted(g["path"] for g in got) == [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(3)]
    for g in got:
        assert g["prediction"] in ("cat", "dog", "bird") and g["top1"] == g["prediction"]
        # to-keep 2 1: the top 2 made the final decision (their means compare), the third was pruned
        assert float(g["top1_mean_error"]) <= float(g["top2_mean_error"]) and g["top3_pruned_after"] == "4"
        assert g["n_evals"] == str(3 * 4 + 2 * 4)
    recs = [json.loads(l) for l in errs.read_text().splitlines()]
    assert sorted(r["path"] for r in recs) == sorted(g["path"] for g in got)
    rec = recs[0]
    assert set(rec) == {"path", "prediction", "classidx", "scores", "n_shared", "top", "temperature", "errors", "sha256"}
    assert rec["sha256"] == next(g["sha256"] for g in got if g["path"] == rec["path"])
    assert len(rec["errors"]) == 20 and all(len(e) == 4 for e in rec["errors"])
    # the score of a prompt is the mean of its errors, keyed by prompt index and class name
    p0 = [e[3] for e in rec["errors"] if e[0] == 0]
    s0 = [s for s in rec["scores"] if s["prompt"] == 0]
    assert len(s0) == 1 and s0[0]["classname"] == "cat" and s0[0]["classidx"] == 0
    assert s0[0]["mean_error"] == pytest.approx(sum(p0) / len(p0))


def test_classify_matches_python_api(tmp_path, tiny, tiny_dir, image_folder):
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule

    out = tmp_path / "r.csv"
    assert invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out, "--no-cache").exit_code == 0
    clf = Classifier.from_pretrained(tiny, use_cache=False)
    paths = sorted(image_folder.rglob("*.png"))
    api = clf.classify(paths, PromptSet.from_classes("cat,dog"), Schedule((4, 8), (2, 1)), batch_size=3)
    by_path = {g["path"]: g for g in rows(out)}
    for p, res in zip(paths, api):
        g = by_path[p.relative_to(image_folder).as_posix()]
        assert g["prediction"] == res.classname
        assert float(g["top1_mean_error"]) == pytest.approx(res.ranked()[0].mean_error, rel=1e-5)
        assert [g[f"top{i}"] for i in (1, 2)] == [c.classname for c in res.ranked()]


def test_single_image_path_and_prompts_csv(tmp_path, tiny_dir, image_folder):
    prompts = tmp_path / "p.csv"
    prompts.write_text("prompt,classname,classidx\na cat,cat,0\na kitten,cat,0\na dog,dog,1\n")
    r = invoke("classify", image_folder / "cat" / "0.png", "--model", tiny_dir, "--prompts", prompts, *FAST, "--out", tmp_path / "o.csv", "--no-cache")
    assert r.exit_code == 0, r.output
    (row,) = rows(tmp_path / "o.csv")
    assert row["path"] == "0.png" and row["prediction"] in ("cat", "dog")
    assert row["top3"] == ""  # two classes only: a class appears once, by its best prompt


def test_odd_modes_classify_and_bad_files_are_skipped(tmp_path, tiny_dir):
    root = tmp_path / "odd"
    root.mkdir()
    base = Image.fromarray((np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8))
    for mode in ("L", "LA", "P", "RGBA", "CMYK"):
        base.convert(mode).save(root / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}")
    Image.fromarray((np.random.default_rng(1).random((20, 30)) * 65535).astype(np.uint16)).save(root / "i16.png")
    Image.new("RGB", (1, 1)).save(root / "tiny.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "r.csv"
    r = invoke("classify", root, "--model", tiny_dir, "--classes", "a,b", *FAST, "--out", out, "--no-cache")
    assert r.exit_code == 0, r.output
    assert "skipped" in r.output and "broken.png" in r.output
    assert len(rows(out)) == 7


def test_resume_after_interrupt_keeps_every_row_once(tmp_path, tiny_dir, image_folder, monkeypatch):
    from diffcls.runtime.execution import classifier as C

    out = tmp_path / "r.csv"
    args = ["classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out, "--save-errors", tmp_path / "e.jsonl", "--no-cache"]
    original = C.Classifier.iter_classify

    def dies_after_two(self, *a, **kw):
        for i, r in enumerate(original(self, *a, **kw)):
            if i == 2:
                raise KeyboardInterrupt
            yield r

    monkeypatch.setattr(C.Classifier, "iter_classify", dies_after_two)
    r = invoke(*args)
    assert r.exit_code == 130 and "rerun the same command to resume" in r.output
    first = rows(out)
    assert len(first) == 2
    with open(out, "a") as f:  # a row torn by a kill in the middle of a write
        f.write("dog/9.png,do")
    monkeypatch.setattr(C.Classifier, "iter_classify", original)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "2 of 6 images already done" in r.output
    final = rows(out)
    assert sorted(g["path"] for g in final) == sorted({g["path"] for g in final}) and len(final) == 6
    assert final[:2] == first
    recs = [json.loads(l)["path"] for l in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert sorted(recs) == sorted(g["path"] for g in final)


def test_resume_after_sigkill(tmp_path, tiny_dir, image_folder):
    """A real kill -9 of the CLI mid-run, then a rerun: nothing lost, nothing duplicated."""
    for i in range(3, 12):
        shutil.copy(image_folder / "cat" / "0.png", image_folder / "cat" / f"{i}.png")
        Image.open(image_folder / "cat" / "1.png").rotate(i * 7).save(image_folder / "cat" / f"{i}.png")
    out = tmp_path / "r.csv"
    args = ["classify", str(image_folder), "--model", str(tiny_dir), "--classes", "cat,dog", "--n-samples", "10,30",
            "--to-keep", "2,1", "--batch-size", "4", "--out", str(out), "--no-cache"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "diffcls", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = rows(out)
    assert 2 <= len(before) < 15, "the run should have been killed part way"
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    after = rows(out)
    assert len(after) == 15 and len({g["path"] for g in after}) == 15
    assert after[: len(before)] == before


def test_changed_settings_refuse_to_mix(tmp_path, tiny_dir, image_folder):
    out = tmp_path / "r.csv"
    assert invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out, "--no-cache").exit_code == 0
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", "--n-samples", "4,8", "--to-keep", "2,1", "--seed", "1", "--out", out, "--no-cache")
    assert_one_line_error(r, "r.csv was written with other settings", "seed")
    # batch size is not a setting that changes results: resuming with another one is fine
    r = invoke("classify", image_folder, "--model", tiny_dir, "--classes", "cat,dog", "--n-samples", "4,8", "--to-keep", "2,1", "--batch-size", "5", "--out", out, "--no-cache")
    assert r.exit_code == 0 and "6 of 6 images already done" in r.output


def test_evaluate_known_answer(tmp_path, tiny, tiny_dir, image_folder):
    """Label 4 images with the model's own prediction and 2 with the other class: 4/6 correct."""
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule

    paths = sorted(image_folder.rglob("*.png"))
    clf = Classifier.from_pretrained(tiny, use_cache=False)
    preds = [r.classname for r in clf.classify(paths, PromptSet.from_classes("cat,dog"), Schedule((4, 8), (2, 1)))]
    labeled = tmp_path / "labeled"
    truth = []
    for i, (p, pred) in enumerate(zip(paths, preds)):
        label = pred if i < 4 else ("dog" if pred == "cat" else "cat")
        truth.append(label)
        (labeled / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, labeled / label / f"{i}.png")
    (labeled / "dog").mkdir(exist_ok=True)
    (labeled / "cat").mkdir(exist_ok=True)
    metrics = tmp_path / "m.json"
    r = invoke("evaluate", labeled, "--model", tiny_dir, *FAST, "--json", metrics, "--plot", tmp_path / "cm.png", "--no-cache")
    assert r.exit_code == 0, r.output
    assert "top-1 accuracy: 66.67% (4/6)" in r.output
    m = json.loads(metrics.read_text())
    conf = [[0, 0], [0, 0]]
    for t, p in zip(truth, preds):
        conf[["cat", "dog"].index(t)][["cat", "dog"].index(p)] += 1
    assert m["confusion"] == conf
    for i, (name, row) in enumerate(zip(["cat", "dog"], conf)):  # the printed matrix, row by row
        assert re.search(rf"{i} {name}\W+{row[0]}\W+{row[1]}\W", r.output), r.output
    per = [row[i] / sum(row) for i, row in enumerate(conf) if sum(row)]
    assert m["mean_per_class"] == pytest.approx(sum(per) / len(per))
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_evaluate_unknown_subfolder(tmp_path, tiny_dir, image_folder):
    r = invoke("evaluate", image_folder, "--model", tiny_dir, "--classes", "cat,bird", *FAST, "--no-cache")
    assert_one_line_error(r, "subfolders dog", "match no class name")


@pytest.mark.parametrize(
    "make, args, fragments",
    [
        (lambda t: t.mkdir(), [], ["no images found in"]),
        (None, ["--prompts", "{tmp}/missing.csv"], ["missing.csv does not exist"]),
        (None, ["--prompts", "{tmp}/bad.csv"], ["bad.csv", "prompt,classname,classidx"]),
        (None, ["--classes", "cat,dog,cat"], ["cat more than once"]),
        (None, ["--classes", "cat,dog", "--n-samples", "50,500", "--to-keep", "5,1"], ["--to-keep 5 is more than the 2 prompts"]),
        (None, ["--classes", "cat,dog", "--n-samples", "5,50", "--to-keep", "2"], ["--n-samples has 2 rounds but --to-keep has 1"]),
        (None, ["--classes", "cat,dog", "--n-samples", "5,x", "--to-keep", "2,1"], ["must be integers"]),
        (None, ["--classes", "cat,dog", "--model", "{tmp}/broken_model"], ["broken_model lacks unet/"]),
        (None, ["--classes", "cat,dog", "--model", "{tmp}/nomodel"], ["nomodel does not exist"]),
        (None, ["--classes", "cat,dog", "--image-size", "13"], ["--image-size 13 is not a multiple"]),
        (None, ["--classes", "cat,dog", "--noise", "{tmp}/noise.pt"], ["noise tensor has shape [3, 4, 8, 8]"]),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, tiny_dir, image_folder, make, args, fragments):
    import torch

    (tmp_path / "bad.csv").write_text("label,text\ncat,a cat\n")
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "unet")
    torch.save(torch.zeros(3, 4, 8, 8), tmp_path / "noise.pt")
    folder = image_folder
    if make is not None:
        folder = tmp_path / "empty"
        make(folder)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_dir)]
    if "--n-samples" not in args:
        args += ["--n-samples", "4,8", "--to-keep", "2,1"]
    if "--classes" not in args and "--prompts" not in args:
        args += ["--classes", "cat,dog"]
    r = invoke("classify", folder, *args, "--no-cache")
    assert_one_line_error(r, *fragments)


def test_a_bad_model_or_engine_dir_is_named_before_anything_else(tmp_path, image_folder):
    """No --classes either: the missing model is the error to report, not the missing prompts."""
    (tmp_path / "half_model" / "unet").mkdir(parents=True)
    r = invoke("classify", image_folder, "--model", tmp_path / "half_model", "--no-cache")
    assert_one_line_error(r, "half_model lacks tokenizer, text_encoder, vae, scheduler/")
    r = invoke("classify", image_folder, "--engines", tmp_path / "no_engines", "--no-cache")
    assert_one_line_error(r, "no_engines does not exist", f"diffcls export --out {tmp_path / 'no_engines'}")


def test_debug_shows_the_traceback(tmp_path, tiny_dir):
    from diffcls.errors import DiffclsError

    with pytest.raises(DiffclsError):
        runner.invoke(app, ["--debug", "classify", str(tmp_path / "nope"), "--model", str(tiny_dir)], catch_exceptions=False)


def test_noise_file_is_used(tmp_path, tiny_dir, image_folder):
    import torch

    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(noise, tmp_path / "n.pt")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    common = ["--model", tiny_dir, "--classes", "cat,dog", *FAST, "--no-cache"]
    assert invoke("classify", image_folder, *common, "--noise", tmp_path / "n.pt", "--out", a).exit_code == 0
    assert invoke("classify", image_folder, *common, "--seed", "0", "--out", b).exit_code == 0
    # the default bank is torch.randn from a generator seeded with --seed: same numbers, same scores
    assert [r["top1_mean_error"] for r in rows(a)] == [r["top1_mean_error"] for r in rows(b)]


def test_list_flags_accept_spaces():
    assert join_list_flags(["classify", "x", "--n-samples", "50", "500", "--to-keep", "5", "1", "--seed", "3"]) == [
        "classify", "x", "--n-samples", "50,500", "--to-keep", "5,1", "--seed", "3"]


def test_version_and_command_modules_import_in_any_order():
    r = invoke("--version")
    assert r.exit_code == 0 and r.output.strip().startswith("diffcls 0.")
    for first in ("profile", "classify", "export"):  # a fresh interpreter each: no import cycle
        p = subprocess.run([sys.executable, "-c", f"import diffcls.cli.{first}"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
