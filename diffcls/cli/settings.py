"""The options `classify`, `evaluate` and `profile` share: declared once, parsed into one frozen
`RunSettings`, validated once, and turned into what a run needs by `prepare`.

    @app.command()
    @run_options
    def classify(folder: Path, out_csv: ..., settings: RunSettings) -> None:
        run = prepare(settings, folder)      # prompts, schedule, noise, opened classifier

`run_options` adds the shared options to the command's signature (so Typer shows and parses
them) and hands the command one `RunSettings` instead of twenty arguments.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffcls.config import Backend, Interpolation, Loss, Precision, parse_device
from diffcls.errors import DiffclsError
from diffcls.runtime.schedule import AdaptiveSchedule

_MODEL, _SCHEDULE, _INPUT, _RUNTIME = "Model and engines", "Schedule", "Prompts and images", "Runtime"
_ADAPTIVE = "Adaptive evaluation"
ADAPTIVE_DEFAULTS = AdaptiveSchedule()
_ADAPTIVE_FLAGS = {"error_rate": "--error-rate", "min_samples": "--min-samples", "max_samples": "--max-samples", "rule": "--rule", "rel_delta": "--rel-delta", "final_samples": "--final-samples", "final_keep": "--final-keep", "final_error_rate": "--final-error-rate"}


class Rule(str, Enum):
    mixture = "mixture"
    kim_nelson = "kim-nelson"


def _opt(flag: str, help: str, panel: str, **kw) -> Any:
    return typer.Option(flag, help=help, rich_help_panel=panel, **kw)


# name -> (annotation, default); the order is the order in --help
OPTIONS: dict[str, tuple[Any, Any]] = {
    "model": (Annotated[Optional[Path], _opt("--model", "Diffusers model directory (Stable Diffusion or DiT), Hugging Face model id from the local cache (org/name), checkpoint file, or a bundled model: demo (the default, SD) or demo-dit.", _MODEL)], None),
    "config": (Annotated[Optional[Path], _opt("--config", "For a checkpoint --model: the diffusers directory or cached model id whose configs describe it (needed for SD 2.x).", _MODEL)], None),
    "engines": (Annotated[Optional[Path], _opt("--engines", "Engine directory from `diffcls export` (runs ONNX Runtime / TensorRT instead of torch).", _MODEL)], None),
    "backend": (Annotated[Backend, _opt("--backend", "Engine backend. auto: the one an --engines directory was exported for; else, on a CPU, the bundled models (demo, demo-dit) through ONNX Runtime engines exported once into the cache directory (needs the onnx extra; torch without it), and torch for other models or on a GPU. torch: run the model in torch.", _MODEL)], Backend.auto),
    "device": (Annotated[str, _opt("--device", "auto, cpu, cuda or cuda:N.", _MODEL)], "auto"),
    "precision": (Annotated[Precision, _opt("--precision", "auto = fp16 on a GPU, fp32 on a CPU; bf16 only with the torch backend on a GPU.", _MODEL)], Precision.auto),
    "compile": (Annotated[bool, _opt("--compile/--no-compile", "torch.compile the UNet (torch backend; CUDA graphs on GPU; once per batch size).", _MODEL)], False),
    "prompts": (Annotated[Optional[Path], _opt("--prompts", "CSV with columns prompt,classname,classidx (several prompts may share a classidx).", _INPUT)], None),
    "classes": (Annotated[Optional[str], _opt("--classes", 'Comma-separated class names, e.g. "cat,dog" (used with --template).', _INPUT)], None),
    "template": (Annotated[str, _opt("--template", "Prompt template for --classes; {} is the class name.", _INPUT)], "a photo of a {}."),
    "list_file": (Annotated[Optional[Path], _opt("--list", "Text file of image paths, one a line, or a CSV with a path column (and label, for evaluate); relative paths are read from its folder.", _INPUT)], None),
    "image_size": (Annotated[Optional[int], _opt("--image-size", "Input resolution S (default: the model's, 512 for SD 2.x base).", _INPUT, min=8)], None),
    "interpolation": (Annotated[Interpolation, _opt("--interpolation", "Resize filter.", _INPUT)], Interpolation.bicubic),
    "n_samples": (Annotated[Optional[str], _opt("--n-samples", "Timesteps per round, e.g. '50 500' or 50,500 (default: the model's, else 50 500).", _SCHEDULE)], None),
    "to_keep": (Annotated[Optional[str], _opt("--to-keep", "Prompts kept after each round, e.g. '5 1' (the last must be 1).", _SCHEDULE)], None),
    "n_trials": (Annotated[int, _opt("--n-trials", "Noise draws per timestep.", _SCHEDULE, min=1)], 1),
    "loss": (Annotated[Loss, _opt("--loss", "Error between true and predicted noise.", _SCHEDULE)], Loss.l2),
    "seed": (Annotated[int, _opt("--seed", "Seed of the noise bank.", _SCHEDULE)], 0),
    # escape the brackets: Rich markup would swallow [max(n_samples)*n_trials, C, h, w]
    "noise": (Annotated[Optional[Path], _opt("--noise", r"Noise bank file (torch .pt or .npy), a tensor of shape \[max(n_samples)*n_trials, C, h, w].", _SCHEDULE)], None),
    "adaptive": (Annotated[bool, _opt("--adaptive", "Stop each image once its answer is settled (sequential elimination; docs/adaptive.md) instead of the fixed --n-samples/--to-keep rounds. What it trades, measured on the demo model's held-out digits: the accuracy of the paper's 50 500 schedule at 1/8 to 1/16 of its UNet evaluations; against the demo's own default (220 per image) fewer on clean digits (165, same accuracy) but more on hard ones (339 corrupted, for 5 of 359 more right). --max-samples 20 --final-samples 50 costs about the demo default (217) at its accuracy.", _ADAPTIVE)], False),
    "error_rate": (Annotated[Optional[float], _opt("--error-rate", f"--adaptive: the chance the best prompt is eliminated, alpha (default {ADAPTIVE_DEFAULTS.error_rate:g}).", _ADAPTIVE)], None),
    "min_samples": (Annotated[Optional[int], _opt("--min-samples", f"--adaptive: timesteps every prompt gets before any is eliminated, n0 (default {ADAPTIVE_DEFAULTS.min_samples}).", _ADAPTIVE)], None),
    "max_samples": (Annotated[Optional[int], _opt("--max-samples", f"--adaptive: timesteps per prompt at most; then the lowest mean error wins (default {ADAPTIVE_DEFAULTS.max_samples}).", _ADAPTIVE)], None),
    "rule": (Annotated[Optional[Rule], _opt("--rule", f"--adaptive: the elimination boundary (default {ADAPTIVE_DEFAULTS.rule}; kim-nelson needs an indifference zone, --rel-delta).", _ADAPTIVE)], None),
    "rel_delta": (Annotated[Optional[float], _opt("--rel-delta", f"--adaptive --rule kim-nelson: the indifference zone as a fraction of the mean error (default {ADAPTIVE_DEFAULTS.rel_delta:g}).", _ADAPTIVE)], None),
    "final_samples": (Annotated[Optional[int], _opt("--final-samples", f"--adaptive: an image still undecided at --max-samples gives its best --final-keep prompts up to this many more timesteps, eliminating as it goes (default {ADAPTIVE_DEFAULTS.final_samples}; 0: no final stage, the lowest mean at --max-samples wins; docs/adaptive.md).", _ADAPTIVE)], None),
    "final_keep": (Annotated[Optional[int], _opt("--final-keep", f"--adaptive --final-samples: how many prompts the final stage keeps (default {ADAPTIVE_DEFAULTS.final_keep}).", _ADAPTIVE)], None),
    "final_error_rate": (Annotated[Optional[float], _opt("--final-error-rate", f"--adaptive --final-samples: alpha of the final stage's own elimination test among its prompts (default: the --error-rate).", _ADAPTIVE)], None),
    "batch_size": (Annotated[int, _opt("--batch-size", "UNet batch size (images share batches).", _RUNTIME, min=1)], 32),
    "workers": (Annotated[int, _opt("--workers", "Threads that decode and resize images while the UNet runs.", _RUNTIME, min=1)], 2),
    "threads": (Annotated[Optional[int], _opt("--threads", "CPU threads of torch and ONNX Runtime (default: $OMP_NUM_THREADS if set, else the free cores: the cores this process may use minus the load average, at least 1).", _RUNTIME, min=1)], None),
    "cache_dir": (Annotated[Optional[Path], _opt("--cache-dir", "Cache for text embeddings and latents, and the bundled models' exported engines (default: ~/.cache/diffcls or $DIFFCLS_CACHE).", _RUNTIME)], None),
    "no_cache": (Annotated[bool, _opt("--no-cache", "Do not read or write the embedding/latent cache (the bundled models' engines are still used).", _RUNTIME)], False),
}


def parse_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise DiffclsError(f"{flag} {text!r} must be integers, e.g. {flag} 50 500") from None
    if not values:
        raise DiffclsError(f"{flag} is empty; give integers, e.g. {flag} 50 500")
    return values


@dataclass(frozen=True)
class RunSettings:
    """Everything a classify/evaluate/profile run is configured with (defaults as in OPTIONS)."""

    model: Path | None = None
    config: Path | None = None  # configs for a single-file --model checkpoint
    engines: Path | None = None
    backend: Backend = Backend.auto
    device: str | None = None  # None: auto
    precision: Precision = Precision.auto
    compile: bool = False
    prompts: Path | None = None
    classes: str | None = None
    template: str = "a photo of a {}."
    list_file: Path | None = None  # --list: more images, from a text file or a CSV
    image_size: int | None = None
    interpolation: Interpolation = Interpolation.bicubic
    n_samples: tuple[int, ...] | None = None  # None: the model's default schedule
    to_keep: tuple[int, ...] | None = None
    n_trials: int = 1
    loss: Loss = Loss.l2
    seed: int = 0
    noise: Path | None = None
    adaptive: bool = False
    error_rate: float | None = None  # None: AdaptiveSchedule's default (adaptive flags only)
    min_samples: int | None = None
    max_samples: int | None = None
    rule: Rule | None = None
    rel_delta: float | None = None
    final_samples: int | None = None
    final_keep: int | None = None
    final_error_rate: float | None = None
    batch_size: int = 32
    workers: int = 2
    threads: int | None = None  # None: engines.fastpath.choose_threads (the free cores)
    cache_dir: Path | None = None
    no_cache: bool = False

    @classmethod
    def from_options(cls, **raw) -> "RunSettings":
        """Parse the command-line values and refuse combinations no backend can honour."""
        s = cls(
            **{
                **raw,
                "device": parse_device(raw.get("device")),
                "n_samples": parse_ints(raw.get("n_samples"), "--n-samples"),
                "to_keep": parse_ints(raw.get("to_keep"), "--to-keep"),
            }
        )
        s.check()
        return s

    def check(self) -> None:
        engines_backend = self.backend in (Backend.onnxruntime, Backend.tensorrt)
        if self.config is not None and self.model is None:
            raise DiffclsError("--config describes a checkpoint file; pass it with --model FILE")
        if self.engines is not None and self.backend == Backend.torch:
            raise DiffclsError("--backend torch runs a model, not an --engines directory; drop --backend torch or --engines")
        if self.engines is None and engines_backend:
            raise DiffclsError(
                f"--backend {self.backend.value} runs an exported engine directory; pass --engines DIR "
                f"(create one with: diffcls export --out DIR --backend {self.backend.value})"
            )
        if self.compile and (self.engines is not None or engines_backend):
            raise DiffclsError("--compile applies to the torch backend only (engines are compiled at export); drop --compile")
        if self.precision == Precision.bf16 and self.engines is not None:
            raise DiffclsError("--precision bf16 runs only on the torch backend; engines are fp32 or fp16")
        if self.adaptive and self.n_samples is not None:
            raise DiffclsError(
                "--n-samples/--to-keep set the fixed rounds, which --adaptive replaces; drop them "
                "(--max-samples caps the timesteps per prompt) or drop --adaptive"
            )
        given = [flag for name, flag in _ADAPTIVE_FLAGS.items() if getattr(self, name) is not None]
        if given and not self.adaptive:
            raise DiffclsError(f"{given[0]} applies to adaptive evaluation only; add --adaptive or drop {given[0]}")
        if self.adaptive:
            self.adaptive_schedule().validate(2)  # the prompt-independent checks, before any work
        if (self.n_samples is None) != (self.to_keep is None):
            raise DiffclsError("give both --n-samples and --to-keep (one value per round each), or neither")
        if self.prompts is not None and self.classes is not None:
            raise DiffclsError("give either --prompts or --classes, not both")
        from diffcls.runtime.inputs import check_run_numbers

        check_run_numbers(self.seed, self.image_size)


    def adaptive_schedule(self) -> AdaptiveSchedule:
        """The --adaptive schedule: the flags given, AdaptiveSchedule's defaults for the rest."""
        given = {name: getattr(self, name) for name in _ADAPTIVE_FLAGS if getattr(self, name) is not None}
        if "rule" in given:
            given["rule"] = given["rule"].value
        return AdaptiveSchedule(**given, n_trials=self.n_trials, loss=self.loss.value)


def run_options(command=None, *, exclude: tuple[str, ...] = ()):
    """Add the shared options to `command`'s signature; it receives them as `settings`.
    `@run_options(exclude=(...))`: all but those (they keep RunSettings' defaults)."""
    if command is None:
        return functools.partial(run_options, exclude=tuple(exclude))
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    args = [p for p in own if p.default is inspect.Parameter.empty]
    kw = inspect.Parameter.KEYWORD_ONLY
    shared = [inspect.Parameter(name, kw, default=d, annotation=a) for name, (a, d) in OPTIONS.items() if name not in exclude]
    rest = [p.replace(kind=kw) for p in own if p.default is not inspect.Parameter.empty]
    params = args + shared + rest

    @functools.wraps(command)
    def wrapper(**values):
        raw = {name: values.pop(name) for name in OPTIONS if name not in exclude}
        from diffcls.cli.common import user_errors

        with user_errors():
            settings = RunSettings.from_options(**raw)
        return command(**values, settings=settings)

    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # Typer must read the new signature, not the command's
    return wrapper


# --- from settings to a run ---------------------------------------------------------------------
@dataclass
class Run:
    prompts: Any  # runtime.prompts.PromptSet
    schedule: Any  # runtime.schedule.Schedule or AdaptiveSchedule (--adaptive)
    classifier: Any  # runtime.classifier.Classifier (None when prepared with open_engines=False)
    noise: Any  # torch.Tensor | None
    image_size: int | None = None  # the resolution asked for (None: the model's)


def prepare(s: RunSettings, folder, folder_classes: list[str] | None = None, open_engines: bool = True) -> Run:
    """Check the inputs cheaply (images, model or engines, prompts, schedule, noise), then open
    the engines (unless `open_engines` is False: Ray workers open their own). Cheap checks come
    first, so a typo costs no model load. `folder`: a path, or the `runtime.inputs.Inputs` a
    command already collected."""
    from diffcls.engines.manifest import require_finished_export
    from diffcls.models.loading import check_model_path, model_defaults
    from diffcls.runtime.inputs import Inputs, collect_inputs

    if not isinstance(folder, Inputs):
        collect_inputs([folder])
    if s.engines is None:
        root = check_model_path(s.model)  # a bundled name resolves to its directory
        defaults = model_defaults(root) if root.is_dir() else {}
    else:
        require_finished_export(s.engines, backend=None if s.backend == Backend.auto else s.backend.value)
        defaults = model_defaults(s.engines)  # the exported model's diffcls.json and class labels
    prompt_set = resolve_prompts(s, defaults, folder_classes)
    schedule = build_schedule(s, len(prompt_set), defaults)
    T = _known_train_timesteps(s)
    if T is not None:
        schedule.validate(len(prompt_set), T)
    noise = load_noise(s.noise)
    if s.precision == Precision.bf16 and _runs_on_cpu(s):  # as --precision's help says (the library allows it)
        raise DiffclsError("--precision bf16 runs on a GPU only (torch backend); use --precision fp32 on a CPU")
    image_size = s.image_size or defaults.get("image_size")
    if not open_engines:
        return Run(prompts=prompt_set, schedule=schedule, classifier=None, noise=noise, image_size=image_size)
    clf = open_classifier(s, image_size)
    schedule.validate(len(prompt_set), clf.engines.num_train_timesteps)  # a no-op when T was known
    return Run(prompts=prompt_set, schedule=schedule, classifier=clf, noise=noise, image_size=image_size)


def _runs_on_cpu(s: RunSettings) -> bool:
    if s.device is not None:
        return s.device == "cpu"
    import torch

    return not torch.cuda.is_available()


def _known_train_timesteps(s: RunSettings) -> int | None:
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


def resolve_prompts(s: RunSettings, defaults: dict, folder_classes: list[str] | None = None):
    from diffcls.runtime.prompts import PromptSet

    if s.prompts is not None:
        return PromptSet.from_csv(s.prompts)
    if defaults.get("labels"):  # a class-conditional model (DiT): prompts are its class ids
        return PromptSet.from_labels(defaults["labels"], s.classes)
    if s.classes is not None:
        return PromptSet.from_classes(s.classes, s.template)
    if defaults.get("prompts"):
        return PromptSet.from_csv(defaults["prompts"])
    if folder_classes:
        return PromptSet.from_classes(folder_classes, s.template)
    raise DiffclsError('no class prompts: pass --prompts prompts.csv or --classes "cat,dog"')


def build_schedule(s: RunSettings, n_prompts: int, defaults: dict):
    """The user's schedule as given; else the model's default with the first keep capped at the
    prompt count (a cap the user's own --to-keep never gets: that is an error to report)."""
    from diffcls.runtime.schedule import Schedule, default_schedule

    if s.adaptive:
        return s.adaptive_schedule()
    if s.n_samples is None:
        ns = tuple(defaults.get("n_samples", (50, 500)))
        ks = tuple(defaults.get("to_keep", (5, 1)))
        return default_schedule(n_prompts, ns, ks, n_trials=s.n_trials, loss=s.loss.value)
    return Schedule(n_samples=s.n_samples, to_keep=s.to_keep, n_trials=s.n_trials, loss=s.loss.value)


def load_noise(path: Path | None):
    if path is None:
        return None
    import numpy as np
    import torch

    from diffcls.runtime.classifier import noise_problem

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


def engine_plan(s: RunSettings):
    """What will run (engines.fastpath): the backend and engine directory the user named, else
    the CPU fast path for a bundled model, else torch. Cheap: nothing is loaded or exported."""
    from diffcls.engines.fastpath import plan_engines

    return plan_engines(model=s.model, engines=s.engines, backend=s.backend, device=s.device,
                        precision=s.precision, compile=s.compile, config=s.config, cache_dir=s.cache_dir)


def backend_name(s: RunSettings) -> str:
    """The backend that will run (see `engine_plan`)."""
    return engine_plan(s).backend


def resolve_engines(s: RunSettings) -> tuple[str, Path | None]:
    """(backend, engine directory) of the run: `engine_plan`'s, with a bundled model's cached
    engines exported first if they are missing or stale (a one-line message when that happens);
    a plan's note (why the fast path does not run) is printed as one line."""
    from diffcls.cli.common import console

    plan = engine_plan(s)
    if plan.note:
        console.print(f"note: {plan.note}", markup=False)
    if plan.bundled is None:
        return plan.backend, plan.engine_dir
    from diffcls.export.cached import ensure_cached_engines

    return plan.backend, ensure_cached_engines(
        plan.bundled, plan.engine_dir, image_size=s.image_size, on_export=lambda m: console.print(m, markup=False)
    )


def classifier_kwargs(s: RunSettings, image_size: int | None, absolute: bool = False, threads=None) -> dict:
    """`Classifier.from_pretrained`'s keyword arguments, as plain values (Ray sends them to
    workers: `absolute` makes the paths independent of the working directory). `threads`: an
    `engines.fastpath.ThreadChoice` for a local run (None: `--threads` as given)."""

    def path(p):
        if p is None:
            return None
        # a Hugging Face model id is not a path: only what exists here is made absolute
        return str(Path(p).resolve()) if absolute and Path(p).exists() else p

    name, engine_dir = resolve_engines(s)
    model = path(s.model) if engine_dir is None else (str(path(s.model)) if s.model is not None else None)
    if s.config is not None:  # a checkpoint file with its configs: loaded here, handed over
        from diffcls.models.loading import load_model

        model = load_model(s.model, config=s.config)
    return dict(
        model=model,
        backend=name,
        engine_dir=path(engine_dir),
        device=s.device,
        precision=None if s.precision == Precision.auto else s.precision.value,
        image_size=image_size,
        # a compiled UNet gets one static graph per batch size: pad the tail to the same size
        batch_sizes=(s.batch_size,) if s.compile and name == "torch" else None,
        compile=s.compile,
        cache_dir=path(s.cache_dir),
        use_cache=not s.no_cache,
        # Ray workers (no `threads`) keep s.threads: Ray sets each worker's OMP_NUM_THREADS to its CPUs
        threads=threads.n if threads is not None else s.threads,
    )


def open_classifier(s: RunSettings, image_size: int | None):
    from diffcls.runtime.classifier import Classifier

    from diffcls.cli.common import console
    from diffcls.engines.fastpath import choose_threads

    threads = choose_threads(s.threads)
    clf = Classifier.from_pretrained(**classifier_kwargs(s, image_size, threads=threads))
    console.print(f"running {describe_engines(clf.engines)}, {threads.describe()}", markup=False)
    sizes = clf.engines.unet.batch_sizes
    if s.engines is not None and sizes and s.batch_size not in sizes:
        from diffcls.engines.manifest import check_batch_sizes, read_manifest

        try:  # refuses it, with the export command that adds it
            check_batch_sizes(s.engines, read_manifest(s.engines), "unet", (s.batch_size,))
        except DiffclsError as e:
            raise DiffclsError(f"--batch-size {s.batch_size}: {e}") from None
    return clf


def describe_engines(engines) -> str:
    """'onnxruntime engines in DIR on cpu' or 'torch (eager fp32) on cpu': what ran, for the screen."""
    where = engines.info.get("engine_dir") if isinstance(engines.info, dict) else None
    if where:
        return f"{engines.backend} {engines.precision} engines in {where} on {engines.device}"
    return f"{engines.backend} {engines.precision} on {engines.device}"
