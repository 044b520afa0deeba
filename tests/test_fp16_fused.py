"""The fused fp16 UNet for CUDA (ORT's UNet fusions with the CUDA-only ops, then fp16): first
built on an H200 on 2026-11-26, where ONNX Runtime refused it as invalid ("Type 'tensor(float16)'
of input parameter ... of operator (Resize)"). The graph work needs no GPU, so it is checked here:
every value typed before the conversion, and Resize's roi/scales fp32 after it."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from diffcls.export import onnx_export as ox  # noqa: E402


@pytest.fixture(scope="module")
def demo_unet_fp32(tmp_path_factory):
    from diffcls.models.loading import load_model
    from diffcls.models.spec import model_component_specs

    model = load_model(None)
    spec = model_component_specs(model, 32)["unet"]
    return ox.export_onnx(model, "unet", spec, tmp_path_factory.mktemp("unet") / "unet.onnx")


def _resize_const_types(proto) -> list[int]:
    """The element type of every Resize roi/scales input: from its initializer, Constant or Cast."""
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    made = {}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            made[n.output[0]] = n.attribute[0].t.data_type
        elif n.op_type == "Cast":
            made[n.output[0]] = next(a.i for a in n.attribute if a.name == "to")
    types = []
    for n in proto.graph.node:
        if n.op_type == "Resize":
            for name in n.input[1:3]:
                if name:
                    types.append(inits.get(name, made.get(name, -1)))  # -1: computed, type unknown here
    return types


def test_cuda_fusion_for_fp16_gives_a_valid_fp16_graph(demo_unet_fp32, tmp_path):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    fused = ox.optimize_unet(demo_unet_fp32, gpu=True, for_fp16=True)
    ops = ox.fused_ops(fused)
    assert "NhwcConv" not in ops and ops.get("GroupNorm") and ops.get("MultiHeadAttention")
    # the converter needs every value's type: symbolic shape inference must succeed
    assert SymbolicShapeInference.infer_shapes(fused.model, auto_merge=True, guess_output_rank=False) is not None
    ox.convert_fp16(fused, tmp_path / "unet16.onnx")
    proto = onnx.load(str(tmp_path / "unet16.onnx"))
    types = _resize_const_types(proto)
    assert types and all(t == TensorProto.FLOAT for t in types)


def test_untyped_conversion_of_nhwc_fusion_gets_fp32_resize_inputs_back(demo_unet_fp32, tmp_path):
    """With NhwcConv fused, shape inference fails and the converter makes the Resize constants
    fp16 (the H200 failure); resize_inputs_fp32 restores them."""
    fused = ox.optimize_unet(demo_unet_fp32, gpu=True)  # NhwcConv included
    assert "NhwcConv" in ox.fused_ops(fused)
    ox.convert_fp16(fused, tmp_path / "nhwc16.onnx")
    types = _resize_const_types(onnx.load(str(tmp_path / "nhwc16.onnx")))
    assert types and all(t == TensorProto.FLOAT for t in types)


def test_resize_inputs_fp32_on_a_small_graph():
    import numpy as np

    scales16 = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float16), "scales")
    other = helper.make_node("Identity", ["scales"], ["scales_copy"])  # another user keeps fp16
    resize = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="nearest")
    graph = helper.make_graph(
        [other, resize], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 1, 4, 4]),
         helper.make_tensor_value_info("scales_copy", TensorProto.FLOAT16, [4])],
        initializer=[scales16],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert ox.resize_inputs_fp32(proto) == 1
    other, resize = proto.graph.node  # make_graph copied the nodes
    assert resize.input[2] == "scales_fp32" and other.input[0] == "scales"
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["scales_fp32"].data_type == TensorProto.FLOAT and inits["scales"].data_type == TensorProto.FLOAT16
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.arange(4, dtype=np.float16).reshape(1, 1, 2, 2)})[0]
    assert y.shape == (1, 1, 4, 4)
    assert ox.resize_inputs_fp32(proto) == 0  # idempotent


def test_group_norm_fusion_only_where_ort_cuda_can_run_it(demo_unet_fp32):
    """ORT's CUDA GroupNorm needs an even number of channels per group; the demo UNet has one."""
    import torch

    from diffcls.models.loading import load_model

    assert not ox.cuda_group_norm_ok(load_model(None).unet)
    sd_like = torch.nn.Sequential(torch.nn.GroupNorm(32, 320), torch.nn.GroupNorm(32, 640))
    assert ox.cuda_group_norm_ok(sd_like)
    assert not ox.cuda_group_norm_ok(torch.nn.Sequential(torch.nn.GroupNorm(32, 320), torch.nn.GroupNorm(3, 9)))
    fused = ox.optimize_unet(demo_unet_fp32, gpu=True, for_fp16=True, group_norm=False)
    ops = ox.fused_ops(fused)
    assert "GroupNorm" not in ops and "SkipGroupNorm" not in ops and ops.get("MultiHeadAttention")
