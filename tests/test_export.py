"""`diffcls export`: ONNX graphs checked against torch, manifest, caching, fp16, fusion, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="export checks graphs with onnxruntime (pip install 'diffcls[onnx]')")

from conftest import EXPORT_BATCH_SIZES as BATCH_SIZES  # noqa: E402
from conftest import EXPORT_IMAGE_SIZE as IMAGE_SIZE  # noqa: E402
from conftest import copy_of  # noqa: E402
from conftest import assert_one_line_error  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from diffcls.errors import DiffclsError  # noqa: E402
from diffcls.export import ExportConfig, export_model  # noqa: E402
from diffcls.export import onnx_export as ox  # noqa: E402
from diffcls.engines.manifest import sha256_file  # noqa: E402
from diffcls.models.spec import COMPONENTS, model_component_specs  # noqa: E402


def test_manifest_records_what_was_built(engine_dir, tiny):
    m = json.loads((engine_dir / "manifest.json").read_text())
    assert m["backend"] == "onnxruntime" and m["fingerprint"] == tiny.fingerprint()
    assert m["image_size"] == IMAGE_SIZE and m["latent_shape"] == [4, 8, 8]
    assert {"torch", "onnx", "onnxruntime"} <= set(m["versions"])
    for c in COMPONENTS:
        e = m["components"][c]
        assert e["file"] == f"{c}.onnx" and e["precision"] == "fp32"
        # the UNet gets the asked sizes; the text encoder and VAE their own (defaults: 16 without a prompts file, 8)
        assert e["batch_sizes"] == {"text_encoder": [16], "vae_encoder": [8], "unet": list(BATCH_SIZES)}[c]
        assert e["opset"] == ox.OPSET
        assert e["files"] == {e["file"]: sha256_file(engine_dir / e["file"])}
        assert e["max_rel_err"] < 1e-4 and e["max_abs_err"] >= 0
    assert (engine_dir / "tokenizer").is_dir() and (engine_dir / "alphas_cumprod.json").is_file()


def test_graphs_have_spec_names_and_dynamic_batch(engine_dir, tiny):
    import onnx

    specs = model_component_specs(tiny, IMAGE_SIZE)
    for c in COMPONENTS:
        g = onnx.load(str(engine_dir / f"{c}.onnx")).graph
        assert [i.name for i in g.input] == specs[c].input_names
        assert [o.name for o in g.output] == specs[c].output_names
        assert g.input[0].type.tensor_type.shape.dim[0].dim_param == "B"


def test_second_export_skips_everything(engine_dir, tiny_dir):
    events = []
    result = export_model(
        ExportConfig(out=engine_dir, model=tiny_dir, batch_sizes=BATCH_SIZES, image_size=IMAGE_SIZE, device="cpu"),
        events.append,
    )
    assert result.built == [] and len(result.cached) == 3
    cached = [e.message for e in events if e.status == "cached"]
    assert all(msg.startswith("found cached ") for msg in cached) and len(cached) == 3


def test_only_stale_components_are_rebuilt(engine_dir, tiny_dir, tmp_path):
    d = copy_of(engine_dir, tmp_path / "e")
    with open(d / "text_encoder.onnx", "ab") as f:
        f.write(b"junk")  # hash mismatch -> rebuilt
    result = export_model(ExportConfig(out=d, model=tiny_dir, batch_sizes=BATCH_SIZES, image_size=IMAGE_SIZE, device="cpu"))
    assert result.built == ["text_encoder onnx"]
    m = json.loads((d / "manifest.json").read_text())
    assert m["components"]["text_encoder"]["files"]["text_encoder.onnx"] == sha256_file(d / "text_encoder.onnx")


def test_check_rejects_a_graph_above_tolerance():
    ref = np.ones((2, 4), np.float32)
    with pytest.raises(DiffclsError) as e:
        ox.measure("unet", ref, ref * 1.01, "fp32")
    msg = str(e.value)
    assert "\n" not in msg and "unet (fp32) differs from torch" in msg and "tolerance" in msg
    assert ox.measure("unet", ref, ref * 1.01, "fp16")["max_rel_err"] == pytest.approx(0.01, rel=1e-3)


def test_fp16_export_runs_on_cpu(tiny, tmp_path):
    """fp16 = fp32 ONNX converted by ORT's float16 tool; norms and Resize scales stay fp32."""
    import onnx
    import onnxruntime as ort

    spec = model_component_specs(tiny, IMAGE_SIZE)["unet"]
    fp32 = ox.export_onnx(tiny, "unet", spec, tmp_path / "unet32.onnx")
    ox.convert_fp16(fp32, tmp_path / "unet16.onnx")
    check = ox.check_against_torch(tiny, "unet", spec, tmp_path / "unet16.onnx", "fp16")
    assert 0 < check["max_rel_err"] < ox.TOLERANCE["fp16"]
    sess = ort.InferenceSession(str(tmp_path / "unet16.onnx"), providers=["CPUExecutionProvider"])
    assert {i.type for i in sess.get_inputs()} == {"tensor(float16)"}
    g = onnx.load(str(tmp_path / "unet16.onnx")).graph
    inits = {i.name: i for i in g.initializer}
    for node in g.node:
        if node.op_type == "Resize" and len(node.input) > 2 and node.input[2] in inits:
            assert inits[node.input[2]].data_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("large", [False, True])
def test_fp16_conversion_of_external_weights_streams_them_into_the_same_graph(tiny, tmp_path, monkeypatch, large):
    """A graph with its weights in a .data file (every model over 2 GB) is converted without
    loading them (`convert_fp16_streamed`) into the graph the in-memory route writes: same nodes,
    value types, initializers (names, types, shapes, bytes) and outputs. `large`: the output is
    written with external weights too (what an SDXL-size UNet gets), else inline."""
    import onnx
    import onnxruntime as ort

    spec = model_component_specs(tiny, IMAGE_SIZE)["unet"]
    fp32 = ox.export_onnx(tiny, "unet", spec, tmp_path / "unet32.onnx")
    ext = tmp_path / "ext" / "unet32.onnx"
    ext.parent.mkdir()
    onnx.save_model(onnx.load(str(fp32)), str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="unet32.onnx.data", size_threshold=1024)
    streamed, real = [], ox.convert_fp16_streamed
    monkeypatch.setattr(ox, "convert_fp16_streamed", lambda *a: streamed.append(a) or real(*a))
    if large:
        monkeypatch.setattr(ox, "LARGE_BYTES", 0)
    ox.convert_fp16(fp32, tmp_path / "mem16.onnx")  # inline weights: the in-memory route
    ox.convert_fp16(ext, tmp_path / "ext" / "str16.onnx")
    assert len(streamed) == 1 and (tmp_path / "ext" / "str16.onnx.data").exists() == large
    a, b = (onnx.load(str(p)) for p in (tmp_path / "mem16.onnx", tmp_path / "ext" / "str16.onnx"))
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert sorted(v.SerializeToString() for v in a.graph.value_info) == sorted(v.SerializeToString() for v in b.graph.value_info)
    ia, ib = ({t.name: t for t in g.graph.initializer} for g in (a, b))
    assert ia.keys() == ib.keys()
    for name in ia:
        assert (ia[name].data_type, list(ia[name].dims)) == (ib[name].data_type, list(ib[name].dims)), name
        assert onnx.numpy_helper.to_array(ia[name]).tobytes() == onnx.numpy_helper.to_array(ib[name]).tobytes(), name
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in ib.values()) > 10
    feed = {k: v.numpy().astype(np.float16) for k, v in ox.random_feed(tiny, spec, 2).items()}
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
            for p in (tmp_path / "mem16.onnx", tmp_path / "ext" / "str16.onnx")]
    assert np.array_equal(outs[0], outs[1])


def test_weights_torch_writes_per_file_are_gathered_into_one(tiny, tmp_path):
    """Over 2 GB torch writes a file per weight; `gather_external_data` copies them into the one
    `<name>.data` an engine directory has, without loading them: the same graph and bytes."""
    import onnx

    spec = model_component_specs(tiny, IMAGE_SIZE)["unet"]
    fp32 = ox.export_onnx(tiny, "unet", spec, tmp_path / "unet.onnx")
    raw = tmp_path / "raw" / "model.onnx"
    raw.parent.mkdir()
    original = onnx.load(str(fp32))
    onnx.save_model(original, str(raw), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=1024)
    assert len(list(raw.parent.iterdir())) > 10
    light = onnx.load(str(raw), load_external_data=False)
    out = tmp_path / "out" / "unet.onnx"
    out.parent.mkdir()
    assert ox.gather_external_data(light, raw.parent, out) == [out, out.with_name("unet.onnx.data")]
    assert sorted(p.name for p in out.parent.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    got, original = onnx.load(str(out)), onnx.load(str(fp32))  # (saving moved the first copy's weights out)
    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in original.graph.node]
    a = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in got.graph.initializer}
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_ort_fusion_on_cpu_matches_torch(engine_dir, tiny, tmp_path):
    """The GPU fusion recipe's portable part (attention, LayerNorm) runs on CPU and is exact."""
    fused = ox.optimize_unet(engine_dir / "unet.onnx", gpu=False)
    ops = ox.fused_ops(fused)
    assert ops.get("MultiHeadAttention", 0) + ops.get("Attention", 0) > 0, ops
    ox.save_onnx_model(fused, tmp_path / "unet_fused.onnx")
    spec = model_component_specs(tiny, IMAGE_SIZE)["unet"]
    check = ox.check_against_torch(tiny, "unet", spec, tmp_path / "unet_fused.onnx", "fp32")
    assert check["max_rel_err"] < 1e-4


def test_gpu_fusion_options_enable_cuda_only_ops():
    gpu, cpu = ox.fusion_options(gpu=True), ox.fusion_options(gpu=False)
    assert gpu.enable_group_norm and gpu.enable_nhwc_conv and gpu.enable_bias_splitgelu
    assert not (cpu.enable_group_norm or cpu.enable_nhwc_conv or cpu.enable_bias_splitgelu)
    assert gpu.enable_attention and cpu.enable_attention


def test_optimize_defaults(tiny_dir, tmp_path):
    from diffcls.export.pipeline import resolve_settings

    cfg = ExportConfig(out=tmp_path, model=tiny_dir, device="cpu")
    assert resolve_settings(cfg) == ("cpu", "fp32", False)
    cfg = ExportConfig(out=tmp_path, model=tiny_dir, device="cpu", precision="fp16")
    assert resolve_settings(cfg) == ("cpu", "fp16", False)  # fusion is on by default only on CUDA


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"backend": "onnxruntim"}, "did you mean 'onnxruntime'"),
        ({"precision": "int8"}, "fp32 or fp16"),
        ({"batch_sizes": (0, 2)}, "positive integers"),
        ({"image_size": 15}, "not a multiple"),
    ],
)
def test_bad_settings_are_one_line_errors(tiny, tmp_path, kw, words):
    with pytest.raises(DiffclsError) as e:
        export_model(ExportConfig(out=tmp_path / "e", model=tiny, device="cpu", **kw))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_tensorrt_export_without_tensorrt_says_how_to_install(tiny, tmp_path):
    from diffcls.export.trt_build import tensorrt_version

    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(DiffclsError) as e:
        export_model(ExportConfig(out=tmp_path / "e", model=tiny, backend="tensorrt"))
    assert 'pip install -e ".[tensorrt]"' in str(e.value)


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_export_and_info(engine_dir, tiny_dir, tmp_path):
    from diffcls.cli.app import app

    d = copy_of(engine_dir, tmp_path / "engines")
    (d / "vae_encoder.onnx").unlink()
    runner = CliRunner()
    args = ["export", "--model", str(tiny_dir), "--out", str(d), "--batch-sizes", "2,4", "--image-size", "16", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "found cached" in r.output and "export success" in r.output and "vae_encoder.onnx" in r.output
    r = runner.invoke(app, ["info", str(d)])
    assert r.exit_code == 0, r.output
    for word in ("onnxruntime", "CPUExecutionProvider", "unet", "fp32", "2,4"):
        assert word in r.output


def test_cli_export_error_is_one_line(tmp_path):
    from diffcls.cli.app import app

    r = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "does not exist" in lines[0]


def test_cli_info_on_a_non_engine_dir(tmp_path):
    from diffcls.cli.app import app

    r = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 2 and "no manifest.json" in r.output


def test_cli_classify_runs_from_engine_dir(engine_dir, tmp_path):
    """An engine directory classifies on its own: no torch weights needed."""
    from PIL import Image

    from diffcls.cli.app import app

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    r = CliRunner().invoke(
        app,
        ["classify", str(folder), "--engines", str(engine_dir), "--classes", "cat,dog", "--n-samples", "2,4",
         "--to-keep", "2,1", "--batch-size", "4", "--no-cache", "--device", "cpu", "--out", str(tmp_path / "r.csv")],
    )
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert sorted(Path(row["path"]).name for row in rows) == ["0.png", "1.png"]
    assert all(row["prediction"] in ("cat", "dog") for row in rows)


def test_fusion_then_fp16_matches_torch(engine_dir, tiny, tmp_path):
    """The recipe's order (fuse the fp32 graph, then convert to fp16) gives a graph that loads and
    matches torch; on CPU only the portable fusions run (GroupNorm/NhwcConv kernels are CUDA-only)."""
    import onnxruntime as ort

    fused = ox.optimize_unet(engine_dir / "unet.onnx", gpu=False)
    ox.convert_fp16(fused, tmp_path / "unet_fused16.onnx")
    sess = ort.InferenceSession(str(tmp_path / "unet_fused16.onnx"), providers=["CPUExecutionProvider"])
    assert {i.type for i in sess.get_inputs()} == {"tensor(float16)"}
    spec = model_component_specs(tiny, IMAGE_SIZE)["unet"]
    check = ox.check_against_torch(tiny, "unet", spec, tmp_path / "unet_fused16.onnx", "fp16")
    assert 0 < check["max_rel_err"] < ox.TOLERANCE["fp16"]


def test_export_fused_fp16_recipe_end_to_end(tiny_dir, tiny, tmp_path):
    """export_model with fusion + fp16 (the CUDA default, here on CPU): manifest records the fused
    ops and the checks, and classification errors stay close to torch fp32."""
    from diffcls.runtime.execution.classifier import Classifier
    from diffcls.runtime.algorithm.schedule import Schedule

    out = tmp_path / "fused16"
    result = export_model(ExportConfig(out=out, model=tiny_dir, precision="fp16", optimize=True,
                                       batch_sizes=(4,), image_size=IMAGE_SIZE, device="cpu"))
    unet = result.manifest["components"]["unet"]
    assert unet["precision"] == "fp16" and sum(unet["fused_ops"].values()) > 0
    assert 0 < unet["max_rel_err"] < ox.TOLERANCE["fp16"]
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1 for _ in range(2)]
    schedule = Schedule(n_samples=(2, 4), to_keep=(2, 1))
    got = Classifier.from_pretrained(backend="onnxruntime", engine_dir=out, device="cpu", use_cache=False).classify(
        images, ["a cat", "a dog"], schedule, seed=1, batch_size=4)
    want = Classifier.from_pretrained(tiny, device="cpu", image_size=IMAGE_SIZE, use_cache=False).classify(
        images, ["a cat", "a dog"], schedule, seed=1, batch_size=4)
    for g_r, w_r in zip(got, want):
        a = np.array([e for *_, e in g_r.errors])
        b = np.array([e for *_, e in w_r.errors])
        assert a.shape == b.shape and np.abs(a - b).max() < 2e-2 * np.abs(b).max()


def test_cli_classify_batch_size_the_engines_lack(engine_dir, tmp_path):
    from PIL import Image

    from diffcls.cli.app import app

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    r = CliRunner().invoke(app, ["classify", str(tmp_path / "a.png"), "--engines", str(engine_dir), "--classes", "cat,dog",
                                 "--n-samples", "2", "--to-keep", "1", "--batch-size", "3", "--no-cache"])
    assert_one_line_error(r, "--batch-size 3", "batch sizes 2, 4, not 3", "--batch-sizes 2,3,4", str(engine_dir))
