"""What runs when the user does not say: the backend, the engine directory and the CPU threads.

    plan = plan_engines(model=None, engines=None, backend="auto", device=None, cache_dir=None)
    plan.backend, plan.engine_dir, plan.bundled      # "onnxruntime", <cache>/engines, "demo"
    threads = choose_threads(None)                   # ThreadChoice(n=1, why="2 cores, load 1.3")

The rule (measured in BENCHMARKS.md, "The CPU fast path"):

- What the user names wins: `--engines DIR` runs that directory (with `--backend`, or the backend
  it was exported for); `--backend torch` runs the model in torch.
- Otherwise, on a CPU, a bundled model (`demo`, the default, `demo-dit`, `demo-shapes`) runs through ONNX
  Runtime engines exported once into `<cache dir>/engines/` (the export, its checks and its
  lock are `diffcls.export.cached`): they are about 1.5x faster than eager torch there, and the
  export takes seconds. `--compile`, `--precision` other than fp32, `--config` keep torch.
- Where onnxruntime (or onnx, which the export needs) is not installed, torch runs, with a
  one-line note naming the extra that installs them. A user's own model on a CPU runs in torch
  (exporting a Stable Diffusion UNet takes minutes and gigabytes: that is `diffcls export`'s job),
  with a note giving the export command. On a GPU torch runs (fp16, the measured fast path there).

Threads (`choose_threads`): an explicit count wins, then `$OMP_NUM_THREADS`; else the cores this
process may run on (`os.sched_getaffinity`) minus the 1-minute load average of the others,
rounded, at least 1. torch's and ONNX Runtime's intra-op pools both get it: a thread beyond the
free cores waits at every parallel region for one the scheduler has put aside, which on a loaded
machine made the default several times slower than one thread.

A leaf of the `engines` layer: it reads the environment and small files only, and imports no
backend, so both the CLI and the runtime can ask it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from diffcls.config import default_cache_dir

ENGINES_SUBDIR = "engines"  # under the cache directory: the bundled models' exported engines
EXPORT_EXTRA = "onnx"  # the extra that installs what the export and ONNX Runtime need


@dataclass(frozen=True)
class EnginePlan:
    backend: str  # "torch", "onnxruntime" or "tensorrt"
    engine_dir: Path | None = None  # an --engines directory, or (with `bundled`) the folder of cached exports
    bundled: str | None = None  # a bundled model whose cached engines run: export them under engine_dir first
    note: str | None = None  # why the fast path did not run, where the user can change it


@dataclass(frozen=True)
class ThreadChoice:
    n: int
    why: str  # "--threads", "$OMP_NUM_THREADS", or "2 cores, load 0.4"

    def describe(self) -> str:
        return f"{self.n} thread{'s' if self.n != 1 else ''} ({self.why})"


def onnx_available() -> bool:
    """Whether the export (onnx) and ONNX Runtime (onnxruntime) are installed."""
    return all(importlib.util.find_spec(p) is not None for p in ("onnx", "onnxruntime"))


def bundled_name(model) -> str | None:
    """The bundled model `--model` names (None: the default, the SD demo), else None."""
    from diffcls.models.loading import BUNDLED, bundled_model_path

    if model is None:
        return "demo"
    text = str(model)
    if text in BUNDLED and not Path(text).exists():
        return text
    try:
        resolved = Path(model).resolve()
    except (OSError, RuntimeError):
        return None
    return next((n for n in BUNDLED if bundled_model_path(n) == resolved), None)


def _on_cpu(device: str | None) -> bool:
    if device is not None:
        return str(device) == "cpu"
    import torch

    return not torch.cuda.is_available()


def plan_engines(*, model=None, engines=None, backend: str = "auto", device: str | None = None,
                 precision: str | None = None, compile: bool = False, config=None, cache_dir=None) -> EnginePlan:
    """The engines a run uses (see the module docstring). Cheap: no model is loaded."""
    backend = getattr(backend, "value", backend) or "auto"
    precision = getattr(precision, "value", precision)
    if engines is not None:
        from diffcls.engines.manifest import exported_backend

        return EnginePlan(backend if backend != "auto" else exported_backend(engines), Path(engines))
    if backend != "auto":
        return EnginePlan(backend)
    if not _on_cpu(device) or compile or config is not None or precision not in (None, "auto", "fp32"):
        return EnginePlan("torch")
    name = bundled_name(model)
    if name is None:
        return EnginePlan("torch", note=(
            f"running {model} in torch; ONNX Runtime is usually faster on a CPU: export it once with "
            f"diffcls export --model {model} --out ENGINES, then pass --engines ENGINES"))
    if not onnx_available():
        return EnginePlan("torch", note=(
            f"onnxruntime is not installed, so torch runs the {name} model; for the faster ONNX Runtime "
            f"engines: pip install -e \".[{EXPORT_EXTRA}]\" (or pip install 'diffcls[{EXPORT_EXTRA}]')"))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return EnginePlan("onnxruntime", root / ENGINES_SUBDIR, bundled=name)


def free_cores() -> tuple[int, float]:
    """(cores this process may run on, 1-minute load average); the load is 0 where unknown."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, cores), max(0.0, load)


def choose_threads(explicit: int | None = None) -> ThreadChoice:
    """torch's and ONNX Runtime's intra-op threads (see the module docstring)."""
    if explicit is not None:
        return ThreadChoice(int(explicit), "--threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), "$OMP_NUM_THREADS")
    cores, load = free_cores()
    n = min(cores, max(1, int(cores - load + 0.5)))
    return ThreadChoice(n, f"{cores} core{'s' if cores != 1 else ''}, load {load:.1f}")
