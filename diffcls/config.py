"""Small settings every layer may read: where diffcls keeps its caches, and the choices
(loss, interpolation, backend, precision, device) that the library and the CLI share.

A leaf module (only `diffcls.errors` below it), so every layer can use it.
"""

from __future__ import annotations

import os
import re
from enum import Enum
from pathlib import Path

from diffcls.errors import DiffclsError


def default_cache_dir() -> Path:
    """`$DIFFCLS_CACHE`, else `$XDG_CACHE_HOME/diffcls`, else `~/.cache/diffcls`."""
    root = os.environ.get("DIFFCLS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffcls"
    )
    return Path(root)


# --- choices the library and the CLI share (each defined once) ---------------------------------
class Loss(str, Enum):
    """Error between the true and the predicted noise, averaged over (C, H, W)."""

    l2 = "l2"  # the paper's
    l1 = "l1"
    huber = "huber"


class Weighting(str, Enum):
    """Timestep weighting of the errors (models.noising.timestep_weights)."""

    none = "none"  # the paper's plain mean
    logit_normal = "logit-normal"  # SD3's training density of timesteps (Esser et al. 2024)


class Interpolation(str, Enum):
    """Resize filter of preprocessing (shorter side to S, then a center crop)."""

    bicubic = "bicubic"
    bilinear = "bilinear"
    lanczos = "lanczos"
    adm = "adm"  # ADM/DiT's center crop: box-halve while >= 2S, bicubic to S, crop (eval_prob_dit)


class Backend(str, Enum):
    """What runs the components: the diffusers modules, or an exported engine directory."""

    auto = "auto"  # torch, or the backend an --engines directory was exported for
    torch = "torch"
    onnxruntime = "onnxruntime"
    tensorrt = "tensorrt"


class Rule(str, Enum):
    """The elimination boundary of the adaptive schedule (runtime.algorithm.policy)."""

    mixture = "mixture"
    kim_nelson = "kim-nelson"


class Precision(str, Enum):
    auto = "auto"  # fp16 on a GPU, fp32 on a CPU
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"  # torch backend on a GPU only (exports are fp32 or fp16)


class ExportBackend(str, Enum):
    """The backends an export is for (Backend without auto and torch)."""

    onnxruntime = Backend.onnxruntime.value
    tensorrt = Backend.tensorrt.value


class ExportPrecision(str, Enum):
    """The precisions an export can have (Precision without bf16)."""

    auto = Precision.auto.value
    fp32 = Precision.fp32.value
    fp16 = Precision.fp16.value


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def parse_device(text: str | None) -> str | None:
    """'auto' -> None; 'cpu', 'cuda', 'cuda:N' as given; anything else a one-line error."""
    value = "auto" if text is None else str(text).strip().lower()
    if not _DEVICE.fullmatch(value):
        hint = " (GPUs are named cuda or cuda:N)" if value in ("gpu", "0", "1") or value.isdigit() else ""
        raise DiffclsError(f"--device {text!r} is not a device{hint}; use auto, cpu, cuda or cuda:N")
    return None if value == "auto" else value


def parse_ints(text: str | None, flag: str, example: str = "50 500") -> tuple[int, ...] | None:
    """'50 500' or '50,500' -> (50, 500); None stays None; anything else a one-line error naming `flag`."""
    if text is None:
        return None
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise DiffclsError(f"{flag} {text!r} must be integers, e.g. {flag} {example}") from None
    if not values:
        raise DiffclsError(f"{flag} is empty; give integers, e.g. {flag} {example}")
    return values
