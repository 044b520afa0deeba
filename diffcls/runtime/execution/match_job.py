"""`MatchJob`: one resumable image-text matching run (`diffcls match`), for the CLI and the Python API.

    job = MatchJob(JobSpec(model="demo-shapes"), "quadruples.csv", out="match.csv").open()
    for result in job.iter_run():         # ItemResult per item, as items finish
        ...
    summarize(list(job.results.values()))  # runtime.evaluation.match

The job reads the items, checks that the model conditions on text, opens the classifier, builds
the schedule for its timesteps (the whole grid, or one sequential test per comparison with
`adaptive`), binds the results file to the run's settings (as plain values) and resumes it, and
writes one row per finished item. The CLI turns options into the job and prints.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from diffcls.errors import DiffclsError
from diffcls.runtime.evaluation.match import ItemResult, MatchResultsWriter, MatchSchedule, adaptive_for_match, iter_match, read_items
from diffcls.runtime.execution.resolve import load_noise, model_defaults_of, open_classifier
from diffcls.runtime.execution.spec import JobSpec
from diffcls.runtime.execution.timing import rate


class MatchJob:
    """Items of `items_file` (the first `limit`) scored with `spec`'s model on the grid of
    `t_interval`; `adaptive`: the sequential test's settings (error_rate, min_samples,
    max_samples; {} for its defaults), None for the whole grid. `out`: the results CSV (resumed
    when it exists); `save_errors`: the JSONL of every error. `notes` collects what a user should
    be told (dropped rows, resumption); `skipped` the items that could not be read."""

    # the JobSpec fields a match does not read: class prompts, image lists, the fixed rounds, and
    # classify's adaptive settings (a match has its own: one two-sided test per comparison, up to
    # the whole grid, no final stage; `adaptive`)
    UNUSED = ("prompts", "classes", "template", "list_file", "limit", "sample", "n_samples", "to_keep", "adaptive", "error_rate",
              "min_samples", "max_samples", "rule", "rel_delta", "final_samples", "final_keep", "final_error_rate", "alpha", "look_every")

    def __init__(self, spec: JobSpec, items_file: str | Path, *, t_interval: int = 5, adaptive: dict | None = None,
                 limit: int | None = None, out=None, save_errors=None):
        if save_errors is not None and out is None:
            raise DiffclsError("--save-errors needs --out too (the CSV records which items are done)")
        self.spec, self.items_file, self.t_interval, self.adaptive = spec, Path(items_file), t_interval, adaptive
        self.out, self.save_errors = (None if out is None else Path(out)), (None if save_errors is None else Path(save_errors))
        self.items = read_items(self.items_file)[:limit]
        self.results: dict[str, ItemResult] = {}
        self.notes: list[str] = []
        self.skipped: list[tuple[str, str]] = []
        self.todo: list = []
        self.writer = self.classifier = self.schedule = self.noise = None
        self.elapsed = 0.0

    def open(self) -> "MatchJob":
        """Open the model, build the schedule, resume the results file."""
        s = self.spec
        defaults = model_defaults_of(s)
        if defaults.get("labels"):
            raise DiffclsError("match needs a text-conditioned model (captions); a class-conditional model (DiT) has no text encoder")
        self.classifier = clf = open_classifier(s, s.image_size or defaults.get("image_size"))
        T = clf.engines.num_train_timesteps
        grid = len(range(self.t_interval // 2, T, self.t_interval))
        adaptive = None if self.adaptive is None else adaptive_for_match(grid, **self.adaptive, n_trials=s.n_trials, loss=s.loss.value)
        self.schedule = MatchSchedule(t_interval=self.t_interval, n_trials=s.n_trials, loss=s.loss.value, num_train_timesteps=T,
                                      adaptive=adaptive).validate(1, T)
        self.noise = load_noise(s.noise)
        if self.out is not None:
            self._resume()
        self.todo = [it for it in self.items if it.key not in self.results]
        return self

    def _settings(self) -> dict:
        """What binds the results file to this run, as plain values."""
        e, noise = self.classifier.engines, self.noise
        return {"model": e.fingerprint, "backend": e.backend, "precision": e.precision, "schedule": self.schedule.to_dict(),
                "seed": self.spec.seed if noise is None else None,
                "noise": None if noise is None else hashlib.sha256(noise.contiguous().numpy().tobytes()).hexdigest()[:16],
                "image_size": e.image_size, "interpolation": self.spec.interpolation.value,
                "items": os.fsdecode(os.path.abspath(self.items_file))}

    def _resume(self) -> None:
        by_key = {it.key: it for it in self.items}
        self.writer = MatchResultsWriter(self.out, self._settings(), errors_path=self.save_errors)
        done = self.writer.open(current=lambda key, sha: key not in by_key or by_key[key].sha256 == sha)
        self.results = {k: ItemResult.from_row(r) for k, r in done.items() if k in by_key}
        self.notes += [f"{self.out}: {n} {why} row(s) dropped; those items are scored again" for why, n in self.writer.dropped.items()]
        if self.results:
            self.notes.append(f"resuming {self.out}: {len(self.results)} of {len(self.items)} items already done")

    def iter_run(self, on_skip=None):
        """Score the items left, yielding each ItemResult as it finishes (and writing its row)."""
        s, start = self.spec, time.perf_counter()

        def skip(item, msg):
            self.skipped.append((item.key, msg))
            if on_skip is not None:
                on_skip(item, msg)

        try:
            for r in iter_match(self.classifier, self.todo, self.schedule, seed=s.seed, noise=self.noise, batch_size=s.batch_size,
                                interpolation=s.interpolation.value, workers=s.workers, on_skip=skip):
                if self.writer is not None:
                    self.writer.write_item(r)
                self.results[r.key] = r
                yield r
        finally:
            self.elapsed = time.perf_counter() - start
            if self.writer is not None:
                self.writer.close()

    def done(self) -> list[ItemResult]:
        """The results of the items, in the items' order."""
        return [self.results[it.key] for it in self.items if it.key in self.results]

    def summary(self) -> list[str]:
        """What the run scored, in a line (none when it scored nothing)."""
        n = len(self.todo) - len(self.skipped)
        if not self.todo or not n:
            return []
        evals = sum(self.results[it.key].n_evals for it in self.todo if it.key in self.results)
        elapsed = max(self.elapsed, 1e-9)
        return [f"scored {n} items in {elapsed:.1f} s ({rate(n, elapsed, 'items', 'item')}, {evals / n:.0f} UNet evals/item)"]

    def report(self, summary: dict, agreement: dict | None = None, **settings) -> dict:
        """match --json: the summary, the schedule, the items counted, the settings (`record`
        less UNUSED, and `settings`), the agreement with a reference run."""
        report = {**summary, "schedule": self.schedule.describe(), "n_items": len(self.items), "n_skipped": len(self.skipped),
                  "settings": {**self.record(self.UNUSED), **settings}}
        return report if agreement is None else {**report, "agreement": agreement}

    def record(self, excluded=()) -> dict:
        """What ran, as plain values (match --json's "settings"): the items, the grid, the spec
        (less `excluded` fields) and what the engines resolved to."""
        from dataclasses import asdict
        from enum import Enum

        def plain(v):
            return v.value if isinstance(v, Enum) else (str(v) if isinstance(v, Path) else v)

        e = self.classifier.engines
        return {
            "items": str(self.items_file), "t_interval": self.t_interval,
            **{k: plain(v) for k, v in asdict(self.spec).items() if k not in excluded},
            "resolved": {"backend": e.backend, "device": str(e.device), "precision": e.precision, "image_size": e.image_size,
                         "model_fingerprint": e.fingerprint},
        }
