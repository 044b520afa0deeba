"""`Classifier`: the Python API behind `diffcls classify`.

    clf = Classifier.from_pretrained()                      # bundled demo model, torch backend
    results = clf.classify(["a.png", "b.png"], PromptSet.from_csv("prompts.csv"),
                           Schedule(n_samples=(50, 500), to_keep=(5, 1)))
    results[0].classname, results[0].top_classes(5)

Stages: prompts -> text embeddings (cached); images -> decode/preprocess on worker threads ->
latents (cached, VAE in batches) -> the interleaved scoring loop (`scoring.Scorer`).
"""

from __future__ import annotations

import dataclasses
import io
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from PIL import Image

from diffcls.errors import DiffclsError
from diffcls.runtime.data.cache import DiskCache
from diffcls.runtime.evaluation.calibration import UNCALIBRATED, Calibration
from diffcls.runtime.data.preprocess import (
    BadImage,
    Interpolation,
    image_to_tensor,
    open_image,
    resize_center_crop,
    to_rgb,
)
from diffcls.runtime.data.prompts import PromptSet
from diffcls.runtime.algorithm.ranking import TOP_K, RankedClass, probabilities, rank_classes
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule
from diffcls.runtime.algorithm.scoring import ImageScore, NonFiniteError, Scorer, make_noise_bank
from diffcls.runtime.execution.spec import JobSpec, build_schedule, resolve_prompts
from diffcls.runtime.execution.timing import StageTimer


@dataclass
class ImageResult:
    index: int  # position in the input sequence
    source: str  # the path, or "<image N>" for in-memory images
    prediction: int  # predicted classidx
    classname: str
    prompt: int  # index of the winning prompt
    scores: dict[int, float]  # prompt index -> mean error over its own samples
    errors: list[tuple[int, int, int, float]]  # (prompt, t, trial, error)
    ranking: list[int]  # prompt indices, best first
    n_evals: int
    _prompts: PromptSet | None = None
    sha256: str | None = None  # of the file's bytes (in-memory images: of the preprocessed pixels)
    final: list[int] = field(default_factory=list)  # prompts of the final decision (runtime.algorithm.ranking)
    temperature: float | None = None  # from a calibration file: `probabilities()` uses it

    def ranked(self, k: int = TOP_K) -> list[RankedClass]:
        """The best k classes, the prediction first, each with the mean error that decided its
        place and, if it was pruned before the final decision, when (runtime.algorithm.ranking)."""
        return self._ranked(k)[0]

    def _ranked(self, k: int) -> tuple[list[RankedClass], int]:
        p = self._prompts
        return rank_classes(self.errors, self.ranking, self.final, p.classidx, p.classnames, k)

    def top_classes(self, k: int = TOP_K) -> list[tuple[int, str, float]]:
        """(classidx, classname, mean error) of the best k classes, as `ranked`."""
        return [(r.classidx, r.classname, r.mean_error) for r in self.ranked(k)]

    def probabilities(self, temperature: float | None = None, k: int = TOP_K) -> list[tuple[int, str, float]]:
        """(classidx, classname, probability) of the best k classes: a softmax of the final
        decision's mean errors at `temperature` (default: the result's own, from a calibration
        file; else 1, nearly uniform), 0 for classes pruned before it. k is at most 5."""
        t = temperature if temperature is not None else (self.temperature if self.temperature is not None else UNCALIBRATED)
        rows = self.ranked(min(k, TOP_K))
        return [(r.classidx, r.classname, p) for r, p in zip(rows, probabilities(rows, t))]

    def to_json(self, temperature: float | None = None, k: int = TOP_K) -> dict:
        """The --save-errors record. `scores` lists every scored prompt with its class (mean
        error over its own samples); `top` the best k classes as `ranked` (with a temperature,
        their probabilities)."""
        rows, n_shared = self._ranked(k)
        top = [{"classidx": r.classidx, "classname": r.classname, "mean_error": r.mean_error, "pruned_after": r.pruned_after} for r in rows]
        if temperature is not None:
            for rec, p in zip(top, probabilities(rows, temperature)):
                rec["probability"] = p
        return {
            "path": self.source,
            "prediction": self.classname,
            "classidx": self.prediction,
            "scores": [
                {"prompt": p, "classidx": self._prompts.classidx[p], "classname": self._prompts.classnames[p], "mean_error": s}
                for p, s in sorted(self.scores.items())
            ],
            "n_shared": n_shared,
            "top": top,
            "temperature": temperature,
            "errors": [[p, t, j, e] for p, t, j, e in self.errors],
        }


@dataclass
class _Prepared:
    index: int
    source: str
    digest: str | None = None
    latent: torch.Tensor | None = None  # from the cache
    pixels: torch.Tensor | None = None  # (3, S, S) to encode
    error: BadImage | None = None


class Classifier:
    def __init__(self, engines, cache: DiskCache | None = None, timer: StageTimer | None = None, defaults: dict | None = None):
        self.engines = engines
        self.defaults = defaults or {}  # the model's diffcls.json (prompts, schedule, image size)
        self.cache = cache
        self.timer = timer or StageTimer(engines.device)
        self.last_stats = None  # ScoreStats of the last run
        # the last prompts' embeddings, keyed by the prompts and the cache they were looked up in
        # (a memo made with the cache off, as profile's warm-up runs, does not stand in for a cached run)
        self._text_memo: tuple[tuple, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(
        cls,
        model=None,
        *,
        config: str | Path | None = None,
        no_t5: bool = False,
        backend: str = "torch",
        engine_dir: str | Path | None = None,
        device: str | None = None,
        precision: str | None = None,
        image_size: int | None = None,
        batch_sizes: tuple[int, ...] | None = None,
        compile: bool = False,
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        threads: int | None = None,
    ) -> "Classifier":
        """Open engines for `model` (path, bundled name, SDModel, or None for the demo) with
        `backend`, carrying the model's own defaults (its `diffcls.json`: prompts, schedule,
        image size; `self.defaults`), as `diffcls classify` does; keywords override them.

        `config`: for a single-file checkpoint `model`, the diffusers directory (or cached id)
        whose configs describe it. `no_t5`: an SD3 model without its T5 encoder (zeros in its
        place; `models.sd3`), refused for other models and with `engine_dir`. `threads`: CPU threads for torch (`torch.set_num_threads`,
        process-wide) and for ONNX Runtime's intra-op pool; None keeps torch's setting and gives
        ONNX Runtime the same count.

        An `SDModel` passed in is taken over by the torch engines: moved to the device and
        precision in place (and QKV-fused when compiled on CUDA), not copied.
        """
        from diffcls.engines import open_engines
        from diffcls.models.loading import load_model, model_defaults
        from diffcls.models.sd3 import SD3Model, without_t5

        if isinstance(model, (str, Path)) or model is None or engine_dir is not None:
            defaults = model_defaults(engine_dir, None) if engine_dir is not None else model_defaults(model, config)
        else:
            defaults = {}  # a model object: no diffcls.json travels with it
        if threads is not None:
            torch.set_num_threads(int(threads))
        timer = StageTimer()
        with timer.stage("load"):
            if no_t5 and engine_dir is not None:
                raise DiffclsError("no_t5 chooses how an SD3 model loads, and an engine directory was exported with or without T5; drop one")
            if no_t5 and isinstance(model, SD3Model):
                model = without_t5(model)
            elif (config is not None or no_t5) and engine_dir is None:
                model = load_model(model, config=config, no_t5=no_t5)
            engines = open_engines(
                backend,
                model=model,
                engine_dir=engine_dir,
                device=device,
                precision=precision,
                image_size=image_size or defaults.get("image_size"),
                batch_sizes=batch_sizes,
                compile=compile,
                threads=torch.get_num_threads() if threads is None else int(threads),
                config=config,  # a single file checked against engines loads with its configs
            )
        timer.device = engines.device
        cache = DiskCache(cache_dir) if use_cache else None
        return cls(engines, cache=cache, timer=timer, defaults=defaults)

    def default_prompts(self) -> PromptSet:
        """The model's prompts (its prompts file, or a class-conditional model's labels)."""
        return resolve_prompts(JobSpec(), self.defaults)

    def default_schedule(self, n_prompts: int) -> Schedule:
        """The model's schedule (the paper's where it names none), its first keep capped at the prompts."""
        return build_schedule(JobSpec(), n_prompts, self.defaults)

    def engine_info(self) -> dict:
        """What a run records about the engines (the results file binds to some of it)."""
        e = self.engines
        return {
            "fingerprint": e.fingerprint,
            "backend": e.backend,
            "precision": e.precision,
            "image_size": e.image_size,
            "num_train_timesteps": e.num_train_timesteps,
            "device": str(e.device),
            "threads": torch.get_num_threads(),
            "engines_digest": (e.info or {}).get("manifest_digest"),  # an engine directory's: results bind to it
        }

    # --- keys -------------------------------------------------------------------------------
    def _key_base(self) -> dict:
        e = self.engines
        return {"model": e.fingerprint, "backend": e.backend, "precision": e.precision}

    def _text_shape(self) -> tuple[int, ...]:
        return self.engines.text_encoder.spec.outputs[0].concrete(1)[1:]  # (L, D)

    # --- text -------------------------------------------------------------------------------
    def encode_prompts(self, prompts: PromptSet | list[str], batch_size: int = 64) -> torch.Tensor:
        """(P, L, D) float32 embeddings (the text encoder's last hidden state), cached per prompt;
        for a class-conditional model, (P,) int64 class ids (its prompt encoder passes them on)."""
        texts = list(prompts.prompts if isinstance(prompts, PromptSet) else prompts)
        memo_key = (tuple(texts), id(self.cache))
        if self._text_memo is not None and self._text_memo[0] == memo_key:
            return self._text_memo[1]  # a worker scoring one small batch after another
        found: dict[int, torch.Tensor] = {}
        if self.cache is not None:
            for i, text in enumerate(texts):
                hit = self.cache.get("text", {**self._key_base(), "prompt": text}, self._text_shape())
                if hit is not None:
                    found[i] = hit
        missing = [i for i in range(len(texts)) if i not in found]
        if missing:
            with self.timer.stage("text_encode"):
                ids = self.engines.tokenize([texts[i] for i in missing])
                encoder = self.engines.text_encoder
                emb = run_batched(encoder, encoder.spec.input_names[0], ids, batch_size).cpu()
                emb = emb.float() if emb.is_floating_point() else emb  # class ids stay int64
            for j, i in enumerate(missing):
                found[i] = emb[j].clone()
                if self.cache is not None:
                    self.cache.put("text", {**self._key_base(), "prompt": texts[i]}, found[i])
        emb = torch.stack([found[i] for i in range(len(texts))])
        self._text_memo = (memo_key, emb)
        return emb

    # --- images -----------------------------------------------------------------------------
    def _prepare(self, index: int, image, size: int, interpolation: Interpolation) -> _Prepared:
        """Runs on a worker thread: read bytes, look up the latent cache, else decode/preprocess."""
        import hashlib

        if isinstance(image, (str, Path)):
            path = Path(image)
            try:
                data = path.read_bytes()
            except OSError as e:
                return _Prepared(index, str(path), error=BadImage(f"{path}: cannot read file ({e.strerror or e})"))
            digest = hashlib.sha256(data).hexdigest()
            hit = self._latent_cache_get(digest, size, interpolation)
            if hit is not None:
                return _Prepared(index, str(path), digest, latent=hit)
            try:
                img = open_image(io.BytesIO(data), name=str(path))
                pixels = image_to_tensor(resize_center_crop(img, size, interpolation))
            except BadImage as e:
                msg = str(e)
                return _Prepared(index, str(path), digest, error=BadImage(msg if msg.startswith(f"{path}:") else f"{path}: {msg}"))
            except MemoryError:
                return _Prepared(index, str(path), digest, error=BadImage(f"{path}: not enough memory to decode and resize it; downscale it first"))
            return _Prepared(index, str(path), digest, pixels=pixels)
        if isinstance(image, Image.Image):
            pixels = image_to_tensor(resize_center_crop(to_rgb(image), size, interpolation))
        elif isinstance(image, torch.Tensor):
            if image.shape != (3, size, size):
                raise DiffclsError(f"image tensors must be preprocessed to (3, {size}, {size}), got {tuple(image.shape)}")
            pixels = image.float()
        else:
            raise DiffclsError(f"cannot classify an object of type {type(image).__name__}; pass paths, PIL images or tensors")
        digest = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
        hit = self._latent_cache_get(digest, size, interpolation)
        return _Prepared(index, f"<image {index}>", digest, latent=hit, pixels=None if hit is not None else pixels)

    def _latent_fields(self, digest: str, size: int, interpolation: Interpolation) -> dict:
        vae_dtype = str(self.engines.vae_encoder.dtype).removeprefix("torch.")  # fp32 when the VAE is upcast
        return {**self._key_base(), "vae_dtype": vae_dtype, "image": digest, "size": size, "interpolation": interpolation.value}

    def _latent_cache_get(self, digest, size, interpolation):
        if self.cache is None:
            return None
        return self.cache.get("latent", self._latent_fields(digest, size, interpolation), self.engines.latent_shape)

    def _prepared_stream(self, images: Iterable, size: int, interpolation: Interpolation, workers: int, window: int) -> Iterator[_Prepared]:
        """Decode on `workers` threads, `window` images ahead, yielding in input order."""
        items = iter(enumerate(images))
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="diffcls-decode") as pool:
            pending: deque = deque()

            def submit() -> bool:
                try:
                    i, img = next(items)
                except StopIteration:
                    return False
                pending.append(pool.submit(self._timed_prepare, i, img, size, interpolation))
                return True

            for _ in range(window):
                if not submit():
                    break
            while pending:
                prepared = pending.popleft().result()
                submit()
                yield prepared

    def _timed_prepare(self, *args) -> _Prepared:
        import time

        start = time.perf_counter()
        out = self._prepare(*args)
        with self._lock:
            self.timer.add("preprocess", time.perf_counter() - start)
        return out

    _lock = threading.Lock()

    def _latent_stream(self, prepared: Iterator[_Prepared], vae_batch: int, on_skip, sources: dict, digests: dict | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(index, x0) per good image; VAE encodes the cache misses `vae_batch` at a time."""
        size = self.engines.image_size
        chunk: list[_Prepared] = []

        def flush():
            todo = [p for p in chunk if p.latent is None]
            if todo:
                with self.timer.stage("vae_encode"):
                    lat = run_batched(self.engines.vae_encoder, "image", torch.stack([p.pixels for p in todo]), vae_batch)
                    lat = lat.float().cpu()
                for p, x0 in zip(todo, lat):
                    if not torch.isfinite(x0).all():
                        raise DiffclsError(self._non_finite_latent(p.source))
                    p.latent = x0.clone()
                    p.pixels = None
                    if self.cache is not None:
                        self.cache.put("latent", self._latent_fields(p.digest, size, self._interp), p.latent)
            out = [(p.index, p.latent) for p in chunk]
            chunk.clear()
            return out

        for p in prepared:
            sources[p.index] = p.source
            if digests is not None:
                digests[p.index] = p.digest
            if p.error is not None:
                if on_skip is None:
                    raise p.error
                on_skip(p.source, str(p.error))
                continue
            chunk.append(p)
            if len([c for c in chunk if c.latent is None]) >= vae_batch or len(chunk) >= 4 * vae_batch:
                yield from flush()
        if chunk:
            yield from flush()

    def _non_finite_latent(self, source: str) -> str:
        """One line: which image, and the likely cause given the VAE encoder's dtype."""
        dtype = self.engines.vae_encoder.dtype
        if dtype in (torch.float16, torch.bfloat16):
            fix = ("use --precision fp32, or set \"force_upcast\": true in the model's vae/config.json"
                   if self.engines.backend == "torch" else
                   "re-export the engines with --precision fp32, or with \"force_upcast\": true in the VAE config")
            cause = f"the VAE encoder runs in {str(dtype).removeprefix('torch.')} and likely overflowed; {fix}"
        else:
            cause = ("it runs in fp32, so the VAE weights, the engine or an input tensor hold NaN/inf; "
                     "check the model files or re-export the engines")
        return f"{source}: the VAE encoder produced NaN/inf latents (nothing was cached); {cause}"

    # --- scoring ----------------------------------------------------------------------------
    def iter_classify(
        self,
        images: Iterable,
        prompts: PromptSet | list[str] | None = None,
        schedule: Schedule | AdaptiveSchedule | None = None,
        *,
        seed: int = 0,
        noise: torch.Tensor | None = None,
        batch_size: int = 32,
        interpolation: Interpolation | str = Interpolation.bicubic,
        vae_batch_size: int = 8,
        workers: int = 2,
        on_skip: Callable[[str, str], None] | None = None,
        calibration: Calibration | str | Path | None = None,
    ) -> Iterator[ImageResult]:
        """Yield one `ImageResult` per good image, in the order images finish scoring.

        Bad image files are passed to `on_skip(path, message)` and skipped (raised if None).
        `prompts` and `schedule` default to the model's own (`default_prompts`, `default_schedule`).
        `calibration` (a file from `diffcls calibrate`, or a loaded `Calibration`, fitted on this
        model, prompts and schedule) gives the results its temperature: `r.probabilities()`.
        """
        if prompts is None:
            prompts = self.default_prompts()
        if isinstance(prompts, (list, tuple)):
            prompts = PromptSet(tuple(prompts), tuple(prompts), tuple(range(len(prompts))))
        if schedule is None:
            schedule = self.default_schedule(len(prompts))
        e = self.engines
        schedule.validate(len(prompts), e.num_train_timesteps)
        if calibration is not None and not isinstance(calibration, Calibration):
            calibration = Calibration.load(calibration)
        if calibration is not None:
            calibration.check(model=e.fingerprint, prompts=prompts.digest(), schedule=schedule.to_dict())
            if calibration.timestep_weights is not None:  # its timestep weights apply to this schedule
                schedule = dataclasses.replace(schedule, band_weights=tuple(calibration.timestep_weights))
        bank = self.noise_bank(schedule, seed, noise)
        self._interp = Interpolation(interpolation)
        emb = self.encode_prompts(prompts)
        sources: dict[int, str] = {}
        digests: dict[int, str | None] = {}
        # --adaptive: each image's rotation of the timestep grid comes from its file's sha256 (the
        # same on every device and in every run; in-memory images: their preprocessed pixels')
        scorer = Scorer(e.unet, emb, e.alphas_cumprod, schedule, bank, batch_size, prediction_type=e.prediction_type,
                        sigmas=e.sigmas, grid_offset=lambda key, x0: int(digests[key][:16], 16) if digests.get(key) else None)
        self.last_stats = scorer.stats
        window = max(4, 2 * vae_batch_size)
        prepared = self._prepared_stream(images, e.image_size, self._interp, workers, window)
        # latents are decoded, looked up, VAE-encoded and cached on a thread, ahead of the scorer
        latents = ahead(self._latent_stream(prepared, vae_batch_size, on_skip, sources, digests), depth=4 * vae_batch_size)
        try:
            for index, score in scorer.run(latents):
                result = self._result(index, sources[index], score, prompts)
                result.sha256 = digests.get(index)
                result.temperature = calibration.temperature if calibration is not None else None
                yield result
        except NonFiniteError as e:
            raise DiffclsError(e.message(sources.get(e.key, f"<image {e.key}>"))) from None
        for r, secs in scorer.stats.round_seconds.items():
            self.timer.add(f"unet_round_{r + 1}", secs)
        for secs in scorer.stats.unet_seconds:
            self.timer.add("unet_call", secs)

    def iter_latents(
        self,
        images: Iterable,
        *,
        interpolation: Interpolation | str = Interpolation.bicubic,
        vae_batch_size: int = 8,
        workers: int = 2,
        on_skip: Callable[[str, str], None] | None = None,
    ) -> Iterator[tuple[int, str, str | None, torch.Tensor]]:
        """(index, source, sha256, x0) per good image, in input order: the latents `iter_classify`
        scores (decoded on worker threads, cached, VAE-encoded in batches). Bad images go to
        `on_skip(path, message)` (raised if None)."""
        self._interp = Interpolation(interpolation)
        sources: dict[int, str] = {}
        digests: dict[int, str | None] = {}
        prepared = self._prepared_stream(images, self.engines.image_size, self._interp, workers, max(4, 2 * vae_batch_size))
        for index, x0 in self._latent_stream(prepared, vae_batch_size, on_skip, sources, digests):
            yield index, sources[index], digests.get(index), x0

    def classify(self, images: Iterable, prompts: PromptSet | None = None, schedule: Schedule | AdaptiveSchedule | None = None, **kw) -> list[ImageResult]:
        """All results, in input order."""
        return sorted(self.iter_classify(images, prompts, schedule, **kw), key=lambda r: r.index)

    def noise_bank(self, schedule: Schedule | AdaptiveSchedule, seed: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        shape = (schedule.noise_bank_size(), *self.engines.latent_shape)
        if noise is None:
            return make_noise_bank(schedule, self.engines.latent_shape, seed)
        if tuple(noise.shape) != shape:
            raise DiffclsError(
                f"the noise tensor has shape {list(noise.shape)}; this schedule and model need "
                f"{list(shape)} (max(n_samples) * n_trials, C, h, w)"
            )
        problem = noise_problem(noise)
        if problem:
            raise DiffclsError(f"the noise tensor {problem}; pass finite standard-normal noise (or drop it to use --seed)")
        return noise.float()

    @staticmethod
    def _result(index: int, source: str, s: ImageScore, prompts: PromptSet) -> ImageResult:
        return ImageResult(
            index=index,
            source=source,
            prediction=prompts.classidx[s.prediction],
            classname=prompts.classnames[s.prediction],
            prompt=s.prediction,
            scores=s.scores,
            errors=s.errors,
            ranking=s.ranking,
            n_evals=s.n_evals,
            _prompts=prompts,
            final=s.final,
        )


def noise_problem(x: torch.Tensor) -> str | None:
    """Why `x` cannot be a noise bank (integer, bool or complex values; NaN or inf), else None."""
    if x.is_complex() or not x.is_floating_point():  # an int/bool/uint8 bank is a wrong file, never noise
        return f"holds {str(x.dtype).removeprefix('torch.')} values, not real floating-point noise"
    return non_finite_problem(x)


def non_finite_problem(x: torch.Tensor) -> str | None:
    """"holds 3 NaN and 1 inf values (of 4096)" for a tensor with non-finite values, else None.

    Checked in the tensor's own dtype and again after the float32 cast scoring uses (a float64
    value beyond float32's range becomes inf).
    """
    if not (x.is_floating_point() or x.is_complex()):
        return None
    x32 = x.float()
    if bool(torch.isfinite(x).all()) and bool(torch.isfinite(x32).all()):
        return None
    n_nan = int(torch.isnan(x32).sum())
    n_inf = int(torch.isinf(x32).sum())
    return f"holds {n_nan} NaN and {n_inf} inf values (of {x.numel()})"


def ahead(items: Iterator, depth: int) -> Iterator:
    """Run the iterator `items` on a thread, up to `depth` items ahead of the consumer (so that
    producing them overlaps the consumer's work); its exceptions are raised in the consumer.
    Closing the returned generator stops the thread and closes `items` there."""
    import queue

    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - raised where the items are consumed
            put(("error", e))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="diffcls-latents", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join()


def run_batched(engine, name: str, x: torch.Tensor, preferred: int) -> torch.Tensor:
    """Run `engine` over x in chunks its batch sizes accept, padding the tail; concat outputs."""
    n = x.shape[0]
    sizes = engine.batch_sizes
    outs = []
    i = 0
    while i < n:
        left = n - i
        if sizes is None:
            b = run = min(preferred, left)
        else:
            fits = [s for s in sizes if s >= left]
            b = min(fits) if fits else max(sizes)
            run = min(b, left)
        part = x[i : i + run]
        if run < b:
            part = torch.cat([part, part[:1].expand(b - run, *part.shape[1:])])
        out = engine({name: part})
        outs.append(next(iter(out.values()))[:run])
        i += run
    return torch.cat(outs)
