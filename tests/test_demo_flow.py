"""The bundled flow-matching demo (`demo-flow`): the digits UNet trained as a rectified flow.

It loads as a flow model with SD3's scheduler config, scores with its own default weighting,
and classifies held-out digits through the real runtime; the plain re-implementation of the loop
(tests/plain_loop.py with the flow noising, velocity target and weights) predicts what the
runtime predicts.
"""

from __future__ import annotations

import json

import pytest
import torch

from diffcls.models.loading import bundled_model_path, load_model

DEMO_FLOW = bundled_model_path("demo-flow")
TEST_IMAGES = 30  # the first 30 held-out digits: 3 per class
ACCURACY_FLOOR = 0.9  # room for float differences across machines; the shipped model's counts are in training.json


def test_demo_flow_is_a_flow_model_with_sd3s_scheduler():
    model = load_model("demo-flow")
    assert model.prediction_type == "flow" and model.sigmas is not None
    sched = json.loads((DEMO_FLOW / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0
    cfg = json.loads((DEMO_FLOW / "diffcls.json").read_text())
    assert cfg["weighting"] == "logit-normal" and cfg["prompts"] == "prompts.csv"
    total = sum(p.stat().st_size for p in DEMO_FLOW.rglob("*") if p.is_file())
    assert total <= 15 * 1024 * 1024
    info = json.loads((DEMO_FLOW / "training.json").read_text())
    assert info["eval_heldout"]["accuracy"] >= 0.95 and info["eval_heldout"]["weighting"] == "logit-normal"


@pytest.fixture(scope="module")
def heldout_pngs(tmp_path_factory):
    pytest.importorskip("sklearn")
    from diffcls.models.digits import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), "heldout", limit=TEST_IMAGES)


def test_demo_flow_classifies_and_the_plain_loop_agrees(heldout_pngs):
    from diffcls.models.digits import CLASSNAMES
    from diffcls.models.noising import timestep_weights
    from diffcls.models.wrappers import VaeEncoderWrapper
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.data.preprocess import load_and_preprocess
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule
    from diffcls.train.demo import prompts, text_embeddings
    from plain_loop import classify_latents

    schedule = Schedule((10, 50), (3, 1), weighting="logit-normal")  # the model's default
    clf = Classifier.from_pretrained("demo-flow", device="cpu", use_cache=False)
    runtime = [r.prediction for r in clf.classify(heldout_pngs, PromptSet.from_csv(DEMO_FLOW / "prompts.csv"), schedule)]
    truth = [CLASSNAMES.index(p.parent.name) for p in heldout_pngs]
    assert sum(a == b for a, b in zip(runtime, truth)) / TEST_IMAGES >= ACCURACY_FLOOR
    model = load_model("demo-flow")
    paths = heldout_pngs[:10]
    with torch.no_grad():
        x = torch.stack([load_and_preprocess(p, 32, "bicubic") for p in paths])
        lat = VaeEncoderWrapper(model.vae, model.scaling_factor)(x)
        emb = text_embeddings(model.tokenizer, model.text_encoder, [p for p, _, _ in prompts()])
    plain, _ = classify_latents(model.unet, lat, emb, model.alphas_cumprod, [10, 50], [3, 1],
                                sigmas=model.sigmas, weights=timestep_weights("logit-normal", 1000))
    assert plain == runtime[:10]
