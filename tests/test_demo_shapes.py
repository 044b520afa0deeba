"""The bundled `demo-shapes` model: it loads by name, its prompts name every class folder
`diffcls shapes` writes, its tokenizer keeps caption words whole, and it classifies generated
scenes through the CLI (12 heldout images, one per class of the first 12, default schedule)."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from diffcls.cli.app import app
from diffcls.models import load_model
from diffcls.models import shapes as sh
from diffcls.models.loading import bundled_model_path

MODEL = bundled_model_path("demo-shapes")
TEST_IMAGES = 12
ACCURACY_FLOOR = 0.75  # the shipped model gets 12/12 here (see BENCHMARKS.md for the whole split)


def test_loads_by_name_with_its_own_defaults():
    model = load_model("demo-shapes")
    assert model.source == str(MODEL) and model.default_image_size == 32
    defaults = json.loads((MODEL / "diffcls.json").read_text())
    with open(MODEL / defaults["prompts"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["classname"] for r in rows] == list(sh.ALL_CLASSES)  # every colour-shape pair, novel ones too
    assert all(r["prompt"] == "a " + r["classname"].replace("_", " ") for r in rows)
    sizes = sum(p.stat().st_size for p in MODEL.rglob("*") if p.is_file())
    assert sizes < 10e6


def test_caption_words_are_tokens_and_order_reaches_the_encoder():
    tok = load_model("demo-shapes").tokenizer
    for word in sh.CAPTION_WORDS:
        pieces = tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids)
        assert pieces == [word + "</w>"], word
    a = tok("a red circle left of a blue square").input_ids
    b = tok("a blue circle left of a red square").input_ids
    assert len(a) == len(b) == 10 and sorted(a) == sorted(b) and a != b  # same words, order differs


def test_binds_words_to_objects():
    """Winoground's text score on 24 heldout swaps of each kind ("a red circle left of a blue
    square" vs "a blue circle left of a red square", or vs "a red circle right of a blue square";
    16 timesteps, shared noise). A model that reads its captions as bags of words cannot tell
    the two captions apart and scores at most chance (25%); the model shipped before hard-negative
    training scored 50% on these attribute items and 21% on relation items; this one binds
    both (BENCHMARKS.md: the whole split on 50 timesteps)."""
    from diffcls.train.shapes import text_score

    res = text_score(load_model("demo-shapes"), "heldout", n=72, M=16)  # tags cycle: 24 items each
    assert res["by_tag"]["attribute"] >= 0.75 and res["by_tag"]["relation"] >= 0.75, res


def test_classifies_generated_scenes_through_the_cli(tmp_path):
    data = tmp_path / "shapes"
    r = CliRunner().invoke(app, ["shapes", str(data), "--limit", str(TEST_IMAGES)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(app, ["evaluate", str(data / "classes"), "--model", "demo-shapes", "--no-cache",
                                 "--json", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["n"] == TEST_IMAGES
    assert res["top1"] >= ACCURACY_FLOOR, res
