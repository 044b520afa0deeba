"""The options `classify`, `evaluate`, `calibrate` and `profile` share, turned into a `JobSpec`.

    @app.command()
    @run_options
    def classify(paths: ..., out_csv: ..., settings: RunSettings) -> None:
        with ClassifyJob(settings, paths, out=out_csv) as job: ...

`run_options` adds the shared options to the command's signature (so Typer shows and parses
them) and hands the command one `RunSettings` (a `runtime.execution.spec.JobSpec` parsed from the
command line) instead of twenty arguments, with the engines and threads resolved as the Python
API resolves them (`diffcls.api.with_engines`: the CPU fast path, exporting a bundled model once). Each option's default is the JobSpec field's, so
defaults are declared once, in the runtime.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffcls.config import Backend, Interpolation, Loss, Precision, Rule, Weighting, parse_device, parse_ints
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule
from diffcls.runtime.execution.spec import JobSpec

_MODEL, _SCHEDULE, _INPUT, _RUNTIME = "Model and engines", "Schedule", "Prompts and images", "Runtime"
_ADAPTIVE = "Adaptive evaluation"
ADAPTIVE_DEFAULTS = AdaptiveSchedule()


def _opt(flag: str, help: str, panel: str, **kw) -> Any:
    return typer.Option(flag, help=help, rich_help_panel=panel, **kw)


# name -> annotation, in --help order; the default is JobSpec's (device: "auto" for None)
OPTIONS: dict[str, Any] = {
    "model": Annotated[Optional[Path], _opt("--model", "Diffusers model directory (Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, Flux or DiT), Hugging Face model id from the local cache (org/name), checkpoint file (SD 1.x/2.x, SDXL, SD3/3.5, Flux), or a bundled model: demo (the default, SD), demo-dit, demo-shapes or demo-flow.", _MODEL)],
    "config": Annotated[Optional[Path], _opt("--config", "For a checkpoint --model: the diffusers directory or cached model id whose configs describe it (needed for SD 2.x, SDXL, SD3/3.5 and Flux).", _MODEL)],
    "no_t5": Annotated[bool, _opt("--no-t5", "SD3/3.5: skip the T5-XXL text encoder (not loaded; zeros in its place, as diffusers with text_encoder_3=None): less memory, other scores; cached embeddings and results files are kept apart from runs with T5.", _MODEL)],
    "engines": Annotated[Optional[Path], _opt("--engines", "Engine directory from `diffcls export` (runs ONNX Runtime / TensorRT instead of torch).", _MODEL)],
    "backend": Annotated[Backend, _opt("--backend", "Engine backend. auto: the one an --engines directory was exported for; else, on a CPU, the bundled models (demo, demo-dit, demo-shapes, demo-flow) through ONNX Runtime engines exported once into the cache directory (needs the onnx extra; torch without it), and torch for other models or on a GPU. torch: run the model in torch.", _MODEL)],
    "device": Annotated[str, _opt("--device", "auto, cpu, cuda or cuda:N.", _MODEL)],
    "precision": Annotated[Precision, _opt("--precision", "auto = fp16 on a GPU, fp32 on a CPU; bf16 only with the torch backend on a GPU.", _MODEL)],
    "compile": Annotated[bool, _opt("--compile/--no-compile", "torch.compile the UNet (torch backend; CUDA graphs on GPU; once per batch size).", _MODEL)],
    "prompts": Annotated[Optional[Path], _opt("--prompts", "CSV with columns prompt,classname,classidx (several prompts may share a classidx).", _INPUT)],
    "classes": Annotated[Optional[str], _opt("--classes", 'Comma-separated class names, e.g. "cat,dog" (used with --template).', _INPUT)],
    "template": Annotated[str, _opt("--template", "Prompt template for --classes; {} is the class name.", _INPUT)],
    "list_file": Annotated[Optional[Path], _opt("--list", "Text file of image paths, one a line, or a CSV with a path column (and label, for evaluate); relative paths are read from its folder.", _INPUT)],
    "limit": Annotated[Optional[int], _opt("--limit", "Only the first N images (with --sample: of the sample). A rerun with a larger N and the same --out resumes.", _INPUT, min=1)],
    "sample": Annotated[Optional[int], _opt("--sample", "Only N images drawn at random (seeded by --seed; a larger N with the same seed holds the smaller sample), in run order.", _INPUT, min=1)],
    "image_size": Annotated[Optional[int], _opt("--image-size", "Input resolution S (default: the model's, 512 for SD 2.x base).", _INPUT, min=8)],
    "interpolation": Annotated[Interpolation, _opt("--interpolation", "Resize filter.", _INPUT)],
    "n_samples": Annotated[Optional[str], _opt("--n-samples", "Timesteps per round, e.g. 50 500 or 50,500 (default: the model's, else 50 500).", _SCHEDULE, metavar="N N..")],
    "to_keep": Annotated[Optional[str], _opt("--to-keep", "Prompts kept after each round, e.g. 5 1; the last must be 1 (default: the model's, else 5 1 with 5 capped at the number of prompts).", _SCHEDULE, metavar="K K..")],
    "n_trials": Annotated[int, _opt("--n-trials", "Noise draws per timestep.", _SCHEDULE, min=1)],
    "loss": Annotated[Loss, _opt("--loss", "Error between true and predicted noise.", _SCHEDULE)],
    "weighting": Annotated[Optional[Weighting], _opt("--weighting", "Timestep weighting of the errors: none (the paper's plain mean) or logit-normal (SD3's training density of timesteps, for flow-matching models; Esser et al. 2024). Default: the model's diffcls.json, else logit-normal for a flow-matching model and none for the others.", _SCHEDULE)],
    "seed": Annotated[int, _opt("--seed", "Seed of the noise bank.", _SCHEDULE)],
    # escape the brackets: Rich markup would swallow [max(n_samples)*n_trials, C, h, w]
    "noise": Annotated[Optional[Path], _opt("--noise", r"Noise bank file (torch .pt or .npy), a tensor of shape \[max(n_samples)*n_trials, C, h, w].", _SCHEDULE)],
    "adaptive": Annotated[bool, _opt("--adaptive", "Stop each image once a paired sequential test has settled its answer (docs/adaptive.md) instead of the fixed --n-samples/--to-keep rounds. --error-rate is the measured chance the answer differs from the full-budget one; --calibration with timestep weights (diffcls calibrate --timestep-weights) makes it much cheaper (BENCHMARKS.md, Round 4).", _ADAPTIVE)],
    "error_rate": Annotated[Optional[float], _opt("--error-rate", f"--adaptive: the chance the answer differs from the full-budget answer (every prompt at every grid timestep), as measured by replay on the digits train split; it picks the test's --alpha from a measured table (default {ADAPTIVE_DEFAULTS.error_rate:g}; docs/adaptive.md).", _ADAPTIVE)],
    "alpha": Annotated[Optional[float], _opt("--alpha", "--adaptive: the test's own bound, P(a test eliminates the best prompt) <= alpha under docs/adaptive.md's assumptions, split between the two stages (default: from --error-rate's measured table).", _ADAPTIVE)],
    "min_samples": Annotated[Optional[int], _opt("--min-samples", f"--adaptive: timesteps every prompt gets before any is eliminated, n0 (default {ADAPTIVE_DEFAULTS.min_samples}).", _ADAPTIVE)],
    "max_samples": Annotated[Optional[int], _opt("--max-samples", f"--adaptive: timesteps per prompt at most; then the lowest mean error wins (default {ADAPTIVE_DEFAULTS.max_samples}).", _ADAPTIVE)],
    "rule": Annotated[Optional[Rule], _opt("--rule", f"--adaptive: the elimination boundary (default {ADAPTIVE_DEFAULTS.rule}; kim-nelson needs an indifference zone, --rel-delta).", _ADAPTIVE)],
    "rel_delta": Annotated[Optional[float], _opt("--rel-delta", f"--adaptive --rule kim-nelson: the indifference zone as a fraction of the mean error (default {ADAPTIVE_DEFAULTS.rel_delta:g}).", _ADAPTIVE)],
    "final_samples": Annotated[Optional[int], _opt("--final-samples", f"--adaptive: the prompts no test has eliminated by --max-samples go on for up to this many more timesteps under a fresh test (default {ADAPTIVE_DEFAULTS.final_samples}; 0: no final stage, the lowest mean at --max-samples wins; docs/adaptive.md).", _ADAPTIVE)],
    "final_keep": Annotated[Optional[int], _opt("--final-keep", "--adaptive --final-samples: keep only this many survivors (lowest means) for the final stage: a bare cut, outside the --alpha bound (default 0: every survivor).", _ADAPTIVE)],
    "final_error_rate": Annotated[Optional[float], _opt("--final-error-rate", "--adaptive --final-samples: the final stage's share of --alpha (default: half).", _ADAPTIVE)],
    "look_every": Annotated[Optional[int], _opt("--look-every", f"--adaptive: test every this many timesteps (group-sequential; default {ADAPTIVE_DEFAULTS.look_every}).", _ADAPTIVE)],
    "batch_size": Annotated[int, _opt("--batch-size", "UNet batch size (images share batches).", _RUNTIME, min=1)],
    "workers": Annotated[int, _opt("--workers", "Threads that decode and resize images while the UNet runs.", _RUNTIME, min=1)],
    "threads": Annotated[Optional[int], _opt("--threads", "CPU threads of torch and ONNX Runtime (default: $OMP_NUM_THREADS if set, else the free cores: the cores this process may use minus the load average, at least 1).", _RUNTIME, min=1)],
    "cache_dir": Annotated[Optional[Path], _opt("--cache-dir", "Cache for text embeddings and latents, and the bundled models' exported engines (default: ~/.cache/diffcls or $DIFFCLS_CACHE).", _RUNTIME)],
    "no_cache": Annotated[bool, _opt("--no-cache", "Do not read or write the embedding/latent cache (the bundled models' engines are still used).", _RUNTIME)],
}
_CLI_DEFAULTS = {"device": "auto"}  # the text a user would type for JobSpec's None


def shared(name: str) -> Any:
    """OPTIONS[name] for a command without `run_options` (export's --model): the same flag and
    help, outside the help panels."""
    kind, info = typing.get_args(OPTIONS[name])
    info = copy.copy(info)
    info.rich_help_panel = None
    return Annotated[kind, info]


def default(name: str) -> Any:
    return _CLI_DEFAULTS.get(name, JobSpec.__dataclass_fields__[name].default)


@dataclasses.dataclass(frozen=True)
class RunSettings(JobSpec):
    """A JobSpec parsed from the command line's text (and checked)."""

    @classmethod
    def from_options(cls, **raw) -> "RunSettings":
        parsed = {
            **raw,
            "device": parse_device(raw.get("device")),
            "n_samples": parse_ints(raw.get("n_samples"), "--n-samples"),
            "to_keep": parse_ints(raw.get("to_keep"), "--to-keep"),
        }
        return cls(**parsed).check()


def run_options(command=None, *, exclude: tuple[str, ...] = ()):
    """Add the shared options to `command`'s signature; it receives them as `settings`.
    `@run_options(exclude=(...))`: all but those (they keep RunSettings' defaults)."""
    if command is None:
        return functools.partial(run_options, exclude=tuple(exclude))
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "settings"]
    args = [p for p in own if p.default is inspect.Parameter.empty]
    kw = inspect.Parameter.KEYWORD_ONLY
    group = [inspect.Parameter(name, kw, default=default(name), annotation=a) for name, a in OPTIONS.items() if name not in exclude]
    rest = [p.replace(kind=kw) for p in own if p.default is not inspect.Parameter.empty]
    params = args + group + rest

    @functools.wraps(command)
    def wrapper(**values):
        raw = {name: values.pop(name) for name in OPTIONS if name not in exclude}
        from diffcls.api import with_engines  # the fast path's engines and the threads, as the API fills them
        from diffcls.cli.common import say, user_errors

        with user_errors():  # prints the plan's note, an export's line and one `running ...` line
            settings = with_engines(RunSettings.from_options(**raw), say=say)
        return command(**values, settings=settings)

    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # Typer must read the new signature, not the command's
    return wrapper

