"""The torch backend: the diffusers modules themselves, eager or compiled.

fp32 on CPU, fp16 on CUDA by default. On CUDA the UNet can be compiled once per fixed batch size
(`torch.compile`, CUDA graphs via mode="reduce-overhead") with channels_last and SDPA attention;
see `diffcls.runtime` for how batches are kept full so that every call hits a compiled size.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from diffcls.config import default_cache_dir, parse_device
from diffcls.engines.base import EngineSet, check_batch
from diffcls.errors import DiffclsError
from diffcls.models.loading import MODEL_TYPES, SDModel, load_model
from diffcls.models.spec import ComponentSpec, model_component_specs
from diffcls.models.wrappers import wrap

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    device = parse_device(None if device is None else str(device))
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DiffclsError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


def resolve_precision(precision: str | None, device: torch.device) -> str:
    if precision in (None, "auto"):
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise DiffclsError(f"unknown precision {precision!r}; choose fp32, fp16 or bf16")
    if precision == "fp16" and device.type == "cpu":
        raise DiffclsError("fp16 on CPU is slow and inexact in torch; use --precision fp32 on CPU")
    return precision


@contextmanager
def exact_fp32(device: torch.device):
    """fp32 convolutions and matmuls in IEEE fp32 on CUDA for the duration of one call.

    PyTorch lets cuDNN run fp32 convolutions in TF32 by default (10-bit mantissa), which moves
    an fp32 VAE's latents by ~1e-3 relative; a component asked to run in fp32 (`--precision
    fp32`, or the VAE's `force_upcast`) should give fp32 results. The process-wide flags are set
    for the call only and restored after it (newer torch: `fp32_precision`, else `allow_tf32`).
    """
    if device.type != "cuda":
        yield
        return
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    matmul = torch.backends.cuda.matmul
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        saved = (cudnn_conv.fp32_precision, matmul.fp32_precision)
        cudnn_conv.fp32_precision, matmul.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            cudnn_conv.fp32_precision, matmul.fp32_precision = saved
    else:  # torch without the fp32_precision API
        saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = False, False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved


class TorchEngine:
    """One component as a torch module; any batch size unless `batch_sizes` is given."""

    def __init__(
        self,
        module: torch.nn.Module,
        spec: ComponentSpec,
        device: torch.device,
        dtype: torch.dtype,
        batch_sizes: tuple[int, ...] | None = None,
        compile: bool = False,
    ):
        self.component = spec.name
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.batch_sizes = tuple(batch_sizes) if batch_sizes else None
        self.module = module.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.calls = 0  # number of forward calls, for caches' "no work was done" checks
        self._run = self.module
        if compile:
            self._run = compile_module(self.module, device)

    @torch.inference_mode()
    def __call__(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_batch(self, feed)
        args = []
        for t in self.spec.inputs:
            x = feed[t.name].to(self.device, non_blocking=True)
            x = x.to(torch.int64) if t.dtype == "int64" else x.to(self.dtype)
            args.append(x)
        self.calls += 1
        if self.dtype == torch.float32:
            with exact_fp32(self.device):
                out = self._run(*args)
        else:
            out = self._run(*args)
        return {self.spec.output_names[0]: out}


def configure_compile_cache(root=None) -> Path:
    """Persist inductor's compiled graphs and kernels so that a second run does not recompile.

    Uses `$TORCHINDUCTOR_CACHE_DIR` if the user set it, else `<diffcls cache>/inductor`; turns on
    inductor's FX-graph cache and AOT-autograd cache (both keyed by graph, shapes and versions).
    """
    import os

    if not _user_set_inductor_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(root) if root is not None else default_cache_dir() / "inductor")
    path = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    try:
        import torch._inductor.config as inductor_config

        if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
            inductor_config.fx_graph_cache = True
    except (ImportError, AttributeError):
        pass
    try:
        import torch._functorch.config as functorch_config

        if "TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ and hasattr(functorch_config, "enable_autograd_cache"):
            functorch_config.enable_autograd_cache = True
    except ImportError:
        pass
    return path


def _user_set_inductor_cache_dir() -> bool:
    """Importing torch._dynamo writes inductor's default (/tmp/torchinductor_<user>) into the
    environment, so "unset" means: absent, or equal to that default."""
    import os

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None:
        return False
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default
    except ImportError:
        return True
    return os.path.abspath(current) != os.path.abspath(torch_default())


def compile_module(module: torch.nn.Module, device: torch.device):
    """torch.compile one component: one static graph per input shape (i.e. per batch size).

    On CUDA: fused QKV projections, channels_last, SDPA attention (set in `open_engines`),
    inductor with 1x1 convolutions as matmuls, CUDA graphs (mode="reduce-overhead"), and no
    max-autotune (it autotunes for many minutes per shape). CUDA-graph outputs live in memory
    that the next replay overwrites, so every call marks a new step and returns a clone.
    On CPU: plain inductor (opt-in; compiling takes a while on few cores).
    """
    import torch._dynamo

    configure_compile_cache()
    torch._dynamo.config.automatic_dynamic_shapes = False  # a new batch size is a new static graph
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; room for several batch sizes
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 16))
            break
    if device.type != "cuda":
        return torch.compile(module, dynamic=False)
    import torch._inductor.config as inductor_config

    inductor_config.conv_1x1_as_mm = True
    unet = getattr(module, "unet", None)
    if unet is not None and hasattr(unet, "fuse_qkv_projections"):
        try:
            unet.fuse_qkv_projections()
        except Exception:  # noqa: BLE001 - an attention processor that cannot fuse: run unfused
            pass
    module.to(memory_format=torch.channels_last)
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=False, dynamic=False)

    def run(*args):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args).clone()

    run.compiled = compiled
    return run


def open_engines(
    *,
    model: SDModel | str | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    compile: bool = False,
    engine_dir=None,
    **_ignored,
) -> EngineSet:
    if engine_dir is not None:
        raise DiffclsError("the torch backend runs a model, not an engine directory; pass --model or another --backend")
    if not isinstance(model, MODEL_TYPES):
        model = load_model(model)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    dtype = PRECISIONS[precision]
    image_size = int(image_size or model.default_image_size)
    specs = model_component_specs(model, image_size)
    fingerprint = model.fingerprint()  # before moving/casting: the fp32 weights identify it
    if device.type == "cuda":
        _use_fast_attention(model)
    # the VAE encoder stays fp32 where its config asks for it (SD's VAE overflows in fp16)
    vae_dtype = torch.float32 if model.vae_force_upcast else dtype
    alphas, sigmas = model.noise_tables(image_size)  # Flux: shifted for this image size
    engines = {
        name: TorchEngine(
            wrap(model, name),
            specs[name],
            device,
            vae_dtype if name == "vae_encoder" else dtype,
            batch_sizes=batch_sizes if name == "unet" else None,
            compile=compile and name == "unet",
        )
        for name in specs
    }
    return EngineSet(
        text_encoder=engines["text_encoder"],
        vae_encoder=engines["vae_encoder"],
        unet=engines["unet"],
        tokenizer=model.tokenizer,
        alphas_cumprod=alphas.detach().to("cpu", torch.float32),
        image_size=image_size,
        latent_shape=model.latent_shape(image_size),
        max_length=model.max_length,
        fingerprint=fingerprint,
        backend="torch",
        precision=precision,
        device=device,
        info={"source": model.source, "compile": compile, "kind": model.kind,
              "vae_encoder_dtype": str(vae_dtype).removeprefix("torch.")},
        prediction_type=model.prediction_type,
        sigmas=None if sigmas is None else sigmas.detach().to("cpu", torch.float32),
    )


def _use_fast_attention(model: SDModel) -> None:
    """PyTorch SDPA attention for the UNet (diffusers' default processor on torch 2)."""
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0

        model.unet.set_attn_processor(AttnProcessor2_0())
    except Exception:  # noqa: BLE001 - older/newer diffusers: keep its default (also SDPA)
        pass
