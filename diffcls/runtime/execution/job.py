"""`ClassifyJob`: one resumable run over a set of images, for the CLI, the Python API and Ray.

    from diffcls import ClassifyJob, JobSpec

    spec = JobSpec(n_samples=(10, 50), to_keep=(3, 1))           # the demo model; see JobSpec
    with ClassifyJob(spec, ["photos/"], out="results.csv") as job:  # rerunning resumes the file
        for key, outcome in job:                                   # as images finish
            print(key, outcome.prediction)

The job owns everything between the settings and the results file: it collects the inputs
(paths, folders, globs, a list file), keeps one shard of them, resolves the prompts, schedule
and noise (the spec, else the model's own defaults), maps labels to classes (evaluate), opens an
executor (this process, or Ray workers: one interface, `iter_classify(paths, on_skip)`), binds
the results file to the run's settings (as plain values) and resumes it, and writes one row per
finished image. The CLI only turns options into a `JobSpec` and prints.
"""

from __future__ import annotations

import dataclasses

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from diffcls.config import Precision
from diffcls.errors import DiffclsError
from diffcls.runtime.execution import resolve
from diffcls.runtime.evaluation.evaluate import LABEL_COLUMNS, LabelKind, label_ids
from diffcls.runtime.data.inputs import Inputs, collect_inputs
from diffcls.runtime.data.preprocess import file_digest
from diffcls.runtime.algorithm.ranking import TOP_K, probabilities, rows_from_cells
from diffcls.runtime.results.writer import BackgroundWriter, ResultsWriter, printable
from diffcls.runtime.results.shards import parse_shard, shard_of
from diffcls.runtime.execution.spec import JobSpec
from diffcls.runtime.execution.timing import rate


@dataclass
class RayOptions:
    """Where Ray workers run (`runtime.execution.distributed.RayRunner`); None: its defaults."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float | None = None

    @classmethod
    def from_flags(cls, ray: bool, address=None, workers=None, gpus_per_worker=None) -> "RayOptions | None":
        """--ray and its flags -> RayOptions (None without --ray); a Ray flag without --ray is an error."""
        if not ray:
            given = [f for f, v in (("--ray-address", address), ("--ray-workers", workers), ("--gpus-per-worker", gpus_per_worker)) if v is not None]
            if given:
                raise DiffclsError(f"{', '.join(given)} only apply with --ray; add --ray or drop {given[0]}")
            return None
        return cls(address, workers, gpus_per_worker)


@dataclass
class Outcome:
    """One image's result in a job: scored now (`result` set) or resumed from the file (`row`)."""

    classidx: int
    prediction: str
    n_evals: int | None
    row: dict | None = None  # the results-file row this outcome was resumed from
    result: object | None = None  # runtime.execution.classifier.ImageResult, when scored in this run
    _ranked: list | None = field(default=None, repr=False)

    @property
    def ranked(self) -> list | None:
        """Its best classes (runtime.algorithm.ranking.RankedClass), the prediction first; computed when
        first asked for, off the scoring loop."""
        if self._ranked is None and self.result is not None:
            self._ranked = self.result.ranked(TOP_K)
        return self._ranked

    @classmethod
    def of(cls, result) -> "Outcome":
        return cls(result.prediction, result.classname, result.n_evals, result=result)

    @classmethod
    def from_row(cls, row: dict, class_ids: dict[str, int]) -> "Outcome":
        """Read back from its results CSV row (full-precision mean errors: equal to the fresh one)."""
        try:
            n_evals = int(row.get("n_evals"))
        except (TypeError, ValueError):
            n_evals = None
        return cls(int(row["classidx"]), row["prediction"], n_evals, row=row, _ranked=rows_from_cells(row, class_ids))

    def to_json(self, key: str, temperature: float | None = None, k: int = TOP_K) -> dict:
        """As plain JSON data (classify --json): the prediction and its best k classes in ranking
        order with mean error, pruned_after and, with a temperature, the probability."""
        ranked = self.ranked or []
        probs = probabilities(ranked, temperature) if temperature is not None and ranked else None
        top = []
        for i, c in enumerate(ranked[:k]):
            rec = {"classidx": c.classidx, "classname": c.classname, "mean_error": c.mean_error, "pruned_after": c.pruned_after}
            if probs is not None:
                rec["probability"] = probs[i]
            top.append(rec)
        return {"path": key, "prediction": self.prediction, "classidx": self.classidx, "n_evals": self.n_evals, "top": top}

    def table(self, key: str, temperature: float | None = None, k: int = TOP_K):
        """Its best k classes in ranking order as a rich Table titled `key` (`rich.print(...)`): mean
        errors, with a temperature the probabilities, and where each class left the race."""
        from rich.markup import escape

        from diffcls.render import table

        ranked = self.ranked or []
        probs = probabilities(ranked, temperature) if temperature is not None else None
        cols = ["#", "class", "mean error"] + (["probability"] if probs is not None else []) + ["decided"]
        rows = [[str(i + 1), escape(c.classname), f"{c.mean_error:.5g}"] + ([f"{probs[i]:.3f}"] if probs is not None else [])
                + ["final decision" if c.in_final else f"pruned after {c.pruned_after} timesteps"] for i, c in enumerate(ranked[:k])]
        return table(cols, rows, left=cols, wrap=cols, title=escape(printable(key)),
                     caption="mean error: lower is better" + ("" if probs is not None else "; --calibration FILE adds probabilities"))


_DROPPED = {  # why ResultsWriter dropped rows on resume -> what the user is told
    "torn": "a row cut short by an interrupted write was dropped; that image is classified again",
    "malformed": "{n} malformed row(s) dropped; those images are classified again",
    "duplicate": "{n} duplicate row(s) dropped",
    "changed": "{n} image(s) changed since they were classified; classifying them again",
    "no errors record": "{n} image(s) have no record in {errors}; classifying them again to write one",
}


class LocalExecutor:
    """Scores in this process with one Classifier (the Ray executor has the same interface)."""

    def __init__(self, clf, job: "ClassifyJob"):
        self.clf, self.job = clf, job
        self.info = clf.engine_info()

    def iter_classify(self, paths: list[str], on_skip=None):
        s, j = self.job.spec, self.job
        return self.clf.iter_classify(paths, j.prompts, j.schedule, seed=s.seed, noise=j.noise, batch_size=s.batch_size,
                                      interpolation=s.interpolation.value, workers=s.workers, on_skip=on_skip)

    def close(self) -> None:
        pass


class ClassifyJob:
    """A run over `inputs` (paths, folders, globs, or collected `Inputs`) with `spec`.

    `out`: the results CSV (resumed when it exists); `save_errors`: the JSONL of every error;
    `shard=(I, N)` or "I/N": only shard I of N; `labels`: evaluate's truth ("name": subfolders / list
    labels are class names, "index": class indices); `calibration` (a
    runtime.evaluation.calibration.Calibration or the path of its file, checked against this
    run's model, prompts and schedule) adds probabilities; `exclude`: other files the run writes, never taken as inputs;
    `ray`: run on Ray workers. `notes` collects what a user should be told (dropped rows,
    resumption, folders that could not be read); `skipped` the images that could not be read.
    """

    def __init__(self, spec: JobSpec, inputs: Inputs | Sequence[str | Path] | str | Path = (), *, out=None, save_errors=None,
                 shard: tuple[int, int] | str | None = None, labels: LabelKind | str | None = None,
                 calibration=None, ray: RayOptions | bool | None = None, exclude: Sequence = ()):
        self.spec = spec.check()
        if save_errors is not None and out is None:
            raise DiffclsError("--save-errors needs --out too (the CSV records which images are done)")
        if isinstance(inputs, (str, Path)):
            inputs = [inputs]
        # the files the run writes are never its inputs (e.g. evaluate's --plot inside the folder)
        own = [out, save_errors, *exclude]
        self.inputs = inputs if isinstance(inputs, Inputs) else collect_inputs(list(inputs), spec.list_file, exclude=own)
        if spec.limit is not None or spec.sample is not None:  # --limit / --sample
            self.inputs = self.inputs.select(spec.limit, spec.sample, spec.seed)
        self.out, self.save_errors = (None if out is None else Path(out)), (None if save_errors is None else Path(save_errors))
        if isinstance(calibration, (str, Path)):
            from diffcls.runtime.evaluation.calibration import Calibration

            calibration = Calibration.load(Path(calibration))
        self.shard = parse_shard(shard) if isinstance(shard, str) else shard
        self.calibration = calibration
        self.temperature = None if calibration is None else calibration.temperature
        self.labels = None if labels is None else LabelKind(labels)
        self.ray = RayOptions() if ray is True else (ray or None)
        self.notes: list[str] = []
        self.skipped: list[tuple[str, str]] = [*self.inputs.problems]
        self.results: dict[str, Outcome] = {}
        self.truth: dict[str, int] = {}  # key -> true classidx (with labels)
        self.executor = self.writer = None
        self.n_done, self.elapsed, self.n_unlabeled = 0, 0.0, 0
        self._open = False

    # --- setting up -------------------------------------------------------------------------
    def open(self) -> "ClassifyJob":
        """Cheap checks (prompts, schedule, noise, labels), then the executor, then the file."""
        if self._open:
            return self
        try:
            self._resolve()
            self._start_executor()
            self._resume()
        except BaseException:
            self.close()
            raise
        self._open = True
        return self

    def _resolve(self) -> None:
        s = self.spec
        raw = self.inputs.labels
        if self.labels is not None and not raw:
            raise DiffclsError(
                f"no labeled image in {self.describe_inputs()}; give folders with one subfolder "
                "of images per class, or --list a CSV with path and label columns"
            )
        names = sorted(set(raw.values())) if self.labels is not None else []
        self.defaults = resolve.model_defaults_of(s)
        self.prompts = resolve.resolve_prompts(s, self.defaults, names if self.labels == LabelKind.name else None)
        self.schedule = resolve.build_schedule(s, len(self.prompts), self.defaults)
        weights = getattr(self.calibration, "timestep_weights", None)
        if weights is None and s.adaptive and self.defaults.get("timestep_weights") and s.prompts is None and s.classes is None:
            # the model's own timestep weights (its diffcls.json, fitted on a calibration split for
            # its own prompts): what the model's --adaptive knob was measured with
            weights = self.defaults["timestep_weights"]
            self.notes.append("--adaptive uses the model's timestep weights (its diffcls.json); --calibration FILE replaces them")
        if weights is not None:  # a calibration's timestep weights, fixed before any image is seen
            self.schedule = dataclasses.replace(self.schedule, band_weights=tuple(weights))
        T = resolve.known_train_timesteps(s)
        if T is not None:
            self.schedule.validate(len(self.prompts), T)
        self.noise = resolve.load_noise(s.noise)
        if s.precision == Precision.bf16 and resolve.runs_on_cpu(s):  # as --precision's help says (the library allows it)
            raise DiffclsError("--precision bf16 runs on a GPU only (torch backend); use --precision fp32 on a CPU")
        self.image_size = s.image_size or self.defaults.get("image_size")
        if self.labels is not None:
            what = "labels" if s.list_file is not None else "subfolders"
            truth_of = label_ids(names, self.labels, self.prompts, self.describe_inputs(), what)
            self.truth = {k: truth_of[v] for k, v in raw.items()}
            self.n_unlabeled = unlabeled = len(self.inputs) - len(raw)
            if unlabeled:
                self.notes.append(f"{unlabeled} image(s) have no label (not in a class subfolder); they are classified but not scored")

    def _start_executor(self) -> None:
        if self.ray is None:
            clf = resolve.open_classifier(self.spec, self.image_size)
            self.schedule.validate(len(self.prompts), clf.engines.num_train_timesteps)  # a no-op when T was known
            self.executor = LocalExecutor(clf, self)
            return
        from diffcls.runtime.execution.distributed import RayRunner, WorkerSpec

        s = self.spec
        spec = WorkerSpec(
            classifier=resolve.classifier_kwargs(s, self.image_size, absolute=True), prompts=self.prompts, schedule=self.schedule,
            seed=s.seed, noise=self.noise, batch_size=s.batch_size, interpolation=s.interpolation.value, decode_workers=s.workers,
        )
        runner = RayRunner(spec, address=self.ray.address, workers=self.ray.workers, gpus_per_worker=self.ray.gpus_per_worker)
        runner.start()
        self.executor = runner
        self.notes.append(f"Ray: {runner.workers} workers x {runner.gpus_per_worker:g} GPUs, engines on {runner.info['device']} ({runner.info['backend']})")

    @property
    def classifier(self):
        """The Classifier of a local run (None on Ray: the workers hold theirs)."""
        return getattr(self.executor, "clf", None)

    def settings(self) -> dict:
        """What the results file is bound to: a rerun resumes it only with the same values."""
        e, s = self.executor.info, self.spec
        settings = {
            "model": e["fingerprint"],
            "engines": e.get("engines_digest"),  # every file of an engine directory that shapes the scores
            "backend": e["backend"],
            "precision": e["precision"],
            "prompts": self.prompts.digest(),
            "schedule": self.schedule.to_dict(),
            "seed": s.seed if self.noise is None else None,
            "noise": None if self.noise is None else hashlib.sha256(self.noise.contiguous().numpy().tobytes()).hexdigest()[:16],
            "image_size": e["image_size"],
            "interpolation": s.interpolation.value,
            # rows are keyed by the path under the root: another root's "a.png" is another image
            "root": os.fsdecode(os.path.abspath(self.inputs.root)),
        }
        if self.shard is not None:  # a shard's file is resumed only by the same shard; `merge` drops it
            settings["shard"] = f"{self.shard[0]}/{self.shard[1]}"
            settings["inputs"] = self.inputs.spec()  # `merge` checks coverage against the run's own inputs
        if self.calibration is not None:  # the probability columns depend on it: no mixing on resume
            self.calibration.check(model=settings["model"], prompts=settings["prompts"], schedule=settings["schedule"])
            settings["temperature"] = self.temperature
        return settings

    def _resume(self) -> None:
        images, keys = self.inputs.images, self.inputs.keys
        if self.shard is not None:
            images = [p for p in images if shard_of(keys[p], self.shard[1]) == self.shard[0]]
        self.images, self.keys = images, {p: keys[p] for p in images}
        by_key = {k: p for p, k in self.keys.items()}
        done: dict[str, dict] = {}
        settings = self.settings()  # checks a calibration against the run, also without a file
        if self.out is not None:
            extra = LABEL_COLUMNS if self.labels is not None else ()
            self.writer = ResultsWriter(self.out, settings, self.save_errors, extra_columns=extra, temperature=self.temperature)

            def unchanged(key: str, sha: str) -> bool:  # a row stands only for the bytes it was computed from
                p = by_key.get(key)
                if p is None:
                    return True  # not part of this run: left as it is
                try:
                    return file_digest(p) == sha
                except OSError:
                    return False  # unreadable now: the run will report it

            done = self.writer.open(current=unchanged)
            for why, n in self.writer.dropped.items():
                self.notes.append(f"{self.out}: {_DROPPED.get(why, why).format(n=n, errors=self.save_errors)}")
        self.todo = [p for p in images if self.keys[p] not in done]
        class_ids = {name: idx for idx, name in self.prompts.classes.items()}
        self.results = {k: Outcome.from_row(r, class_ids) for k, r in done.items() if k in by_key}
        if self.results:
            self.notes.append(f"resuming {self.out}: {len(self.results)} of {len(images)} images already done")

    # --- running ----------------------------------------------------------------------------
    def iter_run(self, on_skip: Callable[[str, str], None] | None = None) -> Iterator[tuple[str, Outcome]]:
        """Score the images not yet done; yield (key, Outcome) as each finishes (with a results
        file: once its row is on disk; rows are written by a thread, so the scoring loop never
        waits for the disk). `on_skip(path, message)` hears of files that are not images."""
        self.open()

        def skip(path, msg):
            self.skipped.append((path, msg))
            if on_skip is not None:
                on_skip(path, msg)

        by_abs = {os.path.abspath(p): p for p in self.todo}
        start = time.perf_counter()
        background = BackgroundWriter(self.writer) if self.writer is not None else None
        pending: dict[str, Outcome] = {}

        def finished(keys):
            for key in keys:
                self.results[key] = outcome = pending.pop(key)
                self.n_done += 1
                self.elapsed = time.perf_counter() - start
                yield key, outcome

        ok = False
        try:
            for r in self.executor.iter_classify(list(by_abs), on_skip=skip):
                key = self.keys[by_abs[os.path.abspath(r.source)]]
                pending[key] = Outcome.of(r)
                if background is None:
                    yield from finished([key])
                else:
                    background.submit(key, r, self._label_cells(key, r))
                    yield from finished(background.acknowledged())
            if background is not None:
                yield from finished(background.close())
            ok = True
        finally:
            self.elapsed = time.perf_counter() - start
            if background is not None and not ok:
                try:  # whatever stopped the run, the rows already scored are kept
                    background.close()
                except Exception:  # noqa: BLE001 - the error in flight is the one to report
                    pass
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    __iter__ = iter_run

    def run(self, on_skip: Callable[[str, str], None] | None = None) -> dict[str, Outcome]:
        """Run to the end; every image's outcome (resumed ones too), by key."""
        for _ in self.iter_run(on_skip):
            pass
        return self.results

    def _label_cells(self, key: str, r) -> tuple[str, ...]:
        if self.labels is None or key not in self.truth:
            return ()
        t = self.truth[key]
        return self.prompts.classes[t], "1" if t == r.prediction else "0"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.executor is not None:
            self.executor.close()
        self._open = False

    def __enter__(self) -> "ClassifyJob":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reporting --------------------------------------------------------------------------
    def describe_inputs(self) -> str:
        """The inputs as the user named them, for messages."""
        return ", ".join(self.inputs.named) or str(self.inputs.root)

    def predictions_line(self) -> str:
        """'10 images: 3 eight, 2 one, ...' (the most frequent prediction first) and what was skipped."""
        counts: dict[str, int] = {}
        for r in self.results.values():
            counts[r.prediction] = counts.get(r.prediction, 0) + 1
        parts = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        n = len(self.results)
        return f"{n} image{'s' if n != 1 else ''}: {parts}" + (f"; {len(self.skipped)} skipped" if self.skipped else "")

    def summary(self) -> list[str]:
        """What the run did, in a line or two (images/s, UNet evaluations, per-stage speed)."""
        n, elapsed, skipped = self.n_done, max(self.elapsed, 1e-9), self.skipped
        tail = f"; {len(skipped)} skipped" if skipped else ""
        if not n:
            return [f"no image could be classified; {len(skipped)} skipped"] if skipped else []
        if self.classifier is None:  # Ray
            runner = self.executor
            return [f"classified {n} images in {elapsed:.1f} s ({n / elapsed:.2f} img/s) on {len(runner.worker_stats)} Ray workers{tail}",
                    "per worker: " + runner.summary()]
        clf = self.classifier
        stats = clf.last_stats
        evals = stats.unet_evals if stats else 0
        return [
            f"classified {n} images in {elapsed:.1f} s ({rate(n, elapsed, 'img')}, {evals / n:.0f} UNet evals/image, "
            f"{rate(evals, elapsed, 'UNet evals', 'UNet eval', digits=0)}, padding {100 * (stats.padding_fraction if stats else 0):.1f}%){tail}",
            "speed: " + clf.timer.per_item_speed(n),
        ]

    def to_json(self, k: int = TOP_K):
        """The results as plain JSON data (classify --json), each with its best k classes: one
        image named alone, its record; else a list by key."""
        recs = [self.results[key].to_json(key, self.temperature, k) for key in sorted(self.results)]
        return recs[0] if len(self.inputs) == 1 else recs

    def table(self, k: int = TOP_K):
        """The results as a rich Table (`rich.print(job)` prints it): one image named alone, its best
        k classes (`Outcome.table`); else one row per image, its prediction and runner-up, with the
        mean errors that decided them and, calibrated, their probabilities."""
        from rich.markup import escape

        from diffcls.render import table

        if len(self.inputs) == 1 and self.results:
            return next(iter(self.results.values())).table(next(iter(self.results)), self.temperature, k)
        t = self.temperature
        cols = ["image", "prediction", "mean error"] + (["probability"] if t is not None else []) + ["runner-up"]
        rows = []
        for key in sorted(self.results):
            r = self.results[key]
            ranked = r.ranked or []
            probs = probabilities(ranked, t) if t is not None and ranked else None
            cells = [escape(printable(key)), escape(r.prediction), f"{ranked[0].mean_error:.4g}" if ranked else ""]
            cells += [f"{probs[0]:.3f}" if probs else ""] if t is not None else []
            rows.append(cells + [escape(ranked[1].describe(probs[1] if probs else None)) if len(ranked) > 1 else ""])
        return table(cols, rows, left=cols, wrap=cols,
                     caption="mean error: lower is better; a class pruned before the final decision shows its mean over its own fewer samples")

    __rich__ = table

    def record(self) -> dict:
        """What ran, as plain values (evaluate --json's "settings"): the inputs, the spec, and
        what the engines resolved to, whichever executor ran them."""
        e = self.executor.info
        return {
            "inputs": [a for a in self.inputs.named if not a.startswith("--list ")],
            "labels": None if self.labels is None else self.labels.value,
            **self.spec.to_dict(),
            "resolved": {
                "backend": e["backend"],
                "device": e["device"],
                "precision": e["precision"],
                "image_size": e["image_size"],
                "model_fingerprint": e["fingerprint"],
                "schedule": self.schedule.describe(),
                "schedule_settings": self.schedule.to_dict(),
                "n_prompts": len(self.prompts),
                "threads": e.get("threads"),
                "executor": "local" if self.classifier is not None else "ray",
            },
        }
