"""From a `JobSpec` to what a run needs: the model's defaults, prompts, schedule, noise bank,
and the opened `Classifier`. Cheap checks first, so a typo costs no model load.

Precedence everywhere: what the spec gives, else the model's own `diffcls.json` (its prompts,
schedule, image size; a class-conditional model's labels), else the library's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffcls.config import Backend, Precision
from diffcls.errors import DiffclsError
from diffcls.runtime.execution.spec import JobSpec, build_schedule, resolve_prompts  # noqa: F401 - resolve's API


def model_defaults_of(s: JobSpec) -> dict:
    """The model's (or the exported model's) diffcls.json defaults; checks the engine directory."""
    from diffcls.engines.manifest import require_finished_export
    from diffcls.models.loading import check_model_path, model_defaults

    if s.engines is None:
        root = check_model_path(s.model)  # a bundled name resolves to its directory
        return model_defaults(root, s.config)  # a single file's: what its --config directory's scheduler implies
    require_finished_export(s.engines, backend=None if s.backend == Backend.auto else s.backend.value,
                            model_arg=None if s.model is None else str(s.model), config_arg=s.config)
    return model_defaults(s.engines)  # the exported model's diffcls.json and class labels


def load_noise(path: Path | None):
    """The --noise tensor (float32), or None; one-line errors for a file that is not one."""
    if path is None:
        return None
    import numpy as np
    import torch

    from diffcls.runtime.execution.classifier import noise_problem

    try:
        if path.suffix == ".npy":
            obj = torch.from_numpy(np.load(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DiffclsError(f"noise file {path} does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise DiffclsError(f"cannot read noise file {path} ({type(e).__name__}); save a tensor with torch.save or numpy.save") from None
    if not isinstance(obj, torch.Tensor):
        raise DiffclsError(f"noise file {path} holds a {type(obj).__name__}, not a tensor; torch.save(tensor, path)")
    problem = noise_problem(obj)
    if problem:
        raise DiffclsError(f"noise file {path} {problem}; save finite standard-normal noise, or drop --noise to use --seed")
    return obj.float()


def known_train_timesteps(s: JobSpec) -> int | None:
    """The model's number of training timesteps when a small file says it, else None."""
    try:
        if s.engines is not None:
            from diffcls.engines.manifest import ALPHAS_FILE

            return len(json.loads((s.engines / ALPHAS_FILE).read_text())["alphas_cumprod"])
        from diffcls.models.loading import resolve_model_path

        root = resolve_model_path(s.model)
        cfg = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        return int(cfg.get("num_train_timesteps", 1000))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # validated after loading


def runs_on_cpu(s: JobSpec) -> bool:
    if s.device is not None:
        return s.device == "cpu"
    import torch

    return not torch.cuda.is_available()


def backend_name(s: JobSpec) -> str:
    """The backend that will run: auto means torch, or what an engine directory was exported for (the
    CLI and the Python API resolve auto first: diffcls.api.with_engines, engines.fastpath)."""
    if s.backend != Backend.auto:
        return s.backend.value
    if s.engines is None:
        return "torch"
    from diffcls.engines.manifest import exported_backend

    return exported_backend(s.engines)


def classifier_kwargs(s: JobSpec, image_size: int | None, absolute: bool = False) -> dict:
    """`Classifier.from_pretrained`'s keyword arguments, as plain values (Ray sends them to
    workers: `absolute` makes the paths independent of the working directory)."""

    def path(p):
        if p is None:
            return None
        # a Hugging Face model id is not a path: only what exists here is made absolute
        return str(Path(p).resolve()) if absolute and Path(p).exists() else str(p)

    name = backend_name(s)
    return dict(
        model=path(s.model),
        config=path(s.config),
        no_t5=s.no_t5,
        backend=name,
        engine_dir=path(s.engines),
        device=s.device,
        precision=None if s.precision == Precision.auto else s.precision.value,
        image_size=image_size,
        # a compiled UNet gets one static graph per batch size: pad the tail to the same size
        batch_sizes=(s.batch_size,) if s.compile and name == "torch" else None,
        compile=s.compile,
        cache_dir=path(s.cache_dir),
        use_cache=not s.no_cache,
        threads=s.threads,
    )


def open_classifier(s: JobSpec, image_size: int | None, absolute: bool = False):
    """The spec's Classifier; refuses a --batch-size the engine directory was not built for."""
    from diffcls.runtime.execution.classifier import Classifier

    clf = Classifier.from_pretrained(**classifier_kwargs(s, image_size, absolute))
    sizes = clf.engines.unet.batch_sizes
    if s.engines is not None and sizes and s.batch_size not in sizes:
        from diffcls.engines.manifest import check_batch_sizes, read_manifest

        try:  # refuses it, with the export command that adds it
            check_batch_sizes(s.engines, read_manifest(s.engines), "unet", (s.batch_size,))
        except DiffclsError as e:
            raise DiffclsError(f"--batch-size {s.batch_size}: {e}") from None
    return clf
