"""`JobSpec`: everything a classification run is configured with, as plain values.

One frozen dataclass, its defaults declared here once (the CLI's options read them from here),
validated once (`check`), and serialisable (`to_dict` / `from_dict`: enums as their values,
paths as strings, tuples as lists) so that a run's settings can be stored, compared and sent to
Ray workers as data. `None` means "the model's own default" (from its `diffcls.json`) or, for
the adaptive flags, `AdaptiveSchedule`'s.

    spec = JobSpec(model="demo", n_samples=(10, 50), to_keep=(3, 1))
    JobSpec.from_dict(spec.to_dict()) == spec
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from enum import Enum
from pathlib import Path

from diffcls.config import Backend, Interpolation, Loss, Precision, Rule, Weighting
from diffcls.errors import DiffclsError
from diffcls.runtime.data.prompts import PromptSet
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule, default_schedule

# the adaptive schedule's settings -> their flags (None in a spec: AdaptiveSchedule's default)
ADAPTIVE_FLAGS = {
    "error_rate": "--error-rate", "alpha": "--alpha", "min_samples": "--min-samples", "max_samples": "--max-samples", "rule": "--rule",
    "rel_delta": "--rel-delta", "final_samples": "--final-samples", "final_keep": "--final-keep",
    "final_error_rate": "--final-error-rate", "look_every": "--look-every",
}


@dataclass(frozen=True)
class JobSpec:
    """What a classify/evaluate/calibrate/profile run is configured with (not its inputs/outputs)."""

    model: Path | None = None  # directory, checkpoint file, cached hub id or bundled name; None: demo
    config: Path | None = None  # configs for a single-file --model checkpoint
    no_t5: bool = False  # SD3: skip the T5 text encoder (zeros in its place; another model fingerprint)
    engines: Path | None = None  # an exported engine directory instead of the torch modules
    backend: Backend = Backend.auto  # auto: torch, or what the engine directory was exported for
    device: str | None = None  # None: auto (cuda when there is one)
    precision: Precision = Precision.auto  # auto: fp16 on a GPU, fp32 on a CPU
    compile: bool = False
    prompts: Path | None = None  # prompts CSV; None: --classes, the model's prompts or the folders
    classes: str | None = None
    template: str = "a photo of a {}."
    list_file: Path | None = None  # --list: more images, from a text file or a CSV
    limit: int | None = None  # only the first N images (of the sample, with `sample`)
    sample: int | None = None  # only N images drawn at random, seeded by `seed` (runtime.data.inputs.Inputs.select)
    image_size: int | None = None  # None: the model's
    interpolation: Interpolation = Interpolation.bicubic
    n_samples: tuple[int, ...] | None = None  # None: the model's default schedule
    to_keep: tuple[int, ...] | None = None
    n_trials: int = 1
    loss: Loss = Loss.l2
    weighting: Weighting | None = None  # None: the model's (its diffcls.json), else none
    seed: int = 0
    noise: Path | None = None  # a noise bank file instead of the seed's
    adaptive: bool = False
    error_rate: float | None = None  # the adaptive flags: None is AdaptiveSchedule's default
    alpha: float | None = None
    min_samples: int | None = None
    max_samples: int | None = None
    rule: Rule | None = None
    rel_delta: float | None = None
    final_samples: int | None = None
    final_keep: int | None = None
    final_error_rate: float | None = None
    look_every: int | None = None
    batch_size: int = 32  # UNet batch (images share batches)
    workers: int = 2  # threads that decode images while the UNet runs
    threads: int | None = None  # None: torch.get_num_threads(); the CLI fills in engines.fastpath.choose_threads (the free cores)
    cache_dir: Path | None = None  # None: config.default_cache_dir()
    no_cache: bool = False

    def __post_init__(self):
        """Coerce plain values (strings, lists) to the declared types, so that a spec built by
        hand, by the CLI or by `from_dict` is the same object."""
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            kind = _KINDS.get(f.name)
            if kind is Path and not isinstance(v, Path):
                v = Path(v)
            elif kind == "ints":
                v = tuple(int(x) for x in v)
            elif isinstance(kind, type) and issubclass(kind, Enum) and not isinstance(v, kind):
                try:
                    v = kind(v)
                except ValueError:
                    choices = ", ".join(m.value for m in kind)
                    raise DiffclsError(f"--{f.name.replace('_', '-')} {v!r} is not one of {choices}") from None
            object.__setattr__(self, f.name, v)

    # --- plain values -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, Enum):
                return v.value
            if isinstance(v, Path):
                return str(v)
            if isinstance(v, tuple):
                return list(v)
            return v

        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DiffclsError(f"unknown settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes) -> "JobSpec":
        return replace(self, **changes)

    # --- validation ---------------------------------------------------------------------------
    def check(self) -> "JobSpec":
        """Refuse combinations no backend can honour (one-line errors naming the flags)."""
        engines_backend = self.backend in (Backend.onnxruntime, Backend.tensorrt)
        if self.config is not None and self.model is None:
            raise DiffclsError("--config describes a checkpoint file; pass it with --model FILE")
        if self.no_t5 and self.engines is not None:
            raise DiffclsError("--no-t5 chooses how an SD3 model loads; an --engines directory was exported with or "
                               "without T5 (diffcls export --no-t5): drop --no-t5, or --engines and pass --model")
        if self.no_t5:
            from diffcls.models.loading import check_no_t5

            check_no_t5(self.model)
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
        given = [flag for name, flag in ADAPTIVE_FLAGS.items() if getattr(self, name) is not None]
        if given and not self.adaptive:
            raise DiffclsError(f"{given[0]} applies to adaptive evaluation only; add --adaptive or drop {given[0]}")
        if self.adaptive:
            self.adaptive_schedule().validate(None)  # the prompt-independent checks, before any work
        if (self.n_samples is None) != (self.to_keep is None):
            raise DiffclsError("give both --n-samples and --to-keep (one value per round each), or neither")
        if self.prompts is not None and self.classes is not None:
            raise DiffclsError("give either --prompts or --classes, not both")
        from diffcls.runtime.data.inputs import check_run_numbers

        check_run_numbers(self.seed, self.image_size)
        return self

    def adaptive_schedule(self) -> AdaptiveSchedule:
        """The --adaptive schedule: the settings given, AdaptiveSchedule's defaults for the rest."""
        given = {name: getattr(self, name) for name in ADAPTIVE_FLAGS if getattr(self, name) is not None}
        if "rule" in given:
            given["rule"] = given["rule"].value
        return AdaptiveSchedule(**given, n_trials=self.n_trials, loss=self.loss.value)


# --- the spec, else the model's diffcls.json, else the library's defaults ---------------------------
def resolve_prompts(s: JobSpec, defaults: dict, folder_classes: list[str] | None = None) -> PromptSet:
    """The prompts: --prompts, a class-conditional model's labels, --classes, the model's prompts
    file, or the class folders' names (evaluate), in that order."""
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


def build_schedule(s: JobSpec, n_prompts: int, defaults: dict) -> Schedule | AdaptiveSchedule:
    """The user's schedule as given; else the model's default (the paper's where it names none)
    with the first keep capped at the prompt count (a cap the user's own --to-keep never gets:
    that is an error to report)."""
    weighting = s.weighting.value if s.weighting is not None else str(defaults.get("weighting", "none"))
    if s.adaptive:
        return replace(s.adaptive_schedule(), weighting=weighting)
    if s.n_samples is None:
        ns = tuple(defaults.get("n_samples", Schedule.n_samples))
        ks = tuple(defaults.get("to_keep", Schedule.to_keep))
        return default_schedule(n_prompts, ns, ks, n_trials=s.n_trials, loss=s.loss.value, weighting=weighting)
    return Schedule(n_samples=s.n_samples, to_keep=s.to_keep, n_trials=s.n_trials, loss=s.loss.value, weighting=weighting)


_KINDS = {
    "model": Path, "config": Path, "engines": Path, "prompts": Path, "list_file": Path, "noise": Path, "cache_dir": Path,
    "backend": Backend, "precision": Precision, "interpolation": Interpolation, "loss": Loss, "rule": Rule, "weighting": Weighting,
    "n_samples": "ints", "to_keep": "ints",
}
