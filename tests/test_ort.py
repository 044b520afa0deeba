"""The onnxruntime backend: same numbers as the torch backend, and clear refusals of bad engine dirs."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime (pip install 'diffcls[onnx]')")

from conftest import EXPORT_BATCH_SIZES as BATCH_SIZES  # noqa: E402
from conftest import EXPORT_IMAGE_SIZE as IMAGE_SIZE  # noqa: E402
from conftest import copy_of  # noqa: E402

from diffcls.engines import open_engines  # noqa: E402
from diffcls.errors import DiffclsError  # noqa: E402
from diffcls.export.onnx_export import random_feed  # noqa: E402
from diffcls.models.spec import COMPONENTS  # noqa: E402


@pytest.fixture(scope="module")
def ort_engines(engine_dir):
    return open_engines("onnxruntime", engine_dir=engine_dir, device="cpu")


@pytest.fixture(scope="module")
def torch_engines(tiny):
    return open_engines("torch", model=tiny, device="cpu", image_size=IMAGE_SIZE)


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("component", COMPONENTS)
def test_each_component_matches_torch(component, ort_engines, torch_engines, tiny):
    ort_e, torch_e = getattr(ort_engines, component), getattr(torch_engines, component)
    for batch in ort_e.batch_sizes:  # each component's own exported sizes
        feed = random_feed(tiny, ort_e.spec, batch, seed=7)
        got = ort_e(feed)[ort_e.spec.output_names[0]]
        want = torch_e(feed)[torch_e.spec.output_names[0]]
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_engine_set_carries_tokenizer_and_schedule(ort_engines, torch_engines, tiny):
    assert torch.equal(ort_engines.alphas_cumprod, torch_engines.alphas_cumprod)
    prompts = ["a photo of a cat", "dog", ""]
    assert torch.equal(ort_engines.tokenize(prompts), torch_engines.tokenize(prompts))
    assert ort_engines.fingerprint == tiny.fingerprint()
    assert ort_engines.latent_shape == torch_engines.latent_shape
    assert (ort_engines.backend, ort_engines.precision, ort_engines.device.type) == ("onnxruntime", "fp32", "cpu")


def test_classify_through_ort_matches_torch(engine_dir, tiny):
    """Same images, same noise bank: same predictions and per-(prompt, t) errors as torch."""
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.algorithm.schedule import Schedule

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1 for _ in range(3)]
    prompts = ["a cat", "a dog", "a bird"]
    schedule = Schedule(n_samples=(2, 4), to_keep=(2, 1))
    ort = Classifier.from_pretrained(backend="onnxruntime", engine_dir=engine_dir, device="cpu", use_cache=False)
    ref = Classifier.from_pretrained(tiny, backend="torch", device="cpu", image_size=IMAGE_SIZE, use_cache=False)
    got = ort.classify(images, prompts, schedule, seed=3, batch_size=4)
    want = ref.classify(images, prompts, schedule, seed=3, batch_size=4)
    assert [r.prediction for r in got] == [r.prediction for r in want]
    for g_r, w_r in zip(got, want):
        assert [(p, t, j) for p, t, j, _ in g_r.errors] == [(p, t, j) for p, t, j, _ in w_r.errors]
        for (_, _, _, a), (_, _, _, b) in zip(g_r.errors, w_r.errors):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    assert ort.engines.unet.calls > 0


def test_wrong_batch_size_is_refused(ort_engines, tiny):
    feed = random_feed(tiny, ort_engines.unet.spec, 3)
    with pytest.raises(DiffclsError) as e:
        ort_engines.unet(feed)
    msg = one_line_error(e)
    assert "batch sizes 2, 4, not 3" in msg


def test_requested_batch_size_outside_manifest_is_refused(engine_dir):
    with pytest.raises(DiffclsError) as e:
        open_engines("onnxruntime", engine_dir=engine_dir, device="cpu", batch_sizes=(8,))
    msg = one_line_error(e)
    assert "not 8" in msg and "diffcls export" in msg and "--batch-sizes 2,4,8" in msg


def test_missing_component_file(engine_dir, tmp_path):
    broken = copy_of(engine_dir, tmp_path / "e")
    (broken / "unet.onnx").unlink()
    with pytest.raises(DiffclsError) as e:
        open_engines("onnxruntime", engine_dir=broken, device="cpu")
    msg = one_line_error(e)
    assert "unet file" in msg and "is missing" in msg
    assert f"diffcls export --model {engine_dir_model(engine_dir)} --out {broken}" in msg


def engine_dir_model(engine_dir):
    return json.loads((engine_dir / "manifest.json").read_text())["source"]


def test_corrupted_onnx_file(engine_dir, tmp_path):
    broken = copy_of(engine_dir, tmp_path / "e")
    with open(broken / "vae_encoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(DiffclsError) as e:
        open_engines("onnxruntime", engine_dir=broken, device="cpu")
    msg = one_line_error(e)
    assert "vae_encoder" in msg and "corrupted" in msg and "diffcls export" in msg


def test_manifest_from_another_model(engine_dir):
    from diffcls.models import tiny_model

    other = tiny_model(seed=1)
    with pytest.raises(DiffclsError) as e:
        open_engines("onnxruntime", engine_dir=engine_dir, model=other, device="cpu")
    msg = one_line_error(e)
    assert "another model" in msg and other.fingerprint() in msg and "diffcls export" in msg


def test_the_right_model_is_accepted(engine_dir, tiny_dir):
    engines = open_engines("onnxruntime", engine_dir=engine_dir, model=tiny_dir, device="cpu")
    assert engines.unet.batch_sizes == BATCH_SIZES


def test_image_size_mismatch(engine_dir):
    with pytest.raises(DiffclsError) as e:
        open_engines("onnxruntime", engine_dir=engine_dir, image_size=32, device="cpu")
    msg = one_line_error(e)
    assert "image size 16, not 32" in msg and "--image-size 32" in msg


def test_precision_mismatch(engine_dir):
    with pytest.raises(DiffclsError) as e:
        open_engines("onnxruntime", engine_dir=engine_dir, precision="fp16", device="cpu")
    assert "fp32 engines, not fp16" in one_line_error(e)


def test_backend_mismatch(engine_dir):
    from diffcls.engines.manifest import verify_engine_dir

    with pytest.raises(DiffclsError) as e:
        verify_engine_dir(engine_dir, backend="tensorrt")
    msg = one_line_error(e)
    assert "exported for the onnxruntime backend, not tensorrt" in msg and "--backend tensorrt" in msg


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 99})])
def test_corrupt_manifest(engine_dir, tmp_path, content):
    broken = copy_of(engine_dir, tmp_path / "e")
    (broken / "manifest.json").write_text(content)
    with pytest.raises(DiffclsError) as e:
        open_engines("onnxruntime", engine_dir=broken, device="cpu")
    msg = one_line_error(e)
    assert "manifest.json" in msg and "diffcls export" in msg


def test_missing_manifest_and_missing_dir(tmp_path):
    with pytest.raises(DiffclsError) as e:
        open_engines("onnxruntime", engine_dir=tmp_path, device="cpu")
    assert "no manifest.json" in one_line_error(e)
    with pytest.raises(DiffclsError) as e:
        open_engines("onnxruntime", engine_dir=tmp_path / "nope", device="cpu")
    assert "does not exist" in one_line_error(e)


def test_missing_provider_names_the_available_ones():
    import onnxruntime

    from diffcls.engines.ort_backend import resolve_providers

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDAExecutionProvider is installed here")
    with pytest.raises(DiffclsError) as e:
        resolve_providers("cpu", providers=["CUDAExecutionProvider"])
    msg = one_line_error(e)
    assert "CUDAExecutionProvider is not available" in msg and "CPUExecutionProvider" in msg


def test_torch_backend_refuses_engine_dir(engine_dir):
    with pytest.raises(DiffclsError):
        open_engines("torch", engine_dir=engine_dir)
