"""ONNX -> TensorRT engine, one optimization profile per batch size (min = opt = max).

Written against TensorRT 10's Python API: `Builder`, `OnnxParser.parse_from_file`,
`IBuilderConfig` (FP16 flag, WORKSPACE memory pool limit, a timing cache shared by every build
in the engine directory), `IOptimizationProfile.set_shape`, `build_serialized_network`. The
shape planning (`plan_profiles`) is a pure function, tested without TensorRT; `tensorrt` is
imported inside the functions that need it.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffcls.errors import DiffclsError, install_hint
from diffcls.models.spec import ComponentSpec

TIMING_CACHE = "timing.cache"
DEFAULT_WORKSPACE_GB = 8.0


def plan_profiles(spec: ComponentSpec, batch_sizes) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """One profile per batch size, each {input name: (min, opt, max)} with min = opt = max.

    Fixed shapes per profile let TensorRT pick the best tactics for exactly the batches the
    runtime sends (it keeps UNet batches full); profile k serves `sorted(batch_sizes)[k]`.
    """
    sizes = normalize_batch_sizes(batch_sizes)
    profiles = []
    for b in sizes:
        profiles.append({t.name: (t.concrete(b),) * 3 for t in spec.inputs})
    return profiles


def normalize_batch_sizes(batch_sizes) -> list[int]:
    try:
        sizes = sorted({int(b) for b in batch_sizes})
    except (TypeError, ValueError) as e:
        raise DiffclsError(f"--batch-sizes must be positive integers like 8,16,32, got {batch_sizes!r}") from e
    if not sizes or sizes[0] < 1:
        raise DiffclsError(f"--batch-sizes must be positive integers like 8,16,32, got {batch_sizes!r}")
    return sizes


def profile_index(batch_sizes, batch: int) -> int:
    """Which profile (and execution context) serves `batch`."""
    sizes = normalize_batch_sizes(batch_sizes)
    return sizes.index(int(batch))


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def gpu_info() -> dict | None:
    """{"name", "compute_capability"} of the current CUDA device, None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    idx = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return {"name": torch.cuda.get_device_name(idx), "compute_capability": f"{major}.{minor}"}


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.ERROR if not os.environ.get("DIFFCLS_VERBOSE") else trt.Logger.INFO)


def build_engine(
    onnx_path: Path,
    out_path: Path,
    spec: ComponentSpec,
    batch_sizes,
    *,
    fp16: bool,
    timing_cache: Path,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
) -> Path:
    """Parse `onnx_path`, build with one profile per batch size, write the plan to `out_path`."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DiffclsError(f"the tensorrt backend needs TensorRT; install it with: {install_hint('tensorrt', 'tensorrt')}") from e

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # also reads `<file>.data` external weights
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise DiffclsError(f"TensorRT cannot parse {onnx_path}: {errors or 'unknown error'}; re-export the ONNX file")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        # platform_has_fast_fp16 is deprecated since TensorRT 10.x and may go away: absent = assume yes
        if not getattr(builder, "platform_has_fast_fp16", True):
            raise DiffclsError("this GPU has no fast fp16; export with --precision fp32")
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise DiffclsError(
                f"TensorRT {trt.__version__} has no FP16 builder flag (weakly typed fp16 builds were removed); "
                "export --backend tensorrt --precision fp32, or use TensorRT 10"
            )
        config.set_flag(trt.BuilderFlag.FP16)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU is just ignored

    for shapes in plan_profiles(spec, batch_sizes):
        profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in shapes.items():
            profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DiffclsError(
            f"TensorRT failed to build {spec.name} for batch sizes {normalize_batch_sizes(batch_sizes)}; "
            "try smaller --batch-sizes or --workspace-gb, or run with DIFFCLS_VERBOSE=1 for TensorRT's log"
        )
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    os.replace(tmp, out_path)
    # save the (grown) timing cache for the next component / the next export
    updated = config.get_timing_cache()
    if updated is not None:
        tmp = timing_cache.with_suffix(".tmp")
        tmp.write_bytes(memoryview(updated.serialize()))
        os.replace(tmp, timing_cache)
    return out_path
