"""Inputs the ecosystem uses: several paths and globs, --list files (text or CSV with labels),
evaluate on folders named by class index; result keys stay relative and unique."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.errors import DiffclsError
from diffcls.runtime.data.inputs import collect_inputs

from conftest import assert_one_line_error, random_image

runner = CliRunner()
FAST = ["--n-samples", "2,4", "--to-keep", "2,1", "--batch-size", "8", "--no-cache"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def tree(tmp_path):
    """a.png, b/{1,2}.png, c/{x,y}.png, c/notes.txt (not an image)."""
    root = tmp_path / "data"
    for i, rel in enumerate(["a.png", "b/1.png", "b/2.png", "c/x.png", "c/y.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        random_image(i).save(root / rel)
    (root / "c" / "notes.txt").write_text("not an image")
    return root


def test_paths_and_globs_key_relative_to_the_common_folder(tree, monkeypatch):
    monkeypatch.chdir(tree)
    inp = collect_inputs(["a.png", "b/", "c/*.png", "c/x.png"])  # c/x.png twice: once
    assert [inp.keys[p] for p in inp.images] == ["a.png", "b/1.png", "b/2.png", "c/x.png", "c/y.png"]
    assert inp.root.resolve() == tree.resolve()
    # the same inputs named from elsewhere, absolute: the same keys
    monkeypatch.chdir(tree.parent)
    again = collect_inputs([str(tree / "a.png"), str(tree / "b"), str(tree / "c" / "*.png")])
    assert sorted(again.keys.values()) == sorted(inp.keys.values())
    # one folder or one image: keys as before (relative to the folder / the image's folder)
    assert sorted(collect_inputs([tree / "b"]).keys.values()) == ["1.png", "2.png"]
    assert list(collect_inputs([tree / "c" / "x.png"]).keys.values()) == ["x.png"]
    assert sorted(collect_inputs([str(tree / "**" / "*.png")]).keys.values()) == ["a.png", "b/1.png", "b/2.png", "c/x.png", "c/y.png"]


def test_globs_and_lists_that_name_nothing_are_one_line_errors(tree):
    with pytest.raises(DiffclsError, match=r"matches no image"):
        collect_inputs([str(tree / "c" / "*.jpg")])
    with pytest.raises(DiffclsError, match=r"no images given"):
        collect_inputs([])
    lst = tree / "list.txt"
    lst.write_text("a.png\n\n# a comment\nb/1.png\nb/nope.png\nc/notes.txt\n")
    with pytest.raises(DiffclsError, match=r"list.txt line 5: b/nope.png does not exist \(and 1 more\)"):
        collect_inputs(list_file=lst)


def test_classify_several_paths_and_a_glob(tmp_path, tiny_dir, tree, monkeypatch):
    monkeypatch.chdir(tree)
    out = tmp_path / "r.csv"
    r = invoke("classify", "a.png", "b/", "c/*.png", "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(g["path"] for g in rows(out)) == ["a.png", "b/1.png", "b/2.png", "c/x.png", "c/y.png"]
    # rerun: every key is found again, nothing is classified twice
    r = invoke("classify", "a.png", "b/", "c/*.png", "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out)
    assert r.exit_code == 0 and "5 of 5 images already done" in r.output, r.output
    assert len(rows(out)) == 5


def test_classify_a_text_list_read_relative_to_its_folder(tmp_path, tiny_dir, tree, monkeypatch):
    lst = tree / "list.txt"
    lst.write_text("# images to classify\nb/2.png\n\nc/y.png\n")
    monkeypatch.chdir(tmp_path)  # not the list's folder
    out = tmp_path / "r.csv"
    r = invoke("classify", "--list", lst, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(g["path"] for g in rows(out)) == ["b/2.png", "c/y.png"]


def _labeled(tmp_path, names: list[str]) -> Path:
    root = tmp_path / "labeled"
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(2):
            random_image(10 * c + i).save(root / name / f"{i}.png")
    return root


def test_evaluate_folders_named_by_class_index(tmp_path, tiny_dir):
    by_index = _labeled(tmp_path / "i", ["0", "1"])
    by_name = _labeled(tmp_path / "n", ["cat", "dog"])
    common = ["--model", tiny_dir, "--classes", "cat,dog", *FAST]
    r = invoke("evaluate", by_index, *common, "--labels", "index", "--json", tmp_path / "i.json")
    assert r.exit_code == 0, r.output
    r = invoke("evaluate", by_name, *common, "--json", tmp_path / "n.json")
    assert r.exit_code == 0, r.output
    i, n = (json.loads((tmp_path / f).read_text()) for f in ("i.json", "n.json"))
    assert i["confusion"] == n["confusion"] and i["n"] == 4  # same images, same labels
    # numeric folders without --labels index: the error says what to pass
    assert_one_line_error(invoke("evaluate", by_index, *common), "subfolders 0, 1", "--labels index")
    assert_one_line_error(invoke("evaluate", _labeled(tmp_path / "x", ["0", "7"]), *common, "--labels", "index"),
                   "subfolders 7", "not class indices", "(0..1)")


def test_evaluate_a_csv_list_with_labels(tmp_path, tiny_dir, tree):
    lst = tmp_path / "set.csv"
    lst.write_text(f"path,label\n{tree / 'a.png'},cat\n{tree / 'b' / '1.png'},dog\n{tree / 'c' / 'x.png'},dog\n")
    out = tmp_path / "r.csv"
    r = invoke("evaluate", "--list", lst, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    got = {g["path"]: g for g in rows(out)}
    assert set(got) == {"a.png", "b/1.png", "c/x.png"}
    assert [got[k]["label"] for k in ("a.png", "b/1.png", "c/x.png")] == ["cat", "dog", "dog"]
    correct = sum(g["correct"] == "1" for g in got.values())
    assert f"top-1 accuracy: {100 * correct / 3:.2f}% ({correct}/3)" in r.output


def test_evaluate_several_labeled_folders(tmp_path, tiny_dir):
    a = _labeled(tmp_path / "a", ["cat", "dog"])
    b = _labeled(tmp_path / "b", ["dog"])
    out = tmp_path / "r.csv"
    r = invoke("evaluate", a, b, "--model", tiny_dir, "--classes", "cat,dog", *FAST, "--out", out)
    assert r.exit_code == 0, r.output
    got = {g["path"]: g["label"] for g in rows(out)}
    assert got == {"a/labeled/cat/0.png": "cat", "a/labeled/cat/1.png": "cat", "a/labeled/dog/0.png": "dog",
                   "a/labeled/dog/1.png": "dog", "b/labeled/dog/0.png": "dog", "b/labeled/dog/1.png": "dog"}
