"""The tensorrt backend: serialized TensorRT engines, one optimization profile per batch size.

Life cycle per component (as in TensorRT's diffusion demo, one class): deserialize the plan ->
one execution context per profile (= per batch size, min = opt = max) -> for each, device
buffers allocated once and bound once with `set_tensor_address` -> `__call__` copies the inputs
into the bound buffers and launches `execute_async_v3` on the engine's own CUDA stream, ordered
against torch's current stream with events. There is no host sync per call; outputs are returned
as clones (the bound buffers are reused next call).

Written against TensorRT 10's Python API; `tensorrt` is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffcls.engines.base import EngineSet, check_batch
from diffcls.errors import DiffclsError, install_hint
from diffcls.engines import manifest as mf
from diffcls.models.spec import ComponentSpec, exported_components

BACKEND = "tensorrt"


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DiffclsError(f"the tensorrt backend needs TensorRT; install it with: {install_hint('tensorrt', 'tensorrt')}") from e
    return trt


def torch_dtype(trt_dtype) -> torch.dtype:
    trt = _trt()
    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.BOOL: torch.bool,
    }
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    return table[trt_dtype]


class TensorRTEngine:
    """One component as a TensorRT engine with one execution context per batch size."""

    def __init__(self, plan: Path, spec: ComponentSpec, batch_sizes, device: torch.device):
        trt = _trt()
        if device.type != "cuda":
            raise DiffclsError("TensorRT engines run on CUDA only; use --device cuda or another --backend")
        self.component = spec.name
        self.spec = spec
        self.device = device
        self.batch_sizes = tuple(sorted(int(b) for b in batch_sizes))
        self.calls = 0
        self.path = Path(plan)
        self._logger = trt.Logger(trt.Logger.ERROR)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(device):
            self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise DiffclsError(f"TensorRT cannot deserialize {plan} (built by another TensorRT version or GPU?); re-export it")
        n_profiles = self.engine.num_optimization_profiles
        if n_profiles != len(self.batch_sizes):
            raise DiffclsError(
                f"{plan} has {n_profiles} optimization profiles but the manifest lists "
                f"{len(self.batch_sizes)} batch sizes; re-export it"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype(self.engine.get_tensor_dtype(n)) for n in names}
        floats = [self.dtypes[n] for n in self.inputs if self.dtypes[n].is_floating_point]
        self.dtype = floats[0] if floats else torch.float32
        # TensorRT runs on a stream of its own, ordered against the caller's with events: on the
        # default stream (torch's usual one) enqueueV3 adds host synchronizations
        self._stream = torch.cuda.Stream(device)
        self._scratch = None  # activation memory shared by all contexts (they run in turn on one stream)
        self._contexts: dict[int, object] = {}
        self._buffers: dict[int, dict[str, torch.Tensor]] = {}
        for k, batch in enumerate(self.batch_sizes):
            self._activate(k, batch)

    def _activate(self, profile: int, batch: int) -> None:
        """Context for `profile`: fixed input shapes, buffers allocated and bound once."""
        with torch.cuda.device(self.device):
            ctx = self._create_context()
            if ctx is None:
                raise DiffclsError(f"TensorRT could not create an execution context for {self.path} (out of GPU memory?)")
            ctx.set_optimization_profile_async(profile, self._stream.cuda_stream)
            shapes = self.spec.shape_dict(batch)
            buffers = {}
            for name in self.inputs:
                if not ctx.set_input_shape(name, shapes[name]):
                    raise DiffclsError(f"{self.path}: input {name} does not accept shape {shapes[name]}; re-export it")
            for name in self.inputs + self.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                ctx.set_tensor_address(name, buffers[name].data_ptr())
        self._contexts[batch] = ctx
        self._buffers[batch] = buffers

    def _create_context(self):
        """A context without its own activation memory where TensorRT allows it (one scratch for all)."""
        trt = _trt()
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is None:
            return self.engine.create_execution_context()
        ctx = self.engine.create_execution_context(strategy.USER_MANAGED)
        if ctx is None:
            return None
        size = int(getattr(self.engine, "device_memory_size_v2", self.engine.device_memory_size))
        if self._scratch is None or self._scratch.numel() < size:
            self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(self._scratch.data_ptr(), size)
        else:
            ctx.device_memory = self._scratch.data_ptr()
        return ctx

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = check_batch(self, feed)
        buffers = self._buffers[batch]
        caller = torch.cuda.current_stream(self.device)
        for name in self.inputs:
            buffers[name].copy_(feed[name], non_blocking=True)  # on the caller's stream; casts to the engine's dtype
        self._stream.wait_stream(caller)
        self.calls += 1
        if not self._contexts[batch].execute_async_v3(self._stream.cuda_stream):
            raise DiffclsError(
                f"TensorRT execution of {self.component} failed at batch {batch} (TensorRT logged the cause "
                f"above); check GPU memory, or re-export {self.path.parent}"
            )
        caller.wait_stream(self._stream)
        # the bound output buffers are overwritten by the next call: hand out copies (on the
        # caller's stream, after the engine; the next call's input copies are ordered after them)
        return {name: buffers[name].clone() for name in self.outputs}


def runtime_check(manifest: dict) -> str | None:
    """Why this machine cannot run the engines in `manifest`, or None."""
    trt = _trt()
    built = (manifest.get("versions") or {}).get("tensorrt")
    if built and built != trt.__version__:
        return f"its engines were built with TensorRT {built}, this is TensorRT {trt.__version__}"
    gpu = manifest.get("gpu") or {}
    if not torch.cuda.is_available():
        return "TensorRT engines need a CUDA GPU and torch sees none (use --backend onnxruntime or torch)"
    major, minor = torch.cuda.get_device_capability()
    here = f"{major}.{minor}"
    if gpu.get("compute_capability") and gpu["compute_capability"] != here:
        return (
            f"its engines were built for {gpu.get('name')} (compute capability {gpu['compute_capability']}), "
            f"this GPU is {torch.cuda.get_device_name()} ({here})"
        )
    return None


def open_engines(
    *,
    engine_dir=None,
    model=None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    image_size: int | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    check_hash: bool = True,
    config=None,
    **_ignored,
) -> EngineSet:
    """Open a TensorRT engine directory; `model` (optional) must be the one it was built from
    (`config`: a single checkpoint file's --config, loaded with it and repeated in fix commands)."""
    if engine_dir is None:
        raise DiffclsError(
            "the tensorrt backend runs an exported engine directory; pass --engines DIR "
            "(create one with: diffcls export --out DIR --backend tensorrt)"
        )
    engine_dir = Path(engine_dir)
    dev = torch.device("cuda" if device in (None, "auto") else device)
    if dev.type != "cuda":
        raise DiffclsError("TensorRT engines run on CUDA only; drop --device cpu or use --backend onnxruntime")
    fingerprint, model_arg = mf.resolve_model_arg(model, config)
    manifest = mf.verify_engine_dir(
        engine_dir,
        backend=BACKEND,
        fingerprint=fingerprint,
        model_arg=model_arg,
        config_arg=config if model_arg is not None else None,
        image_size=image_size,
        precision=precision,
        check_hash=check_hash,
        runtime_check=runtime_check,
    )
    specs = mf.manifest_specs(manifest)
    engines = {}
    for comp in exported_components(specs):
        # one profile per exported batch size; requested batch sizes are the UNet's
        have = mf.check_batch_sizes(engine_dir, manifest, comp, batch_sizes if comp == "unet" else None)
        engines[comp] = TensorRTEngine(engine_dir / manifest["components"][comp]["file"], specs[comp], list(have), dev)
    return mf.engine_set(
        engine_dir, manifest, engines, backend=BACKEND, device=dev,
        info={"tensorrt": manifest.get("versions", {}).get("tensorrt"), "gpu": manifest.get("gpu")},
    )
