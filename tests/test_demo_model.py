"""The bundled demo model and its data: it loads, its digits split is fixed, and it classifies.

The accuracy test runs the real runtime (`Classifier`) on PNGs written by `write_digits`, the
same path as `diffcls digits OUT && diffcls evaluate OUT`, with the model's default schedule
(10 then 50 timesteps, 3 classes kept): about 20 s on 2 cores.
"""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from diffcls.errors import DiffclsError
from diffcls.models import default_model_path, load_model

DEMO = default_model_path()
TEST_IMAGES = 50  # the first 50 held-out digits: 5 per class
TEST_SCHEDULE = dict(n_samples=(10, 50), to_keep=(3, 1))
# the shipped model gets 50/50 on this subset (and 358/359 on all held-out digits with the
# default schedule); the floor leaves room for float differences across machines and backends
ACCURACY_FLOOR = 0.9


def prompt_rows() -> list[dict]:
    with open(DEMO / "prompts.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- the shipped model ------------------------------------------------------------------------
def test_demo_loads_by_default():
    model = load_model(None)
    assert model.source == str(DEMO)
    assert model.num_train_timesteps == 1000
    assert model.default_image_size == 32
    assert model.latent_shape(32) == (4, 8, 8)
    assert model.scaling_factor != 0.18215  # measured on the digits, not SD's


def test_demo_prompts_and_defaults():
    from diffcls.models.digits import CLASSNAMES

    rows = prompt_rows()
    assert list(rows[0]) == ["prompt", "classname", "classidx"]
    assert len(rows) == 10
    assert [r["classname"] for r in rows] == list(CLASSNAMES)
    assert [int(r["classidx"]) for r in rows] == list(range(10))
    assert len({r["prompt"] for r in rows}) == 10
    cfg = json.loads((DEMO / "diffcls.json").read_text())
    assert cfg["image_size"] == 32 and cfg["prompts"] == "prompts.csv"
    assert cfg["to_keep"][-1] == 1 and len(cfg["n_samples"]) == len(cfg["to_keep"])


def test_demo_prompt_words_are_single_tokens():
    model = load_model(None)
    for r in prompt_rows():
        ids = model.tokenizer(r["prompt"]).input_ids
        assert len(ids) == len(r["prompt"].split()) + 2  # BOS, one token per word, EOS


def test_demo_weights_are_small_safetensors():
    weights = sorted(DEMO.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"text_encoder", "vae", "unet"}
    assert not list(DEMO.rglob("*.bin")) and not list(DEMO.rglob("*.pt"))
    total = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024


# --- the data ---------------------------------------------------------------------------------
def test_split_is_fixed_disjoint_and_stratified():
    pytest.importorskip("sklearn")
    from diffcls.models.digits import load_split, split_indices

    held, train = split_indices("heldout"), split_indices("train")
    assert len(set(held.tolist()) & set(train.tolist())) == 0
    assert sorted(held.tolist() + train.tolist()) == list(range(1797))
    assert len(held) == 359  # 20% of every class, rounded
    images, labels = load_split("heldout")
    assert images.shape == (359, 8, 8) and images.dtype == np.uint8 and images.max() <= 16
    assert np.bincount(labels, minlength=10).min() >= 35
    assert labels[:10].tolist() == list(range(10))  # class-interleaved: any prefix is balanced
    # fixed: the same digits every time (first held-out indices pinned)
    assert held[:5].tolist() == [36, 70, 115, 3, 144]


def test_write_digits_class_folders(tmp_path):
    pytest.importorskip("sklearn")
    from PIL import Image

    from diffcls.models.digits import CLASSNAMES, load_split, render_digit, split_indices, write_digits

    paths = write_digits(tmp_path, "heldout", limit=20)
    assert len(paths) == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(CLASSNAMES)
    assert sorted(CLASSNAMES) == sorted(r["classname"] for r in prompt_rows())
    held = set(split_indices("heldout").tolist())
    images, labels = load_split("heldout")
    for k, p in enumerate(paths):
        assert p.parent.parent == tmp_path and p.name.startswith("heldout_")
        assert int(p.stem.split("_")[1]) in held
        assert p.parent.name == CLASSNAMES[labels[k]]
        with Image.open(p) as im:  # the PNG is exactly render_digit's image
            assert im.size == (32, 32)
            assert np.array_equal(np.asarray(im), np.asarray(render_digit(images[k])))
    train_paths = write_digits(tmp_path / "train", "train", limit=10)
    assert all(int(p.stem.split("_")[1]) not in held for p in train_paths)


def test_digits_cli(tmp_path):
    pytest.importorskip("sklearn")
    from diffcls.cli.app import app

    result = CliRunner().invoke(app, ["digits", str(tmp_path / "d"), "--limit", "10"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "d").rglob("*.png"))) == 10
    bad = CliRunner().invoke(app, ["digits", str(tmp_path / "e"), "--split", "test"])
    assert bad.exit_code == 2


def test_missing_scikit_learn_names_the_extra(monkeypatch):
    from diffcls.models import digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import -> ImportError
    with pytest.raises(DiffclsError, match=r'pip install -e "\.\[train\]"'):
        digits.load_split("heldout")


# --- accuracy, through the real runtime ------------------------------------------------------
@pytest.fixture(scope="module")
def heldout_pngs(tmp_path_factory):
    pytest.importorskip("sklearn")
    from diffcls.models.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), "heldout", limit=TEST_IMAGES)


def test_demo_accuracy_on_heldout_digits(heldout_pngs):
    from diffcls.models.digits import CLASSNAMES
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule

    clf = Classifier.from_pretrained(None, device="cpu", use_cache=False)
    results = clf.classify(heldout_pngs, PromptSet.from_csv(DEMO / "prompts.csv"), Schedule(**TEST_SCHEDULE))
    truth = [CLASSNAMES.index(p.parent.name) for p in heldout_pngs]
    correct = sum(r.prediction == t for r, t in zip(results, truth))
    assert len(results) == TEST_IMAGES
    assert correct / TEST_IMAGES >= ACCURACY_FLOOR, f"{correct}/{TEST_IMAGES} held-out digits correct"


def test_train_demo_eval_loop_matches_runtime(heldout_pngs):
    """The plain re-implementation of the scoring loop (tests/plain_loop.py) predicts what the runtime does."""
    from plain_loop import classify_latents

    from diffcls.train.demo import prompts, text_embeddings
    from diffcls.models.wrappers import VaeEncoderWrapper
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.data.preprocess import load_and_preprocess
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule

    import torch

    paths = heldout_pngs[:10]
    schedule = dict(n_samples=(4, 12), to_keep=(2, 1))
    clf = Classifier.from_pretrained(None, device="cpu", use_cache=False)
    runtime = [r.prediction for r in clf.classify(paths, PromptSet.from_csv(DEMO / "prompts.csv"), Schedule(**schedule))]
    model = load_model(None)
    with torch.no_grad():
        x = torch.stack([load_and_preprocess(p, 32, "bicubic") for p in paths])
        lat = VaeEncoderWrapper(model.vae, model.scaling_factor)(x)
        emb = text_embeddings(model.tokenizer, model.text_encoder, [p for p, _, _ in prompts()])
    plain, evals = classify_latents(model.unet, lat, emb, model.alphas_cumprod, **{k: list(v) for k, v in schedule.items()})
    assert plain == runtime
    assert evals == 10 * (10 * 4 + 2 * 8)
    # the trainers' evaluation runs the library's loop on the model's own modules: the same answers
    from diffcls.train.demo import classify_in_chunks

    assert classify_in_chunks(model, lat, emb, torch.zeros(10), *schedule.values(), 1, 0, chunk=4) == (plain, evals)
