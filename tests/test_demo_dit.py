"""The bundled demo DiT (`--model demo-dit`): it loads by name, is small, and classifies digits.

Trained by `python -m diffcls.train.dit` (recipe in its training.json) on the same digits split
as the SD demo. The accuracy test runs the real runtime on PNGs written by `write_digits`.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from diffcls.models.dit import DiTModel
from diffcls.models.loading import bundled_model_path, load_model, model_defaults

DEMO_DIT = bundled_model_path("demo-dit")
TEST_IMAGES = 20  # the first 20 held-out digits: 2 per class
ACCURACY_FLOOR = 0.9  # room for float differences across machines (see training.json for all 359)


def test_demo_dit_loads_by_name():
    from diffcls.models.digits import CLASSNAMES

    model = load_model("demo-dit")
    assert isinstance(model, DiTModel) and model.source == str(DEMO_DIT)
    assert model.id2label == dict(enumerate(CLASSNAMES))
    assert model.default_image_size == 32 and model.latent_shape(32) == (4, 8, 8)
    assert model.transformer.config.out_channels == 8  # learned sigma, as DiT
    # it reuses the SD demo's VAE unchanged
    assert model.scaling_factor == load_model("demo").scaling_factor


def test_demo_dit_is_small_safetensors_with_a_recipe():
    weights = sorted(DEMO_DIT.rglob("*.safetensors"))
    assert {p.parent.name for p in weights} == {"transformer", "vae"}
    total = sum(p.stat().st_size for p in DEMO_DIT.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024
    info = json.loads((DEMO_DIT / "training.json").read_text())
    assert info["eval_heldout"]["accuracy"] >= 0.95
    d = model_defaults("demo-dit")
    assert d["labels"][3] == "three" and d["to_keep"][-1] == 1


@pytest.fixture(scope="module")
def heldout_pngs(tmp_path_factory):
    pytest.importorskip("sklearn")
    from diffcls.models.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), "heldout", limit=TEST_IMAGES)


def test_demo_dit_runtime_matches_trainer_loop_and_is_accurate(heldout_pngs):
    """The runtime's DiT path predicts what the trainer's plain loop does, and mostly correctly."""
    import torch

    from diffcls.models.digits import CLASSNAMES
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.data.preprocess import load_and_preprocess
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule
    from plain_loop import AsUnet, classify_latents

    d = model_defaults("demo-dit")
    schedule = dict(n_samples=tuple(d["n_samples"]), to_keep=tuple(d["to_keep"]))
    clf = Classifier.from_pretrained("demo-dit", device="cpu", use_cache=False)
    results = clf.classify(heldout_pngs, PromptSet.from_labels(d["labels"]), Schedule(**schedule))
    runtime = [r.prediction for r in results]
    model = load_model("demo-dit")
    with torch.no_grad():
        x = torch.stack([load_and_preprocess(p, 32, "bicubic") for p in heldout_pngs])
        lat = model.wrap("vae_encoder")(x)
    plain, _ = classify_latents(AsUnet(model), lat, torch.arange(10), model.alphas_cumprod,
                                **{k: list(v) for k, v in schedule.items()})
    assert plain == runtime
    from diffcls.train.demo import classify_in_chunks  # the trainers' evaluation: the library's loop

    assert classify_in_chunks(model, lat, torch.arange(10), torch.zeros(len(lat)), *schedule.values(), 1, 0, chunk=8)[0] == plain
    truth = [CLASSNAMES.index(p.parent.name) for p in heldout_pngs]
    correct = sum(p == t for p, t in zip(runtime, truth))
    assert correct / TEST_IMAGES >= ACCURACY_FLOOR, f"{correct}/{TEST_IMAGES} held-out digits correct"


def test_cli_model_demo_dit(tmp_path, heldout_pngs):
    from diffcls.cli.app import app

    folder = heldout_pngs[0].parent.parent
    r = CliRunner().invoke(
        app, ["classify", str(folder), "--model", "demo-dit", "--n-samples", "4", "--to-keep", "1",
              "--no-cache", "--out", str(tmp_path / "p.csv")],
    )
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "p.csv").read_text().strip().splitlines()) == TEST_IMAGES + 1
