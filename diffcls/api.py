"""The Python API: `Classifier` and `ClassifyJob` with the engines chosen as the CLI chooses them.

    from diffcls import Classifier, ClassifyJob, JobSpec    # these classes
    clf = Classifier.from_pretrained()                       # on a CPU: the demo's cached ONNX Runtime engines
    job = ClassifyJob(JobSpec(), ["photos/"], out="results.csv")

When the user names no engines, `diffcls.engines.fastpath` plans what runs (on a CPU a bundled
model runs ONNX Runtime engines that `diffcls.export.cached` exports once into the cache
directory; anything else runs as named, or in torch) and how many CPU threads. Carrying the plan
out calls the export, and `runtime` and `export` are siblings that never import each other: this
module sits above both, as the CLI does, and both the CLI and the package's `diffcls.Classifier` /
`diffcls.ClassifyJob` go through it. The runtime's own classes run exactly what they are given.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from diffcls.config import Backend
from diffcls.runtime.execution import classifier as _classifier
from diffcls.runtime.execution import job as _job
from diffcls.runtime.execution.spec import JobSpec

Say = Callable[[str], None]


def _plan(model, engines, backend, device, precision, compile, config, cache_dir):
    from diffcls.engines.fastpath import EnginePlan, plan_engines

    if model is not None and not isinstance(model, (str, Path)):  # a model object runs in torch as given
        return EnginePlan("torch" if getattr(backend, "value", backend) in (None, "auto") else getattr(backend, "value", backend))
    return plan_engines(model=model, engines=engines, backend=backend, device=device, precision=precision,
                        compile=compile, config=config, cache_dir=cache_dir)


def _cached_engines(plan, image_size: int | None, say: Say | None) -> Path:
    from diffcls.export.cached import ensure_cached_engines

    return ensure_cached_engines(plan.bundled, plan.engine_dir, image_size=image_size, on_export=say)


def with_engines(spec: JobSpec, say: Say | None = None) -> JobSpec:
    """`spec` with what will run filled in: the engines of the fast path (a bundled model's cached
    ONNX Runtime engines, exported first when missing or stale) and the threads. `say` hears the
    plan's note, the export's one line and a `running ...` line naming the backend, the engine
    directory and the threads."""
    from diffcls.engines.fastpath import choose_threads

    s = spec
    plan = _plan(s.model, s.engines, s.backend, s.device, s.precision, s.compile, s.config, s.cache_dir)
    if plan.note and say:
        say(f"note: {plan.note}")
    threads = choose_threads(s.threads)
    s = dataclasses.replace(s, threads=threads.n)
    if plan.bundled is not None:
        s = dataclasses.replace(s, engines=_cached_engines(plan, s.image_size, say), backend=Backend(plan.backend))
    if say:
        where = f" engines in {s.engines}" if s.engines is not None else ""
        say(f"running {plan.backend}{where}, {threads.describe()}")
    return s


class Classifier(_classifier.Classifier):
    """`runtime.execution.classifier.Classifier` whose `from_pretrained` takes `backend="auto"`
    (the default): the fast path's engines, as `diffcls classify` runs them."""

    @classmethod
    def from_pretrained(cls, model=None, *, backend: str = "auto", engine_dir=None, device=None, precision=None,
                        image_size=None, compile: bool = False, config=None, cache_dir=None, threads=None, **kw) -> "Classifier":
        from diffcls.engines.fastpath import choose_threads

        if kw.get("no_t5"):  # before the fast path swaps a model for engines: not an SD3 model, one line
            from diffcls.models.loading import check_no_t5

            check_no_t5(model)
        plan = _plan(model, engine_dir, backend, device, precision, compile, config, cache_dir)
        if plan.bundled is not None:
            engine_dir = _cached_engines(plan, image_size, None)
        return super().from_pretrained(model, backend=plan.backend, engine_dir=engine_dir, device=device, precision=precision,
                                       image_size=image_size, compile=compile, config=config, cache_dir=cache_dir,
                                       threads=choose_threads(threads).n, **kw)


class ClassifyJob(_job.ClassifyJob):
    """`runtime.execution.job.ClassifyJob` with the spec's engines and threads filled in as the
    CLI fills them (`with_engines`); `say` hears what the CLI prints about it."""

    def __init__(self, spec: JobSpec | None = None, inputs=(), *, say: Say | None = None, **kw):
        super().__init__(with_engines(spec if spec is not None else JobSpec(), say), inputs, **kw)
