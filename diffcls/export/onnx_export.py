"""torch -> ONNX for one component, fp16 conversion, ONNX Runtime fusion, and the check vs torch.

Exporter: the TorchScript-based `torch.onnx.export(..., dynamo=False)`. With torch 2.13 both
exporters produce correct graphs for the three SD components, but the TorchScript one is ~2-3x
faster, prints nothing, and its graphs are the ones ONNX Runtime's UNet fusion passes
(`onnxruntime.transformers.optimizer`, model_type="unet") are written against. Every graph has
a dynamic batch axis "B"; shapes and names come from `diffcls.models.spec`.

fp16: always exported in fp32 first, then converted with ONNX Runtime's float16 converter
(`OnnxModel.convert_float_to_float16`, symbolic shape inference, so it also works on fused graphs
and on >2 GB models). Resize's constant scales and GroupNorm's gamma/beta stay fp32 (the
converter's ALWAYS_FLOAT_INPUTS) and the unfused graph's InstanceNormalization runs in fp32.

GPU fusion recipe (`optimize_unet`, `--optimize`): fp32 ONNX -> `optimize_model(model_type="unet")`
(attention -> MultiHeadAttention/Attention, LayerNorm/SkipLayerNorm, and on CUDA GroupNorm,
SkipGroupNorm, NhwcConv, BiasSplitGelu, BiasAdd) -> fp16. The CUDA-only fused ops have no CPU
kernels, so on CPU only the portable fusions run (what the tests check).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from diffcls.errors import DiffclsError
from diffcls.models.spec import ComponentSpec
from diffcls.models.wrappers import wrap

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is native from 17; TensorRT 10 and ORT >= 1.14 take it
LARGE_BYTES = 1_800_000_000  # protobuf's limit is 2 GB: larger models keep weights in `<file>.data`
# max |onnx - torch| / max |torch| accepted per precision (fp16 is compared against fp32 torch)
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}
FP16_OP_BLOCK_LIST = ["RandomNormalLike", "InstanceNormalization", "GroupNormalization"]


def random_feed(model, spec: ComponentSpec, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs in each input's natural range (token ids, [-1, 1] pixels, timesteps)."""
    g = torch.Generator().manual_seed(seed)
    feed = {}
    for t in spec.inputs:
        shape = t.concrete(batch)
        if t.name == "input_ids":
            # several text encoders (SD3): ids every one of them takes
            vocab = int(getattr(model, "min_vocab_size", None) or model.text_encoder.config.vocab_size)
            feed[t.name] = torch.randint(0, vocab, shape, generator=g, dtype=torch.int64)
        elif t.name == "image":
            feed[t.name] = torch.rand(shape, generator=g) * 2 - 1
        elif t.name == "timestep":
            feed[t.name] = torch.randint(0, model.num_train_timesteps, shape, generator=g).float()
        elif t.name in ("class_labels", "class_ids"):
            feed[t.name] = torch.randint(0, model.num_classes, shape, generator=g, dtype=torch.int64)
        else:
            feed[t.name] = torch.randn(shape, generator=g)
    return feed


@torch.inference_mode()
def torch_reference(model, component: str, feed: dict[str, torch.Tensor]) -> np.ndarray:
    module = wrap(model, component).float().eval()
    spec_inputs = list(feed)
    return module(*[feed[n] for n in spec_inputs]).float().numpy()


def export_onnx(model, component: str, spec: ComponentSpec, out_path: Path, opset: int = OPSET, work_dir: Path | None = None) -> Path:
    """Export one fp32 component to `out_path` (weights in `<name>.data` beside it when > 2 GB).

    torch writes into a temp folder under `work_dir` (default: beside `out_path`) first.
    """
    import onnx

    log.debug("exporting %s to %s (opset %d)", component, out_path, opset)
    module = wrap(model, component).float().eval()
    feed = random_feed(model, spec, batch=2)
    args = tuple(feed[n] for n in spec.input_names)
    names = spec.input_names + spec.output_names
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=work_dir or out_path.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), plain_rms_norms(module), traceable_unflatten():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_axes={n: {0: "B"} for n in names},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(raw), load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            # over 2 GB torch wrote a file per weight: gather them into one, a weight at a time,
            # rather than loading them all beside the torch model's own copy
            gather_external_data(proto, Path(tmp), out_path)
        else:
            save_onnx(proto, out_path)
    return out_path


def gather_external_data(proto, src_dir: Path, out_path: Path) -> list[Path]:
    """Save `proto`, whose external initializers live in files under `src_dir`, as `out_path`
    with every one of them copied (in 64 MB chunks) into the single `<name>.data` file."""
    import shutil

    import onnx

    out_path = Path(out_path)
    data = out_path.with_name(out_path.name + ".data")
    for p in (out_path, data):
        p.unlink(missing_ok=True)
    with open(data, "wb") as fout:
        for t in proto.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in t.external_data}
            offset, length = int(info.get("offset", 0)), int(info["length"]) if "length" in info else None
            start = fout.tell()
            with open(src_dir / info["location"], "rb") as fin:
                fin.seek(offset)
                if length is None:
                    shutil.copyfileobj(fin, fout, 64 << 20)
                else:
                    for _ in range(0, length, 64 << 20):
                        fout.write(fin.read(min(64 << 20, length - (fout.tell() - start))))
            del t.external_data[:]
            for key, value in (("location", data.name), ("offset", str(start)), ("length", str(fout.tell() - start))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    onnx.save_model(proto, str(out_path))
    return onnx_files(out_path)


@contextlib.contextmanager
def traceable_unflatten():
    """`Tensor.unflatten` as a reshape over the tensor's traced sizes while exporting: the
    TorchScript tracer records unflatten's sizes as constants, which bakes the export's batch
    size into the graph (Flux's attention splits its heads with unflatten). Restored after."""
    original = torch.Tensor.unflatten

    def unflatten(self, dim, sizes):
        if not isinstance(dim, int):  # a named dimension: as torch does it
            return original(self, dim, sizes)
        dim = dim % self.dim()
        shape = list(self.shape)
        return self.reshape(*shape[:dim], *sizes, *shape[dim + 1 :])

    torch.Tensor.unflatten = unflatten
    try:
        yield
    finally:
        torch.Tensor.unflatten = original


@contextlib.contextmanager
def plain_rms_norms(module: torch.nn.Module):
    """Every `torch.nn.RMSNorm` in `module` (Flux's query/key norms) computed from plain ops while
    it is exported: the TorchScript exporter has no `aten::rms_norm` below opset 23, and a custom
    symbolic for it loses the dynamic batch axis. x * rsqrt(mean(x², normalized axes) + eps) *
    weight, eps torch's default (the dtype's machine epsilon) where the module has none."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.RMSNorm)]

    def plain(self, x):
        dims = tuple(range(-len(self.normalized_shape), 0))
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        out = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
        return out if self.weight is None else out * self.weight

    for m in norms:
        m.forward = plain.__get__(m)
    try:
        yield module
    finally:
        for m in norms:
            del m.forward


def save_onnx(proto, out_path: Path) -> list[Path]:
    """Write `proto` to out_path; weights go to `<name>.data` when the model is near 2 GB."""
    import onnx

    out_path = Path(out_path)
    data = out_path.with_name(out_path.name + ".data")
    for p in (out_path, data):
        p.unlink(missing_ok=True)
    large = _initializer_bytes(proto) > LARGE_BYTES
    onnx.save_model(
        proto,
        str(out_path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    return onnx_files(out_path)


def onnx_files(path: Path) -> list[Path]:
    """The ONNX file and its external data file, if any."""
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]


def _initializer_bytes(proto) -> int:
    total = 0
    for init in proto.graph.initializer:
        n = int(np.prod(init.dims)) if len(init.dims) else 1
        total += n * 4
    return total


def cuda_group_norm_ok(module: torch.nn.Module) -> bool:
    """Whether ORT's CUDA GroupNorm kernel takes every GroupNorm of `module`: it needs an even
    number of channels per group (two per thread). SD's UNets have 10-40; the demo's 32 channels
    in 32 groups (one per group) made ORT fail at run time on an H200: "GroupNorm in CUDA does
    not support the input: n=2 h=8 w=8 c=32 groups=32"."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.GroupNorm)]
    return all((m.num_channels // m.num_groups) % 2 == 0 for m in norms)


def fusion_options(gpu: bool, for_fp16: bool = False, group_norm: bool = True):
    """ORT's UNet fusion options: all of them for CUDA, only ops with CPU kernels otherwise.

    For a graph that is converted to fp16 afterwards, NhwcConv is left out: ORT's symbolic shape
    inference cannot type it on our graphs (TypeError in `_compute_conv_pool_shape`), the fp16
    converter then runs without types and writes an invalid model (fp16 Resize scales; seen on
    an H200 with onnxruntime-gpu 1.31, reproduced on CPU in tests/test_fp16_fused.py).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions("unet")
    # separate Q/K/V inputs: the CUDA kernels pre-pack them and it keeps the CPU path valid
    opts.enable_packed_qkv = False
    opts.enable_packed_kv = False
    if for_fp16:
        opts.enable_nhwc_conv = False
    if not group_norm:  # see cuda_group_norm_ok
        opts.enable_group_norm = False
        opts.enable_skip_group_norm = False
    if not gpu:
        for name in ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu", "enable_bias_add"):
            setattr(opts, name, False)
    return opts


def optimize_unet(src: Path, gpu: bool, for_fp16: bool = False, group_norm: bool = True):
    """ONNX Runtime's offline UNet fusion on an fp32 graph -> an `OnnxModel` (not saved)."""
    from onnxruntime.transformers import optimizer

    _patch_ort_num_heads()
    # ORT shows its own "fusion" progress bar (tqdm, on stderr); its loggers are its own
    return optimizer.optimize_model(
        str(src),
        model_type="unet",
        num_heads=0,  # detected per attention block
        hidden_size=0,
        opt_level=0,  # fusions only; ORT applies its own graph optimizations at load
        optimization_options=fusion_options(gpu, for_fp16, group_norm),
        use_gpu=gpu,
    )


def fused_ops(onnx_model) -> dict[str, int]:
    return {k: v for k, v in onnx_model.get_fused_operator_statistics().items() if v}


def convert_fp16(src_or_model, out_path: Path) -> list[Path]:
    """fp32 ONNX (path or ORT `OnnxModel`) -> fp16 at out_path, keeping norms/Resize inputs fp32.

    From a path, the graph's types come from symbolic shape inference on the graph *without* its
    weights (they stay in the external-data file), so the fp32 weights are held once, not twice:
    an SD-2.1-size UNet converts in about half the memory of ORT's in-memory route.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    block = list(DEFAULT_OP_BLOCK_LIST) + FP16_OP_BLOCK_LIST
    # duck-typed: the optimizer's models are OnnxModel subclasses imported under another module
    # name (ORT puts its transformers folder on sys.path), so isinstance(.., OnnxModel) is False
    if hasattr(src_or_model, "convert_float_to_float16"):
        m = src_or_model
        m.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=False, op_block_list=block)
        resize_inputs_fp32(m.model)
        return save_onnx(m.model, out_path)
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    src = Path(src_or_model)
    if has_external_data(src):
        return convert_fp16_streamed(src, out_path, block)
    types = graph_value_types(src)
    proto = onnx.load(str(src))
    known = {vi.name for vi in proto.graph.value_info}
    proto.graph.value_info.extend(vi for vi in types if vi.name not in known)
    del types
    # what OnnxModel.convert_float_to_float16 does once the types are known
    fp16 = convert_float_to_float16(proto, disable_shape_infer=True, keep_io_types=False, op_block_list=block)
    del proto
    m = OnnxModel(fp16)
    m.remove_cascaded_cast_nodes()
    m.remove_useless_cast_nodes()
    resize_inputs_fp32(m.model)
    return save_onnx(m.model, out_path)


def has_external_data(path: Path) -> bool:
    return Path(path).with_name(Path(path).name + ".data").exists()


def convert_fp16_streamed(src: Path, out_path: Path, block: list[str]) -> list[Path]:
    """`convert_fp16` for a graph whose weights are in an external-data file, never holding them:
    ORT's converter decides on the graph alone (which initializers become fp16, where Casts go;
    it reads a weight's values only to convert them), then each weight is converted (with the
    converter's own clamping) one at a time from the fp32 file into the fp16 one. The graph
    written is the in-memory route's (tests/test_export.py); the memory is the graph's, plus one
    tensor, instead of the fp32 and fp16 weights together."""
    import onnx
    from onnx import TensorProto, helper
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    types = graph_value_types(src)
    proto = onnx.load(str(src), load_external_data=False)
    known = {vi.name for vi in proto.graph.value_info}
    proto.graph.value_info.extend(vi for vi in types if vi.name not in known)
    del types
    external = {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    original = float16.make_value_info_from_tensor  # reads the values for their shape: dims say it without them
    float16.make_value_info_from_tensor = lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
    try:
        fp16 = float16.convert_float_to_float16(proto, disable_shape_infer=True, keep_io_types=False, op_block_list=block)
    finally:
        float16.make_value_info_from_tensor = original
    del proto
    m = OnnxModel(fp16)
    m.remove_cascaded_cast_nodes()
    m.remove_useless_cast_nodes()
    resize_inputs_fp32(m.model)
    return _write_streamed(m.model, src, out_path, external)


def _write_streamed(proto, src: Path, out_path: Path, external: dict) -> list[Path]:
    """Save `proto`, whose initializers named in `external` still point into `src`'s fp32 data
    file: each is read, converted if its type became fp16, and appended to `out_path`'s data file
    (or, when the weights come to no more than LARGE_BYTES, stored inline as `save_onnx` would)."""
    import onnx
    from onnx import TensorProto
    from onnxruntime.transformers.float16 import convert_np_to_float16

    out_path = Path(out_path)
    data = out_path.with_name(out_path.name + ".data")
    for p in (out_path, data):
        p.unlink(missing_ok=True)
    inline_all = _initializer_bytes(proto) <= LARGE_BYTES  # save_onnx's rule
    files: dict[str, object] = {}
    with contextlib.ExitStack() as stack, open(data, "wb") as fout:
        for t in (t for t in proto.graph.initializer if t.name in external):
            info = external[t.name]
            if info["location"] not in files:
                files[info["location"]] = stack.enter_context(open(src.parent / info["location"], "rb"))
            fin = files[info["location"]]
            fin.seek(int(info.get("offset", 0)))
            raw = np.frombuffer(fin.read(int(info["length"])), dtype=np.float32)
            if t.data_type == TensorProto.FLOAT16:
                raw = convert_np_to_float16(raw)
            del t.external_data[:]
            if inline_all or raw.nbytes < 1024:  # save_onnx's size_threshold keeps small tensors inline
                t.data_location = TensorProto.DEFAULT
                t.raw_data = raw.tobytes()
                continue
            offset = fout.tell()
            fout.write(raw.tobytes())
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(raw.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    if inline_all:
        data.unlink()
    onnx.save_model(proto, str(out_path))
    return onnx_files(out_path)


def resize_inputs_fp32(proto) -> int:
    """Give every Resize fp32 `roi`/`scales` again where the fp16 conversion made them fp16.

    ONNX requires float32 there. The converter leaves them alone only when it knows every value's
    type; on a graph fused for CUDA (GroupNorm, NhwcConv, ...) ORT's symbolic shape inference
    fails ("failed in shape inference"), the converter goes on without types, turns the
    constant scales into fp16, and ONNX Runtime then refuses the model as invalid (seen on an
    H200 with onnxruntime-gpu 1.31). Each such constant gets an fp32 copy wired to the Resize
    only (other users keep theirs). Returns how many inputs were fixed.
    """
    from onnx import TensorProto, numpy_helper

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    fixed = 0
    for node in graph.node:
        if node.op_type != "Resize":
            continue
        for i in (1, 2):  # roi, scales (sizes is int64)
            if i >= len(node.input) or not node.input[i]:
                continue
            name = node.input[i]
            tensor = inits.get(name) if name in inits else (consts[name].attribute[0].t if name in consts else None)
            if tensor is None or tensor.data_type != TensorProto.FLOAT16:
                continue
            copy_name = f"{name}_fp32"
            if copy_name not in inits:
                arr = numpy_helper.to_array(tensor).astype(np.float32)
                graph.initializer.append(numpy_helper.from_array(arr, copy_name))
                inits[copy_name] = graph.initializer[-1]
            node.input[i] = copy_name
            fixed += 1
    return fixed


def graph_value_types(path: Path) -> list:
    """Element types (shapes cleared, as ORT's converter keeps them) of every intermediate value,
    from symbolic shape inference on the graph with its large weights left on disk."""
    import onnx
    from onnx import TensorProto, ValueInfoProto
    from onnxruntime.transformers import optimizer  # noqa: F401 - puts ORT's tools dir on sys.path
    from shape_infer_helper import SymbolicShapeInferenceHelper

    light = onnx.load(str(path), load_external_data=False)
    # weights kept on disk become graph inputs of known type and shape: inference needs their
    # shapes, never their values (shape-carrying constants are small and stay inline)
    small = [t for t in light.graph.initializer if t.data_location != TensorProto.EXTERNAL]
    large = [t for t in light.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    light.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in large)
    del light.graph.initializer[:]
    light.graph.initializer.extend(small)
    try:
        inferred = SymbolicShapeInferenceHelper(light).infer_shapes(light, auto_merge=True, guess_output_rank=False)
    except Exception as e:  # noqa: BLE001 - ORT raises what its helpers raise
        raise DiffclsError(f"cannot infer the types of {path} for the fp16 conversion ({_first_line(e)}); export with --precision fp32") from e
    out = []
    for vi in (inferred or light).graph.value_info:
        if vi.name and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type != TensorProto.UNDEFINED:
            copy = ValueInfoProto()
            copy.CopyFrom(vi)
            copy.type.tensor_type.ClearField("shape")
            out.append(copy)
    return out


def save_onnx_model(onnx_model, out_path: Path) -> list[Path]:
    return save_onnx(onnx_model.model, out_path)


def ort_providers(device: str) -> list[str]:
    import onnxruntime as ort

    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def check_against_torch(model, component: str, spec: ComponentSpec, path: Path, precision: str, device: str = "cpu", batch: int = 2) -> dict:
    """Run the ONNX file with ONNX Runtime on random inputs and compare with fp32 torch.

    Returns {"max_abs_err", "max_rel_err", "check_batch"}; raises DiffclsError above tolerance.
    """
    feed, ref = reference_pair(model, component, spec, batch)
    return check_against_reference(component, path, precision, device, feed, ref)


def reference_pair(model, component: str, spec: ComponentSpec, batch: int = 2) -> tuple[dict, np.ndarray]:
    """(random feed, fp32 torch output) for the parity check; small, so it can be computed before
    the export and the torch weights freed while ONNX Runtime loads the exported graph."""
    feed = random_feed(model, spec, batch, seed=1)
    return feed, torch_reference(model, component, feed)


def check_against_reference(component: str, path: Path, precision: str, device: str, feed: dict, ref: np.ndarray) -> dict:
    """The exported graph at `path` on `feed` vs the torch output `ref` (see check_against_torch)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # the graph as written, without ORT's load-time rewrites: on a CPU these constant-fold an fp16
    # graph's weights into fp32 copies (3.5 GB more for SD-2.1's UNet) for a one-off check
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False
    try:
        sess = ort.InferenceSession(str(path), so, providers=ort_providers(device))
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise DiffclsError(f"{path} does not load in ONNX Runtime ({_first_line(e)}); re-export it") from e
    np_dtype = np.float16 if precision == "fp16" else np.float32
    types = {i.name: i.type for i in sess.get_inputs()}
    np_feed = {}
    for name, x in feed.items():
        a = x.numpy()
        if a.dtype == np.float32 and types.get(name) == "tensor(float16)":
            a = a.astype(np_dtype)
        np_feed[name] = a
    out = sess.run([sess.get_outputs()[0].name], np_feed)[0].astype(np.float32)
    del sess
    return measure(component, ref, out, precision)


def measure(component: str, ref: np.ndarray, out: np.ndarray, precision: str) -> dict:
    if out.shape != ref.shape:
        raise DiffclsError(f"exported {component} returns shape {list(out.shape)}, torch {list(ref.shape)}; this is a bug, please report it")
    if not np.isfinite(out).all():
        raise DiffclsError(f"exported {component} ({precision}) produces NaN/inf on random inputs; export it with --precision fp32")
    abs_err = float(np.abs(out - ref).max())
    rel_err = abs_err / max(float(np.abs(ref).max()), 1e-12)
    tol = TOLERANCE[precision]
    if rel_err > tol:
        raise DiffclsError(
            f"exported {component} ({precision}) differs from torch by max abs {abs_err:.3g}, "
            f"relative {rel_err:.3g} > tolerance {tol:g}; the export is not accepted (try --precision fp32)"
        )
    return {"max_abs_err": abs_err, "max_rel_err": rel_err, "check_batch": int(ref.shape[0])}


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


_PATCHED = False


def _patch_ort_num_heads() -> None:
    """ORT <= 1.32's UNet attention fusion does `int(ndarray of shape [1])`, an error on NumPy >= 2.3.

    Replace that one method with an equivalent that reads the element. ORT's transformers tools
    import their modules both as `fusion_attention_unet` and under the package name; patch both.
    """
    global _PATCHED
    if _PATCHED:
        return
    from onnxruntime.transformers import optimizer  # noqa: F401 - puts the tools dir on sys.path

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        num_heads = 0
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent and parent.op_type == "Concat" and len(parent.input) == 4:
                v = self.model.get_constant_value(parent.input[2])
                if isinstance(v, np.ndarray) and v.size == 1:
                    num_heads = int(v.reshape(-1)[0])
        else:
            v = self.model.get_constant_value(reshape_q.input[1])
            if isinstance(v, np.ndarray) and list(v.shape) == [4]:
                num_heads = int(v[2])
        return num_heads if num_heads > 0 else 0

    for name in ("fusion_attention_unet", "onnxruntime.transformers.fusion_attention_unet"):
        mod = sys.modules.get(name)
        if mod is None:
            with contextlib.suppress(ImportError):
                mod = __import__(name, fromlist=["FusionAttentionUnet"])
        if mod is not None and hasattr(mod, "FusionAttentionUnet"):
            mod.FusionAttentionUnet.get_num_heads = get_num_heads
    _PATCHED = True
