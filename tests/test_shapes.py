"""`diffcls shapes`: the compositional shapes world is seeded, split as specified, and described exactly.

The pixel checks read the images back and judge them against the captions parsed here from
the words alone (colour at the object's centre, which side each colour's pixels lie on), so a
caption that disagrees with its image fails whatever the generator's own bookkeeping says.
"""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.models import shapes as sh
from tests.conftest import assert_one_line_error

CAPTION = re.compile(r"a (\w+) (\w+) (left of|right of|above|below) a (\w+) (\w+)")


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pixels(root):
    return {p.relative_to(root).as_posix(): np.asarray(Image.open(p)).copy() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "heldout"
    result = CliRunner().invoke(app, ["shapes", str(root), "--split", "heldout", "--limit", "48"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root


def test_seeded_and_independent_of_limit(tmp_path, heldout):
    again = sh.write_shapes(tmp_path / "a", "heldout", limit=48)
    assert again["seed"] == 0
    a, b = _pixels(heldout), _pixels(tmp_path / "a")
    assert a.keys() == b.keys() and len(a) == 48 + 2 * 48
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (heldout / "scenes.csv").read_text() == (tmp_path / "a" / "scenes.csv").read_text()
    assert (heldout / "quadruples.csv").read_text() == (tmp_path / "a" / "quadruples.csv").read_text()
    sh.write_shapes(tmp_path / "s", "heldout", limit=10)
    small = _pixels(tmp_path / "s")
    assert all(np.array_equal(small[k], a[k]) for k in small)  # a scene depends on its index, not on limit
    sh.write_shapes(tmp_path / "o", "heldout", limit=10, seed=1)
    other = _pixels(tmp_path / "o")
    assert sum(not np.array_equal(other[k], a[k]) for k in other) >= len(other) - 2


def test_splits_are_disjoint():
    from diffcls.train.shapes import ShapesConfig, training_scenes

    train = training_scenes(ShapesConfig())  # exactly what demo-shapes was trained on
    for s in train:
        assert not any((o.colour, o.shape) in sh.NOVEL_PAIRS for o in s.objects)
        if s.relation:
            axis = "h" if s.relation in ("left of", "right of") else "v"
            assert (frozenset(o.shape for o in s.objects), axis) not in sh.NOVEL_ARRANGEMENTS
    train_keys = {s.key() for s in train}
    assert {s.relation for s in train} == set(sh.RELATIONS) | {None}
    assert {s.classname for s in train if s.relation is None} == set(sh.SEEN_CLASSES)
    heldout = [sh.single_scene("heldout", i) for i in range(240)] + [sh.pair_scene("heldout", i) for i in range(240)]
    heldout += [s for i in range(60) for s in sh.quadruple("heldout", i)[:2]]
    assert not train_keys & {s.key() for s in heldout}  # new scenes ...
    assert {s.classname for s in heldout if s.relation is None} == set(sh.SEEN_CLASSES)  # ... of seen compositions
    novel = [sh.single_scene("novel", i) for i in range(30)] + [s for i in range(30) for s in sh.quadruple("novel", i)[:2]]
    assert all(s.is_novel() for s in novel) and not train_keys & {s.key() for s in novel}
    assert {s.classname for s in novel[:30]} == set(sh.NOVEL_CLASSES)
    assert len(sh.SEEN_CLASSES) >= 24 and len(sh.COLOURS) >= 6 and len(sh.ALL_CLASSES) == len(sh.SHAPES) * len(sh.COLOURS)


def _centre_colour(img, x, y):
    return tuple(int(v) for v in img[y, x])


def _colour_centroid(img, rgb):
    ys, xs = np.nonzero(np.all(img == np.array(rgb, dtype=np.uint8), axis=-1))
    assert len(xs) > 10
    return xs.mean(), ys.mean()


def test_captions_match_the_images(heldout):
    rows = _read(heldout / "scenes.csv")
    assert len(rows) == 48 + 2 * 48
    scenes = sh.read_scenes(heldout / "scenes.csv")
    for row, scene in zip(rows, scenes):
        img = np.asarray(Image.open(heldout / row["path"]))
        assert img.shape == (32, 32, 3) and row["split"] == "heldout"
        assert row["caption"] == scene.caption() and row["captions"].split("|")[0] == row["caption"]
        if not row["relation"]:
            size, colour, shape = row["caption"].split()[1:]
            assert row["captions"].split("|")[1] == f"a {colour} {shape}"
            assert (size, colour, shape) == (row["size_0"], row["colour_0"], row["shape_0"])
            assert _centre_colour(img, int(row["x_0"]), int(row["y_0"])) == sh.COLOURS[colour]
            assert row["path"] == f"classes/{colour}_{shape}/{row['path'].split('/')[-1]}"
            continue
        c0, s0, rel, c1, s1 = CAPTION.fullmatch(row["caption"]).groups()
        assert (c0, s0, c1, s1, rel) == (row["colour_0"], row["shape_0"], row["colour_1"], row["shape_1"], row["relation"])
        (ax, ay), (bx, by) = _colour_centroid(img, sh.COLOURS[c0]), _colour_centroid(img, sh.COLOURS[c1])
        assert {"left of": ax < bx - 8, "right of": ax > bx + 8, "above": ay < by - 8, "below": ay > by + 8}[rel]
        assert abs(ay - by) <= 5 if rel in ("left of", "right of") else abs(ax - bx) <= 5


def test_class_folders_and_quadruples_are_well_formed(heldout):
    folders = sorted(p.name for p in (heldout / "classes").iterdir())
    assert folders == sorted(sh.SEEN_CLASSES)  # 48 images: two per class
    assert all(len(list((heldout / "classes" / f).glob("*.png"))) == 2 for f in folders)
    quads = _read(heldout / "quadruples.csv")
    assert list(quads[0]) == ["image_0", "image_1", "caption_0", "caption_1", "tag"] and len(quads) == 48
    assert [q["tag"] for q in quads[:6]] == list(sh.TAGS) * 2
    split_of = {r["path"]: r["split"] for r in _read(heldout / "scenes.csv")}
    for q in quads:
        assert (heldout / q["image_0"]).is_file() and (heldout / q["image_1"]).is_file()
        assert split_of[q["image_0"]] == split_of[q["image_1"]] == "heldout"
        a, b = CAPTION.fullmatch(q["caption_0"]).groups(), CAPTION.fullmatch(q["caption_1"]).groups()
        want = {  # caption_1 from caption_0 by the tag's swap, written out from the words
            "attribute": (a[3], a[1], a[2], a[0], a[4]),
            "object": (a[0], a[4], a[2], a[3], a[1]),
            "relation": (a[0], a[1], sh.OPPOSITE[a[2]], a[3], a[4]),
        }[q["tag"]]
        assert b == want and a[0] != a[3] and a[1] != a[4]


def test_refuses_a_foreign_folder_and_replaces_its_own(tmp_path, heldout):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["shapes", str(foreign)])
    assert_one_line_error(result, str(foreign), "not empty")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    result = CliRunner().invoke(app, ["shapes", str(foreign / "notes.txt")])
    assert_one_line_error(result, "not a folder")
    # an earlier output is replaced whole: no heldout class folder survives a novel run
    redo = tmp_path / "redo"
    sh.write_shapes(redo, "heldout", limit=30)
    result = CliRunner().invoke(app, ["shapes", str(redo), "--split", "novel", "--limit", "6", "--seed", "3"], catch_exceptions=False)
    assert result.exit_code == 0 and "6 novel single-object images" in result.output
    assert sorted(p.name for p in (redo / "classes").iterdir()) == sorted(sh.NOVEL_CLASSES)
    assert len(list((redo / "quadruples").iterdir())) == 12
    assert json.loads((redo / "shapes.json").read_text())["seed"] == 3
    assert all(r["split"] == "novel" for r in _read(redo / "scenes.csv"))
