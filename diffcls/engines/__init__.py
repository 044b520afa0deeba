"""Engines: one protocol, one module per backend, a string-keyed registry.

Callers ask for engines by backend name and never branch on it:

    engines = open_engines("torch", model=load_model(path), image_size=512)
    engines = open_engines("onnxruntime", engine_dir="engines/", model=model_or_None)
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util

from diffcls.engines.base import Engine, EngineSet, PassThroughEngine, check_batch
from diffcls.errors import DiffclsError, install_hint

# backend name -> (module, the Python package it needs, the extra that installs it)
BACKENDS: dict[str, tuple[str, str | None, str | None]] = {
    "torch": ("diffcls.engines.torch_backend", None, None),
    "onnxruntime": ("diffcls.engines.ort_backend", "onnxruntime", "onnx"),
    "tensorrt": ("diffcls.engines.trt_backend", "tensorrt", "tensorrt"),
}

__all__ = ["BACKENDS", "Engine", "EngineSet", "PassThroughEngine", "available_backends", "check_batch", "open_engines"]


def is_available(backend: str) -> bool:
    _, package, _ = BACKENDS[backend]
    return package is None or importlib.util.find_spec(package) is not None


def available_backends() -> list[str]:
    return [b for b in BACKENDS if is_available(b)]


def backend_module(backend: str):
    if backend not in BACKENDS:
        close = difflib.get_close_matches(backend, list(BACKENDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise DiffclsError(f"unknown backend {backend!r} (choose {', '.join(BACKENDS)}){hint}")
    module, package, extra = BACKENDS[backend]
    if not is_available(backend):
        raise DiffclsError(
            f"the {backend} backend needs the {package} package; install it with: {install_hint(extra, package)}"
        )
    return importlib.import_module(module)


def open_engines(backend: str = "torch", **kwargs) -> EngineSet:
    """Open the three engines of one model with the named backend (see each backend's `open_engines`)."""
    return backend_module(backend).open_engines(**kwargs)
