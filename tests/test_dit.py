"""Class-conditional DiT models: loading, the scoring path against a plain re-implementation of
the paper's `eval_prob_dit.py` loop, ONNX export + ONNX Runtime, and the CLI. Tiny random DiTs
built from a `DiTTransformer2DModel` config; no network."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import random_image

from diffcls.cli.app import app
from diffcls.errors import DiffclsError
from diffcls.models.dit import DiTModel, LabelTokenizer, dit_scheduler_config, save_dit_directory, tiny_dit
from diffcls.models.loading import load_model, model_defaults
from diffcls.runtime.data.cache import DiskCache
from diffcls.runtime.execution.classifier import Classifier
from diffcls.runtime.data.prompts import PromptSet
from diffcls.runtime.algorithm.schedule import Schedule
from diffcls.runtime.algorithm.scoring import make_noise_bank

SIZE = 16  # px: the tiny DiT's VAE halves it to an 8x8 latent, patch 2 -> 16 tokens
runner = CliRunner()


@pytest.fixture(scope="module")
def dit() -> DiTModel:
    return tiny_dit(seed=0)


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory, dit):
    return save_dit_directory(dit, tmp_path_factory.mktemp("dit") / "tiny-dit", dit_scheduler_config())


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, SIZE, SIZE, generator=g) * 2 - 1 for _ in range(3)]


# --- a plain re-implementation of eval_prob_dit.py's scoring ----------------------------------
@torch.no_grad()
def eval_prob_dit(model: DiTModel, image: torch.Tensor, t_interval: int, noises: torch.Tensor):
    """Every class at every timestep t = t_interval//2, +t_interval, ... with noise noises[i] for
    the i-th t: q_sample with the model's alphas_cumprod, the first C output channels are the
    noise prediction, MSE per sample; the prediction is the argmin of the mean error."""
    x0 = model.vae.encode(image[None]).latent_dist.mean * model.scaling_factor  # (1, C, h, w)
    T = model.num_train_timesteps
    ts = torch.tensor(range(t_interval // 2, T, t_interval))
    a = model.alphas_cumprod[ts].view(-1, 1, 1, 1)
    noised = a.sqrt() * x0 + (1 - a).sqrt() * noises[: len(ts)]  # diffusion.q_sample
    errors = []
    for c in range(model.num_classes):
        out = model.transformer(noised, ts, class_labels=torch.full((len(ts),), c), return_dict=False)[0]
        C = noised.shape[1]
        noise_pred, _model_var_values = torch.split(out, C, dim=1)
        errors.append(((noise_pred - noises[: len(ts)]) ** 2).mean(dim=(1, 2, 3)).mean().item())
    return int(np.argmin(errors)), errors


def all_classes(model: DiTModel) -> PromptSet:
    return PromptSet.from_labels(model.id2label)


def test_scoring_matches_eval_prob_dit(dit, images):
    t_interval = 100  # 10 timesteps, as the official --t_interval with 1000 // 100
    schedule = Schedule(n_samples=(1000 // t_interval,), to_keep=(1,))
    noises = make_noise_bank(schedule, (4, 8, 8), seed=0)
    clf = Classifier.from_pretrained(dit, device="cpu", use_cache=False)
    results = clf.classify(images, all_classes(dit), schedule, batch_size=16)
    for image, r in zip(images, results):
        want, errors = eval_prob_dit(dit, image, t_interval, noises)
        assert r.prediction == want
        got = [r.scores[c] for c in range(dit.num_classes)]
        np.testing.assert_allclose(got, errors, rtol=1e-5, atol=1e-6)


def test_learned_sigma_first_channels_are_the_noise(dit):
    assert dit.transformer.config.out_channels == 2 * dit.latent_channels
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 700.0]), torch.tensor([1, 3])
    full = dit.transformer(x, t, class_labels=y, return_dict=False)[0]
    assert torch.equal(dit.wrap("unet")(x, t, y), full[:, :4])


def test_specs_describe_the_conditioning_input(dit):
    specs = dit.component_specs(SIZE)
    unet = specs["unet"]
    assert unet.input_names == ["sample", "timestep", "class_labels"]
    assert unet.condition == "class_labels" and unet.input("class_labels").dtype == "int64"
    assert not specs["text_encoder"].exported  # class ids need no encoder
    sd = load_model().component_specs(32)["unet"]
    assert sd.condition == "encoder_hidden_states" and sd.input(sd.condition).dtype == "float"


def test_directory_round_trip_and_defaults(dit, dit_dir):
    index = json.loads((dit_dir / "model_index.json").read_text())
    assert index["_class_name"] == "DiTPipeline" and index["id2label"]["1"] == "goldfish"
    loaded = load_model(dit_dir)
    assert isinstance(loaded, DiTModel)
    assert loaded.id2label == dit.id2label
    assert loaded.fingerprint() == dit.fingerprint()
    d = model_defaults(dit_dir)
    assert d["labels"][4] == "hammerhead"
    assert (d["n_samples"], d["to_keep"]) == ([200], [1])  # the official DiT protocol


def test_labels_pick_classes_by_id_or_name():
    labels = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "great white shark"}
    ps = PromptSet.from_labels(labels, "2,goldfish,Tinca tinca")
    assert ps.prompts == ("2", "1", "0") and ps.classnames == ("great white shark", "goldfish", "tench")
    assert PromptSet.from_labels(labels).classidx == (0, 1, 2)
    with pytest.raises(DiffclsError, match="not a class of this model"):
        PromptSet.from_labels(labels, "carp")
    with pytest.raises(DiffclsError, match="more than once"):
        PromptSet.from_labels(labels, "1,goldfish")
    tok = LabelTokenizer(labels)
    assert tok(["2", "tench", "Carassius auratus"]).input_ids.tolist() == [2, 0, 1]
    with pytest.raises(DiffclsError, match="class id 0..2"):
        tok(["7"])


def test_other_image_size_is_refused(dit):
    with pytest.raises(DiffclsError, match="--image-size 16"):
        dit.latent_shape(32)


# --- export: ONNX with per-sample timesteps and class labels, checked against torch -------------
@pytest.fixture(scope="module")
def dit_engines(tmp_path_factory, dit_dir):
    pytest.importorskip("onnxruntime")
    from diffcls.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("dit-engines") / "eng"
    result = export_model(ExportConfig(out=out, model=dit_dir, batch_sizes=(4, 8), device="cpu"))
    return out, result


def test_export_onnx_inputs_and_parity(dit_engines):
    import onnx

    out, result = dit_engines
    m = result.manifest
    assert m["kind"] == "dit" and sorted(m["components"]) == ["unet", "vae_encoder"]
    assert result.built == ["vae_encoder onnx", "unet onnx"]
    graph = onnx.load(str(out / "unet.onnx")).graph
    types = {i.name: i.type.tensor_type for i in graph.input}
    assert set(types) == {"sample", "timestep", "class_labels"}
    assert types["class_labels"].elem_type == onnx.TensorProto.INT64
    assert types["timestep"].shape.dim[0].dim_param == "B"  # one timestep per sample
    assert m["components"]["unet"]["max_rel_err"] < 1e-4
    assert json.loads((out / "tokenizer" / "id2label.json").read_text())["1"] == "goldfish"


def test_export_resumes_from_cache(dit_engines, dit_dir):
    from diffcls.export import ExportConfig, export_model

    out, _ = dit_engines
    again = export_model(ExportConfig(out=out, model=dit_dir, batch_sizes=(4, 8), device="cpu"))
    assert again.built == [] and again.cached == ["vae_encoder onnx", "unet onnx"]


def test_onnxruntime_classifies_like_torch_and_like_eval_prob_dit(dit, dit_engines, images):
    out, _ = dit_engines
    schedule = Schedule(n_samples=(10,), to_keep=(1,))
    ort_clf = Classifier.from_pretrained(None, backend="onnxruntime", engine_dir=out, device="cpu", use_cache=False)
    torch_clf = Classifier.from_pretrained(dit, device="cpu", use_cache=False)
    a = ort_clf.classify(images, all_classes(dit), schedule, batch_size=8)
    b = torch_clf.classify(images, all_classes(dit), schedule, batch_size=8)
    noises = make_noise_bank(schedule, (4, 8, 8), seed=0)
    for x, y, image in zip(a, b, images):
        assert x.prediction == y.prediction == eval_prob_dit(dit, image, 100, noises)[0]
        for c in x.scores:
            assert x.scores[c] == pytest.approx(y.scores[c], rel=1e-4)


def test_tensorrt_profiles_per_batch_size(dit):
    from diffcls.export.trt_build import plan_profiles

    profiles = plan_profiles(dit.component_specs(SIZE)["unet"], [4, 8])
    assert [p["class_labels"] for p in profiles] == [((4,),) * 3, ((8,),) * 3]
    assert profiles[1]["sample"][0] == (8, 4, 8, 8)


# --- CLI ----------------------------------------------------------------------------------------
def digit_like_folder(root, model: DiTModel):
    for c, name in list(model.id2label.items())[:2]:
        (root / name).mkdir(parents=True)
        for i in range(2):
            random_image(10 * c + i, size=(SIZE, SIZE)).save(root / name / f"{i}.png")
    return root


def test_cli_classify_dit_dir_and_engines_agree(tmp_path, dit, dit_dir, dit_engines):
    folder = digit_like_folder(tmp_path / "imgs", dit)
    args = ["--n-samples", "10", "--to-keep", "1", "--batch-size", "8", "--no-cache"]
    r1 = runner.invoke(app, ["classify", str(folder), "--model", str(dit_dir), "--out", str(tmp_path / "a.csv"), *args])
    assert r1.exit_code == 0, r1.output
    r2 = runner.invoke(app, ["classify", str(folder), "--engines", str(dit_engines[0]), "--out", str(tmp_path / "b.csv"), *args])
    assert r2.exit_code == 0, r2.output
    rows = [list(csv.DictReader(open(tmp_path / f))) for f in ("a.csv", "b.csv")]
    assert len(rows[0]) == 4
    assert [r["prediction"] for r in rows[0]] == [r["prediction"] for r in rows[1]]
    assert set(r["prediction"] for r in rows[0]) <= set(PromptSet.from_labels(dit.id2label).classnames)


def test_cli_classes_subset_and_bad_class(tmp_path, dit_dir):
    folder = tmp_path / "imgs"
    folder.mkdir()
    random_image(1, size=(SIZE, SIZE)).save(folder / "a.png")
    args = ["classify", str(folder), "--model", str(dit_dir), "--n-samples", "4", "--to-keep", "1", "--no-cache"]
    ok = runner.invoke(app, [*args, "--classes", "goldfish,3", "--out", str(tmp_path / "a.csv")])
    assert ok.exit_code == 0, ok.output
    assert next(csv.DictReader(open(tmp_path / "a.csv")))["prediction"] in ("goldfish", "tiger shark")
    bad = runner.invoke(app, [*args, "--classes", "carp", "--out", str(tmp_path / "b.csv")])
    assert bad.exit_code == 2 and "'carp' is not a class of this model" in bad.output


def test_cli_info_names_the_kind(dit_engines):
    r = runner.invoke(app, ["info", str(dit_engines[0])])
    assert r.exit_code == 0, r.output
    assert "model kind dit" in r.output and "class_labels int64" in r.output


# --- ADM center crop ------------------------------------------------------------------------------
def center_crop_arr(pil_image, image_size):
    """guided-diffusion's center_crop_arr, as eval_prob_dit.py uses it (numpy crop)."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


@pytest.mark.parametrize("size", [(301, 197), (100, 100), (64, 257), (33, 20)])
def test_adm_crop_matches_reference(size):
    from diffcls.runtime.data.preprocess import resize_center_crop

    img = random_image(7, size=size)
    got = np.asarray(resize_center_crop(img, 32, "adm"))
    want = np.asarray(center_crop_arr(img, 32))
    assert got.shape == (32, 32, 3)
    assert np.array_equal(got, want)
    if size == (301, 197):  # box-halving differs from a direct bicubic resize
        assert not np.array_equal(got, np.asarray(resize_center_crop(img, 32, "bicubic")))


def test_cli_profile_runs_a_dit(tmp_path, dit, dit_dir):
    folder = digit_like_folder(tmp_path / "imgs", dit)
    r = runner.invoke(app, ["profile", str(folder), "--model", str(dit_dir), "--n-samples", "4", "--to-keep", "1",
                            "--no-cache", "--json", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "p.json").read_text())


def test_cached_rerun_skips_the_vae_and_scores_the_same(tmp_path, dit, images):
    from diffcls.engines import open_engines

    engines = open_engines("torch", model=tiny_dit(seed=0), device="cpu")  # own engines: counts calls
    schedule = Schedule(n_samples=(4,), to_keep=(1,))
    first = Classifier(engines, cache=DiskCache(tmp_path)).classify(images, all_classes(dit), schedule)
    vae_calls = engines.vae_encoder.calls
    again = Classifier(engines, cache=DiskCache(tmp_path)).classify(images, all_classes(dit), schedule)
    assert engines.vae_encoder.calls == vae_calls  # latents came from the cache
    assert [r.scores for r in again] == [r.scores for r in first]


def test_cli_adaptive_schedule_runs_a_dit(tmp_path, dit, dit_dir):
    folder = digit_like_folder(tmp_path / "imgs", dit)
    r = runner.invoke(app, ["classify", str(folder), "--model", str(dit_dir), "--adaptive", "--max-samples", "20",
                            "--min-samples", "4", "--no-cache", "--out", str(tmp_path / "a.csv")])
    assert r.exit_code == 0, r.output
    assert len(list(csv.DictReader(open(tmp_path / "a.csv")))) == 4
