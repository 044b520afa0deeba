"""One folder across many GPUs and machines with Ray Data (shards by hand: `runtime.results.shards`).

Ray (`diffcls classify FOLDER --ray`): a Ray Data dataset of image *paths* (not pixels) goes
through `map_batches` with `ScoreWorker`, a callable class whose constructor opens the engines
once per worker; results stream back to the driver, which writes them through the same results
writer as a single process. A task is a batch of many images that the worker scores with one
`Scorer`, so its UNet batches mix images as in one process (what `--adaptive` needs to keep its
batches full); there are several tasks per worker, so Ray balances uneven images. Ray restarts a
killed worker and retries its unfinished tasks; the driver drops a result it already has and, after the stream ends, dispatches again
any image no result came back for, so nothing is lost or written twice.

Scores do not depend on how images are split: the noise bank depends only on the seed, and an
image's errors only on its latent, the prompts and the bank.

Everything a worker needs travels as a `WorkerSpec` of plain values (paths, strings, numbers,
the prompts' and the schedule's `to_dict`, the noise tensor): the worker builds its own
`Classifier` from it (a checkpoint's `--config` travels as a path, not as a loaded model).
Ray is an optional dependency (the `ray` extra), imported inside the functions
that use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from diffcls.errors import DiffclsError, missing_extra
from diffcls.runtime.execution.classifier import Classifier, ImageResult
from diffcls.runtime.data.prompts import PromptSet
from diffcls.runtime.algorithm.schedule import schedule_from_dict


# --- what a worker is given -----------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to open a `Classifier` and score images, as plain values (a
    PromptSet or schedule given here is stored as its `to_dict`)."""

    classifier: dict  # keyword arguments of Classifier.from_pretrained (paths as strings, numbers)
    prompts: dict  # PromptSet.to_dict()
    schedule: dict  # Schedule/AdaptiveSchedule.to_dict()
    seed: int = 0
    noise: Any = None  # torch.Tensor | None: an explicit noise bank instead of the seed's
    batch_size: int = 32  # UNet batch size
    interpolation: str = "bicubic"
    decode_workers: int = 2  # threads that decode images inside each worker

    def __post_init__(self):
        for name in ("prompts", "schedule"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                object.__setattr__(self, name, value.to_dict())

    def prompt_set(self) -> PromptSet:
        return PromptSet.from_dict(self.prompts)

    def schedule_object(self):
        return schedule_from_dict(self.schedule)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _cause(e: BaseException) -> str:
    msg = str(e) if isinstance(e, DiffclsError) else f"{type(e).__name__}: {e}"
    return " ".join(msg.split())


def open_worker_classifier(spec: WorkerSpec) -> Classifier:
    """The worker's Classifier; a DiffclsError that says why it cannot be opened or used."""
    try:
        clf = Classifier.from_pretrained(**spec.classifier)
    except Exception as e:  # noqa: BLE001 - missing extra, wrong GPU, unreadable model: one line
        raise DiffclsError(f"cannot open the engines: {_cause(e)}") from e
    spec.schedule_object().validate(len(spec.prompts["prompts"]), clf.engines.num_train_timesteps)
    return clf


def result_to_json(r: ImageResult) -> str:
    """An ImageResult as JSON (every public field; floats round-trip exactly)."""
    d = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if not f.name.startswith("_")}
    d["scores"] = {str(k): v for k, v in d["scores"].items()}
    return json.dumps(d)


def result_from_json(text: str, prompts: PromptSet) -> ImageResult:
    d = json.loads(text)
    d["scores"] = {int(k): v for k, v in d["scores"].items()}
    d["errors"] = [tuple(e) for e in d["errors"]]
    return ImageResult(**d, _prompts=prompts)


class ScoreWorker:
    """Ray Data callable class: opens the engines once, then scores batches of image paths.

    Input batch: {"i": indices, "path": file paths as bytes}. Output: one row per input image,
    {"i", "worker", "kind", "payload", "seconds"} with kind "result" (payload: the result as
    JSON), "skip" (payload: why the file is not an image) or "fatal" (payload: why this worker
    cannot score at all: the driver stops the run with that line).
    """

    def __init__(self, spec: WorkerSpec):
        self.name = worker_name()
        self.spec = spec
        self.prompts, self.schedule = spec.prompt_set(), spec.schedule_object()
        self.error: str | None = None
        try:
            self.clf = open_worker_classifier(spec)
            self.clf.encode_prompts(self.prompts)  # once per worker: the classifier keeps them
        except Exception as e:  # noqa: BLE001 - reported to the driver as one line
            self.clf = None
            self.error = _cause(e)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        idx = [int(i) for i in batch["i"]]
        paths = [os.fsdecode(bytes(p)) for p in batch["path"]]
        start = time.perf_counter()
        kinds, payloads = {}, {}
        if self.error is not None:
            kinds = {i: "fatal" for i in idx}
            payloads = {i: self.error for i in idx}
        else:
            s = self.spec

            def on_skip(path, msg):
                i = idx[paths.index(path)]
                kinds[i], payloads[i] = "skip", msg

            try:
                for r in self.clf.iter_classify(  # every image of the task shares one Scorer's batches
                    paths,
                    self.prompts,
                    self.schedule,
                    seed=s.seed,
                    noise=s.noise,
                    batch_size=s.batch_size,
                    interpolation=s.interpolation,
                    workers=s.decode_workers,
                    on_skip=on_skip,
                ):
                    i = idx[r.index]
                    kinds[i], payloads[i] = "result", result_to_json(r)
            except Exception as e:  # noqa: BLE001 - a broken engine stops the run, in one line
                kinds = {i: "fatal" for i in idx}
                payloads = {i: f"failed while scoring {paths[0]}: {_cause(e)}" for i in idx}
        per_image = (time.perf_counter() - start) / max(1, len(idx))
        return {
            "i": np.array(idx, dtype=np.int64),
            "worker": np.array([self.name] * len(idx), dtype=object),
            "kind": np.array([kinds.get(i, "lost") for i in idx], dtype=object),
            "payload": np.array([payloads.get(i, "") for i in idx], dtype=object),
            "seconds": np.array([per_image] * len(idx), dtype=np.float64),
        }


def _probe(spec: WorkerSpec) -> dict:
    """Runs on one worker before any image is dispatched: open the engines, describe them."""
    name = worker_name()
    try:
        clf = open_worker_classifier(spec)
    except Exception as e:  # noqa: BLE001
        return {"worker": name, "error": _cause(e)}
    return {"worker": name, **clf.engine_info()}


# --- the driver -----------------------------------------------------------------------------
def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise missing_extra("ray[data]", "ray") from None
    return ray


@dataclass
class WorkerStats:
    images: int = 0
    busy_s: float = 0.0


@dataclass
class RayRunner:
    """Scores image paths on a Ray cluster with `workers` ScoreWorker actors.

        with RayRunner(spec, workers=2) as runner:     # joins or starts a cluster, probes a worker
            for result in runner.iter_classify(paths, on_skip=...):
                ...

    A cluster that is already initialized in this process (`ray.init` called before) is used
    as it is and left running; one this runner started is shut down on close.
    """

    spec: WorkerSpec
    address: str | None = None  # None: the running cluster (ray.init already called) or a local one
    workers: int | None = None  # None: one per GPU (with gpus_per_worker > 0), else 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_worker: float | None = None  # None: 1 with GPUs, else the cluster's CPUs / workers (torch threads)
    # images per map_batches call; None: enough for full cross-image UNet batches in each worker's
    # one Scorer (up to 64), while giving every worker several tasks to balance uneven images
    images_per_task: int | None = None
    max_passes: int = 3  # dispatch rounds for images no result came back for
    info: dict = field(default_factory=dict)  # engine_info from the probe, and "worker"
    worker_stats: dict[str, WorkerStats] = field(default_factory=dict)
    _owns: bool = False

    def __enter__(self) -> "RayRunner":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> dict:
        ray = import_ray()
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, include_dashboard=False, logging_level="warning", log_to_driver=False)
            except ConnectionError as e:
                raise DiffclsError(f"--ray-address {self.address}: cannot connect to a Ray cluster ({_cause(e)}); start one with `ray start --head` or drop --ray-address") from None
            self._owns = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver draws its own bar
        try:
            ctx.print_on_execution_start = False
        except AttributeError:  # pragma: no cover - older Ray
            pass
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if self.gpus_per_worker is None:
            self.gpus_per_worker = 1.0 if gpus > 0 else 0.0
        if self.gpus_per_worker > gpus:
            raise DiffclsError(
                f"--gpus-per-worker {self.gpus_per_worker:g}: the Ray cluster has {gpus:g} GPUs; "
                "lower it (0 runs on CPUs)"
            )
        if self.workers is None:
            self.workers = max(1, int(gpus // self.gpus_per_worker)) if self.gpus_per_worker > 0 else 1
        if self.cpus_per_worker is None:  # GPU workers: 1 CPU each; CPU workers share the CPUs evenly
            cpus = float(ray.cluster_resources().get("CPU", 1))
            self.cpus_per_worker = 1.0 if self.gpus_per_worker > 0 else max(1.0, float(int(cpus // self.workers)))
        probe = ray.remote(_probe).options(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker)
        info = ray.get(probe.remote(self.spec))
        if "error" in info:
            raise DiffclsError(f"Ray worker {info['worker']}: {info['error']}")
        self.info = info
        self._prompts = self.spec.prompt_set()
        return info

    def close(self) -> None:
        if self._owns:
            import ray

            ray.shutdown()
            self._owns = False

    def iter_classify(self, paths: list[str], on_skip: Callable[[str, str], None] | None = None) -> Iterator[ImageResult]:
        """Yield one ImageResult per good image (in the order they finish), each exactly once."""
        seen: set[int] = set()
        todo = list(range(len(paths)))
        for _ in range(self.max_passes):
            if not todo:
                return
            for kind, i, payload in self._dispatch(paths, todo):
                if i in seen:
                    continue  # a retried task's second answer
                seen.add(i)
                if kind == "result":
                    r = result_from_json(payload, self._prompts)
                    r.index, r.source = i, paths[i]
                    yield r
                elif on_skip is None:
                    raise DiffclsError(payload)
                else:
                    on_skip(paths[i], payload)
            todo = [i for i in todo if i not in seen]
        if todo:
            raise DiffclsError(
                f"{len(todo)} images got no result after {self.max_passes} dispatch rounds (e.g. {paths[todo[0]]}); "
                "rerun the same command to resume"
            )

    def _dispatch(self, paths: list[str], todo: list[int]) -> Iterator[tuple[str, int, str]]:
        ray = import_ray()
        ds = ray.data.from_items([{"i": i, "path": os.fsencode(paths[i])} for i in todo])
        ds = ds.map_batches(
            ScoreWorker,
            fn_constructor_kwargs={"spec": self.spec},
            batch_size=self._per_task(len(todo)),
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker or None,
        )
        rows = ds.iter_rows()
        it = iter(rows)
        try:
            for row in it:
                kind, i, worker = row["kind"], int(row["i"]), row["worker"]
                if kind == "fatal":
                    raise DiffclsError(f"Ray worker {worker}: {row['payload']}")
                if kind == "lost":
                    continue  # dispatched again in the next pass
                st = self.worker_stats.setdefault(worker, WorkerStats())
                st.images += 1
                st.busy_s += float(row["seconds"])
                yield kind, i, row["payload"]
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    def _per_task(self, n: int) -> int:
        if self.images_per_task is not None:
            return self.images_per_task
        return max(1, min(64, -(-n // (4 * self.workers))))

    def summary(self) -> str:
        """'host:123 5 images 1.2 img/s, host:456 ...' (images/s over each worker's busy time)."""
        parts = []
        for name, st in sorted(self.worker_stats.items()):
            rate = st.images / st.busy_s if st.busy_s > 0 else 0.0
            parts.append(f"{name} {st.images} images {rate:.2f} img/s")
        return ", ".join(parts)
