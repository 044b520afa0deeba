"""Per-component batch sizes (issue 9 item 3): the text encoder and VAE are exported for their own
batch sizes (TensorRT: their own profiles), recorded per component in the manifest, and the
runtime sends each component the batches it was built for."""

from __future__ import annotations

import json
import shutil
import sys
from types import SimpleNamespace

import pytest

from diffcls.engines import manifest as mf
from diffcls.export import ExportConfig, export_model
from diffcls.export import pipeline
from diffcls.models.spec import COMPONENTS


@pytest.fixture(scope="module")
def small_batches(tmp_path_factory, tiny_dir):
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("batches") / "engines"
    export_model(ExportConfig(out=out, model=tiny_dir, batch_sizes=(2, 4), vae_batch_size=3, text_batch_size=5, image_size=16, device="cpu"))
    return out


def test_manifest_records_each_components_batch_sizes(small_batches, tiny_dir):
    m = mf.read_manifest(small_batches)
    assert {c: m["components"][c]["batch_sizes"] for c in COMPONENTS} == {"text_encoder": [5], "vae_encoder": [3], "unet": [2, 4]}
    cmd = mf.fix_command(small_batches, m)
    assert "--batch-sizes 2,4" in cmd and "--vae-batch-size 3" in cmd and "--text-batch-size 5" in cmd


def test_text_batch_default_is_the_prompt_count_rounded_up(tmp_path, tiny_dir):
    model_dir = shutil.copytree(tiny_dir, tmp_path / "model")
    rows = "\n".join(f"a photo of a thing {i}.,thing {i},{i}" for i in range(17))
    (model_dir / "prompts.csv").write_text("prompt,classname,classidx\n" + rows + "\n")
    (model_dir / "diffcls.json").write_text(json.dumps({"prompts": "prompts.csv"}))
    assert pipeline.default_text_batch_size(SimpleNamespace(source=str(model_dir))) == 24
    assert pipeline.default_text_batch_size(SimpleNamespace(source=str(tiny_dir))) == 16  # no prompts file
    assert pipeline.default_text_batch_size(SimpleNamespace(source="<memory>")) == 16


class _Recorder:
    """An engine that records the batch size of every call and runs the real one."""

    def __init__(self, engine, calls: list):
        self.engine, self.calls = engine, calls
        self.component, self.spec, self.batch_sizes = engine.component, engine.spec, engine.batch_sizes
        self.device, self.dtype = engine.device, engine.dtype

    def __call__(self, feed):
        self.calls.append(int(next(iter(feed.values())).shape[0]))
        return self.engine(feed)


def test_runtime_sends_each_component_its_batches(small_batches, image_folder):
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.data.prompts import PromptSet
    from diffcls.runtime.algorithm.schedule import Schedule

    clf = Classifier.from_pretrained(backend="onnxruntime", engine_dir=small_batches, device="cpu", use_cache=False)
    e = clf.engines
    assert (e.text_encoder.batch_sizes, e.vae_encoder.batch_sizes, e.unet.batch_sizes) == ((5,), (3,), (2, 4))
    seen = {c: [] for c in COMPONENTS}
    for comp in COMPONENTS:
        setattr(e, comp, _Recorder(getattr(e, comp), seen[comp]))
    images = sorted(str(p) for p in image_folder.rglob("*.png"))[:4]
    results = list(clf.iter_classify(images, PromptSet.from_classes("cat,dog,bird", "a photo of a {}."), Schedule(n_samples=(2,), to_keep=(1,)), batch_size=4))
    assert len(results) == 4
    assert seen["text_encoder"] == [5]  # 3 prompts, padded to the one exported size
    assert seen["vae_encoder"] and set(seen["vae_encoder"]) == {3}
    assert seen["unet"] and set(seen["unet"]) <= {2, 4}


def test_tensorrt_builds_one_profile_set_per_component(monkeypatch, tmp_path, tiny):
    pytest.importorskip("onnxruntime")
    from test_trt import _FakeTRT

    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(pipeline, "resolve_export_device", lambda device, backend: "cuda")  # no GPU here
    monkeypatch.setattr(pipeline, "check_trt_against_torch", lambda *a, **k: {"max_abs_err": 0.0, "max_rel_err": 0.0, "check_batch": 1})
    out = tmp_path / "trt"
    result = export_model(ExportConfig(out=out, model=tiny, backend="tensorrt", precision="fp32", batch_sizes=(2, 4),
                                       vae_batch_size=3, text_batch_size=5, image_size=16))
    builds = [cfg for kind, cfg in fake.log if kind == "build"]
    assert len(builds) == 3  # text encoder, VAE encoder, UNet: in COMPONENTS order
    text, vae, unet = ([p.shapes for p in cfg.profiles] for cfg in builds)
    assert text == [{"input_ids": ((5, 77),) * 3}]
    assert vae == [{"image": ((3, 3, 16, 16),) * 3}]
    assert [p["sample"][0][0] for p in unet] == [2, 4]
    comps = result.manifest["components"]
    assert [comps[c]["batch_sizes"] for c in COMPONENTS] == [[5], [3], [2, 4]]
    assert comps["vae_encoder"]["settings"]["batch_sizes"] == [3]  # a new VAE size rebuilds only the VAE
