"""The onnxruntime backend: one `InferenceSession` per exported component.

Opens an engine directory written by `diffcls export --backend onnxruntime` (manifest checked
first, see `diffcls.engines.manifest.verify_engine_dir`). Providers by device:

    cpu  -> CPUExecutionProvider
    cuda -> CUDAExecutionProvider (on its own CUDA stream, ordered against torch's current stream
            with events; IO binding on CUDA torch tensors: no host copies and no host sync per
            call), CPU as fallback for unsupported nodes
    providers=[...] / DIFFCLS_ORT_PROVIDERS="TensorrtExecutionProvider,CUDAExecutionProvider"
            -> exactly those, e.g. ORT's TensorRT execution provider where it is installed

Requested providers are checked against `onnxruntime.get_available_providers()`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from diffcls.config import parse_device
from diffcls.engines.base import EngineSet, check_batch
from diffcls.errors import DiffclsError
from diffcls.engines import manifest as mf
from diffcls.models.spec import ComponentSpec, exported_components

BACKEND = "onnxruntime"
_ORT_TYPES = {
    "tensor(float)": (torch.float32, np.float32),
    "tensor(float16)": (torch.float16, np.float16),
    "tensor(int64)": (torch.int64, np.int64),
    "tensor(int32)": (torch.int32, np.int32),
}


def resolve_providers(device: str | torch.device | None, providers=None) -> tuple[torch.device, list]:
    """(torch device the engines live on, ORT provider list), checked against what is installed."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if providers is None and os.environ.get("DIFFCLS_ORT_PROVIDERS"):
        providers = [p.strip() for p in os.environ["DIFFCLS_ORT_PROVIDERS"].split(",") if p.strip()]
    parsed = parse_device(None if device is None else str(device))
    dev = None if parsed is None else torch.device(parsed)
    if providers is None:
        if dev is None:
            cuda_ok = torch.cuda.is_available() and "CUDAExecutionProvider" in available
            dev = torch.device("cuda" if cuda_ok else "cpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if dev.type == "cuda" else ["CPUExecutionProvider"]
    names = [p if isinstance(p, str) else p[0] for p in providers]
    missing = [p for p in names if p not in available]
    if missing:
        hint = " (pip install onnxruntime-gpu, matching your CUDA)" if any("CUDA" in p or "Tensorrt" in p for p in missing) else ""
        raise DiffclsError(
            f"ONNX Runtime provider {', '.join(missing)} is not available{hint}; "
            f"installed providers: {', '.join(available)}"
        )
    if dev is None:
        dev = torch.device("cuda" if any(n != "CPUExecutionProvider" for n in names) else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffclsError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return dev, list(providers)


class OrtEngine:
    """One component as an ONNX Runtime session; only the manifest's batch sizes are accepted."""

    def __init__(self, path: Path, spec: ComponentSpec, batch_sizes, device: torch.device, providers: list, threads: int | None = None):
        import onnxruntime as ort

        self.component = spec.name
        self.spec = spec
        self.device = device
        self.batch_sizes = tuple(sorted(int(b) for b in batch_sizes)) if batch_sizes else None
        self.calls = 0
        self.path = Path(path)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:  # else ORT's default: one thread per physical core
            so.intra_op_num_threads = int(threads)
        if device.type == "cpu":
            # no busy-waiting threads after each run: torch shares these cores in the same process
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._stream = None
        if device.type == "cuda":
            # ORT runs on a stream of its own, ordered against the caller's stream with events (no
            # host sync). Not torch's current stream: that is usually the default stream, whose
            # handle 0 ORT rejects as a user compute stream (it would silently use its own stream)
            self._stream = torch.cuda.Stream(device)
            providers = [
                (p, {**_opts(p), "device_id": str(device.index or 0), "user_compute_stream": str(self._stream.cuda_stream)})
                if (p if isinstance(p, str) else p[0]) == "CUDAExecutionProvider"
                else p
                for p in providers
            ]
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT raises its own (pybind) exception types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise DiffclsError(f"ONNX Runtime cannot load {path} ({first}); re-export it with diffcls export") from e
        _check_shapes(self.path, spec, self.session)
        self.input_types = {i.name: _ORT_TYPES.get(i.type, (torch.float32, np.float32)) for i in self.session.get_inputs()}
        self.output_types = {o.name: _ORT_TYPES.get(o.type, (torch.float32, np.float32)) for o in self.session.get_outputs()}
        floats = [t for t, _ in self.input_types.values() if t.is_floating_point]
        self.dtype = floats[0] if floats else torch.float32
        self.providers = self.session.get_providers()
        self._run_options = ort.RunOptions()
        if device.type == "cuda":
            # the caller's stream orders the work; ORT must not block the host after each run
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = check_batch(self, feed)
        self.calls += 1
        if self.device.type == "cuda":
            return self._run_cuda(feed, batch)
        np_feed = {}
        for name in self.spec.input_names:
            tdtype, _ = self.input_types[name]
            np_feed[name] = feed[name].detach().to("cpu", tdtype).contiguous().numpy()
        outs = self.session.run(self.spec.output_names, np_feed, self._run_options)
        return {n: torch.from_numpy(o) for n, o in zip(self.spec.output_names, outs)}

    def _run_cuda(self, feed: dict[str, torch.Tensor], batch: int) -> dict[str, torch.Tensor]:
        """IO binding on torch CUDA tensors; returns without waiting for the GPU."""
        binding = self.session.io_binding()
        dev_id = self.device.index or 0
        caller = torch.cuda.current_stream(self.device)
        inputs, result = {}, {}
        for name in self.spec.input_names:  # conversions and allocations on the caller's stream
            tdtype, _ = self.input_types[name]
            inputs[name] = feed[name].to(self.device, tdtype, non_blocking=True).contiguous()
        for t in self.spec.outputs:
            result[t.name] = torch.empty(t.concrete(batch), dtype=self.output_types[t.name][0], device=self.device)
        self._stream.wait_stream(caller)  # ORT starts after the inputs are written
        for name, x in inputs.items():
            x.record_stream(self._stream)  # not reused by torch's allocator until ORT is done with it
            binding.bind_input(name, "cuda", dev_id, self.input_types[name][1], list(x.shape), x.data_ptr())
        for name, y in result.items():
            binding.bind_output(name, "cuda", dev_id, self.output_types[name][1], list(y.shape), y.data_ptr())
        self.session.run_with_iobinding(binding, self._run_options)
        caller.wait_stream(self._stream)  # the caller's next kernels see the outputs
        return result


def _check_shapes(path: Path, spec: ComponentSpec, session) -> None:
    """The graph's fixed dimensions must be the ones the manifest describes (an edited manifest,
    e.g. its latent_shape, would otherwise fail deep inside a run, or run on wrong shapes)."""
    graph = {t.name: t.shape for t in (*session.get_inputs(), *session.get_outputs())}
    for t in (*spec.inputs, *spec.outputs):
        have = graph.get(t.name)
        if have is None:
            raise DiffclsError(f"{path} has no tensor {t.name!r}; it is not a diffcls {spec.name} graph, re-export it with diffcls export")
        fixed = [(i, d) for i, d in enumerate(t.shape) if d != "B"]
        if len(have) != len(t.shape) or any(isinstance(have[i], int) and have[i] != int(d) for i, d in fixed):
            raise DiffclsError(
                f"{path}: its {t.name} has shape {list(have)} but the manifest describes {list(t.shape)} "
                f"(was manifest.json edited, e.g. its latent_shape?); re-export the engine directory with diffcls export"
            )


def _opts(provider) -> dict:
    return dict(provider[1]) if isinstance(provider, tuple) else {}


def open_engines(
    *,
    engine_dir=None,
    model=None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    image_size: int | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    providers: list | None = None,
    check_hash: bool = True,
    config=None,
    threads: int | None = None,
    **_ignored,
) -> EngineSet:
    """Open an onnxruntime engine directory; `model` (optional) must be the one it was built from
    (`config`: a single checkpoint file's --config, loaded with it and repeated in fix commands).
    `threads`: each session's intra-op threads (None: ORT's default, one per physical core)."""
    if engine_dir is None:
        raise DiffclsError(
            "the onnxruntime backend runs an exported engine directory; pass --engines DIR "
            "(create one with: diffcls export --out DIR --backend onnxruntime)"
        )
    engine_dir = Path(engine_dir)
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
    )
    dev, provider_list = resolve_providers(device, providers)
    specs = mf.manifest_specs(manifest)
    engines = {}
    for comp in exported_components(specs):
        # requested batch sizes are the UNet's; the text encoder and VAE get what they were exported for
        requested = batch_sizes if comp == "unet" else None
        have = mf.check_batch_sizes(engine_dir, manifest, comp, requested)
        sizes = tuple(sorted(set(map(int, requested)))) if requested else (have or None)
        engines[comp] = OrtEngine(engine_dir / manifest["components"][comp]["file"], specs[comp], sizes, dev, provider_list, threads)
    return mf.engine_set(
        engine_dir, manifest, engines, backend=BACKEND, device=dev,
        info={"providers": engines["unet"].providers, "source": manifest.get("source")},
    )
