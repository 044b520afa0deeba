"""The scoring loop of Diffusion Classifier, with several images sharing full UNet batches.

For one image with latent x0 and prompts c (docs/design.md, "The scoring loop"):

    round i: new timesteps ts_i (see `Schedule.rounds`), for each remaining prompt c, each new
             (t, trial j), with eps = bank[k * n_trials + j] (k = the t's evaluation index):
             x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) eps
             err = mean_{C,H,W} loss(eps, unet(x_t, t, E[c]))
             (v-prediction and flow models: their noising and target, `diffcls.models.noising`;
             a schedule's timestep weighting multiplies err by w_t)
             score(c) = mean of all of c's errors so far; keep the k_i lowest scores.

Which samples an image needs is its policy's business (`diffcls.runtime.algorithm.policy`): the fixed
schedule above (`FixedPolicy`) or sequential elimination (`SequentialPolicy`, `AdaptiveSchedule`).
Each policy hands out a block of (prompt, k, trial) items at a time and receives their errors.
Every (image, prompt, t, trial) is independent given x0, so the `Scorer` keeps a FIFO queue of
work items from several images in flight and runs the UNet only at full batches of the chosen
size; a new image is admitted whenever the queue cannot fill a batch. Only the final batch of a
run is padded. Noising and the error reduction run on the engine's device; only the per-sample
errors come back to the host.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator

import torch
import torch.nn.functional as F

from diffcls.errors import DiffclsError
from diffcls.models.noising import noising_coefficients, timestep_weights
from diffcls.runtime.algorithm.policy import make_policy
from diffcls.runtime.algorithm.schedule import AdaptiveSchedule, Schedule


@dataclass
class ImageScore:
    """The outcome for one image. Prompt indices refer to the prompt list given to the scorer."""

    prediction: int  # the prompt left after the last round
    scores: dict[int, float]  # prompt -> mean error over all its evaluations
    errors: list[tuple[int, int, int, float]]  # (prompt, t, trial, error) in evaluation order
    ranking: list[int]  # every prompt, best first (later survivors first, then by score)
    n_evals: int
    final: list[int] = field(default_factory=list)  # the prompts of the final decision, best first


def make_noise_bank(schedule: Schedule | AdaptiveSchedule, latent_shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """M * n_trials standard-normal latents from one seeded CPU generator (float32)."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randn((schedule.noise_bank_size(), *latent_shape), generator=g, dtype=torch.float32)


def per_sample_loss(eps: torch.Tensor, pred: torch.Tensor, loss: str) -> torch.Tensor:
    """mean over (C, H, W) of the elementwise loss -> (B,) float64.

    Elementwise in float32, then each sample's mean accumulated in float64 over its own
    C*H*W values: how a kernel splits that reduction (which can follow the batch size on a
    GPU) moves the result by ~1e-16 relative, far below the UNet's own batch-size effects.
    """
    pred = pred.float()
    if loss == "l2":
        e = F.mse_loss(eps, pred, reduction="none")
    elif loss == "l1":
        e = F.l1_loss(eps, pred, reduction="none")
    elif loss == "huber":
        e = F.huber_loss(eps, pred, reduction="none", delta=1.0)
    else:
        raise DiffclsError(f"unknown loss {loss!r}; choose l2, l1 or huber")
    return e.flatten(1).double().mean(dim=1)


class NonFiniteError(DiffclsError):
    """A UNet error came out NaN or inf: the image's scores would be meaningless."""

    def __init__(self, key, prompt: int, t: int):
        self.key, self.prompt, self.t = key, prompt, t
        super().__init__(self.message(f"image {key!r}"))

    def message(self, name: str) -> str:
        return (
            f"{name}: the UNet's error is not finite (NaN or inf) for prompt {self.prompt} at t={self.t}; "
            "the image's latent is not finite or the model overflows in fp16: "
            "rerun with --precision fp32 (and --no-cache to re-encode the latent)"
        )


class _Image:
    """Per-image state: its policy, the block in flight, every error so far.

    A unit of work may hold several latents (`slots`): a policy with an `arms` list maps each of
    its arms to (latent index, prompt row), e.g. `match`'s (image, caption) pairs of one item;
    without one, arm c is prompt c on the only latent."""

    def __init__(self, key, slots: list[int], policy):
        self.key = key
        self.slots = slots
        self.arms = getattr(policy, "arms", None)
        self.policy = policy
        self.errors: list[tuple[int, int, int, float]] = []
        self.pending = 0
        self.phase = 0  # the policy's phase of the block in flight (fixed schedule: the round)

    def where(self, c: int) -> tuple[int, int]:
        """(latent slot, prompt row) of arm c."""
        if self.arms is None:
            return self.slots[0], c
        i, p = self.arms[c]
        return self.slots[i], p

    def next_items(self) -> list[tuple["_Image", int, int, int, int]]:
        """(image, prompt, k, t, trial) of the policy's next block; empty if it is done."""
        if self.policy.done:
            return []
        self.phase = self.policy.phase
        ts = self.policy.timesteps
        items = [(self, c, k, ts[k], j) for c, k, j in self.policy.next_block()]
        self.pending = len(items)
        return items

    def record(self, items: list, errs: list[float]) -> None:
        """The errors of some items of the block in flight, fed to the policy in one call."""
        self.errors.extend((c, t, j, e) for (_, c, _k, t, j), e in zip(items, errs))
        self.pending -= len(items)
        feed_block = getattr(self.policy, "feed_block", None)
        if feed_block is None:  # a policy with only `feed`
            for (_, c, k, _t, j), e in zip(items, errs):
                self.policy.feed(c, k, j, e)
        else:
            feed_block([it[1] for it in items], [it[2] for it in items], [it[4] for it in items], errs)

    def result(self) -> ImageScore:
        res = self.policy.result()
        sums: dict[int, float] = {}
        counts: dict[int, float] = {}
        sched = getattr(self.policy, "schedule", None) or getattr(self.policy, "params", None)
        weighted = getattr(sched, "band_weights", None) is not None  # timestep weights: weighted means
        for c, t, _j, e in self.errors:  # in evaluation order, as the policy summed them
            w = sched.weight(t) if weighted else 1
            sums[c] = sums.get(c, 0.0) + w * e
            counts[c] = counts.get(c, 0) + w
        return ImageScore(
            prediction=res.prediction,
            scores={c: sums[c] / counts[c] for c in sorted(sums)},
            errors=self.errors,
            ranking=res.ranking,
            n_evals=len(self.errors),
            final=res.final,
        )


@dataclass
class ScoreStats:
    unet_calls: int = 0
    unet_evals: int = 0  # real (image, prompt, t, trial) evaluations
    padded: int = 0  # padding samples in the last batch(es)
    unet_seconds: list[float] = field(default_factory=list)  # per call, device-synchronized
    round_seconds: dict[int, float] = field(default_factory=dict)  # UNet time by round index
    launched_ahead: int = 0  # batches launched while another's errors were still on the device

    @property
    def padding_fraction(self) -> float:
        total = self.unet_evals + self.padded
        return self.padded / total if total else 0.0


def latent_offset(x0: torch.Tensor) -> int:
    """A grid rotation from a latent's bytes (the first 8 bytes of their sha256)."""
    data = x0.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


class Scorer:
    """Scores a stream of latents against fixed prompt embeddings.

    unet: an Engine for the "unet" component. embeddings: one row per prompt, on any device, as
    the unet's `spec.condition` input takes them: (P, L, D) text embeddings, or (P,) class ids.
    batch_size: the UNet batch; must be one the engine accepts. The tail of the run is padded
    to the smallest accepted size that holds it.
    """

    def __init__(
        self,
        unet,
        embeddings: torch.Tensor,
        alphas_cumprod: torch.Tensor,
        schedule: Schedule | AdaptiveSchedule,
        noise_bank: torch.Tensor,
        batch_size: int,
        *,
        prediction_type: str = "epsilon",
        sigmas: torch.Tensor | None = None,
        grid_offset: Callable[[Hashable, torch.Tensor], int | None] | None = None,
        policy_factory: Callable[[Hashable, torch.Tensor], object] | None = None,
        lookahead: bool = True,
    ):
        self.unet = unet
        self.device = unet.device
        self.schedule = schedule
        self.n_prompts = int(embeddings.shape[0])
        schedule.validate(self.n_prompts, int(alphas_cumprod.shape[0]))
        if unet.batch_sizes is not None and batch_size not in unet.batch_sizes:
            raise DiffclsError(
                f"--batch-size {batch_size} is not one of the UNet engine's batch sizes "
                f"{', '.join(map(str, unet.batch_sizes))}; pick one of those or re-export"
            )
        self.batch_size = int(batch_size)
        # the denoiser's conditioning input, as its spec describes it: text embeddings in the
        # engine's precision, or class ids (int64) for a class-conditional model
        self.condition = unet.spec.condition
        cond_dtype = torch.int64 if unet.spec.input(self.condition).dtype == "int64" else unet.dtype
        self.emb = embeddings.to(self.device, cond_dtype)
        # per timestep: x_t = a x0 + s eps, target = p eps + q x0, the model sees model_t (models.noising)
        tables = noising_coefficients(prediction_type, alphas_cumprod, sigmas)
        self.a, self.s, self.p, self.q, self.model_t = (x.to(self.device) for x in tables)
        w = timestep_weights(getattr(schedule, "weighting", "none"), int(alphas_cumprod.shape[0]))
        self.weights = None if w is None else w.to(self.device)  # (T,) float64, mean 1
        self.bank = noise_bank.to(self.device, torch.float32)
        self.num_train_timesteps = int(alphas_cumprod.shape[0])
        self.stats = ScoreStats()
        # adaptive schedules: each image's rotation of the timestep grid, from its content
        # (grid_offset(key, x0), e.g. a digest of the image file; default: of the latent's bytes)
        self.grid_offset = grid_offset
        # policy_factory(key, x0): the unit's policy instead of the schedule's (`make_policy`); x0 of a
        # unit whose policy has `arms` is (L, C, h, w), its L latents
        self.policy_factory = policy_factory
        self.lookahead = lookahead  # launch a full next batch before reading this one's errors back
        self._table: torch.Tensor | None = None  # (capacity, C, h, w) latents of images in flight
        self._free: list[int] = []

    def _offset(self, key, x0: torch.Tensor) -> int:
        """The image's rotation of the adaptive grid: a function of the image alone, so that its
        result does not depend on the batch, the other images or their order."""
        if not isinstance(self.schedule, AdaptiveSchedule):
            return 0
        given = self.grid_offset(key, x0) if self.grid_offset is not None else None
        if given is not None:
            return int(given)
        return latent_offset(x0)

    # --- latents live in slots of one device tensor so a batch gathers with one index ------
    def _store(self, x0: torch.Tensor) -> int:
        x0 = x0.to(self.device, torch.float32)
        if not self._free:
            old = self._table
            grow = max(4, 0 if old is None else old.shape[0])
            new = torch.empty((grow, *x0.shape), device=self.device, dtype=torch.float32)
            self._table = new if old is None else torch.cat([old, new])
            start = 0 if old is None else old.shape[0]
            self._free.extend(range(start + grow - 1, start - 1, -1))
        slot = self._free.pop()
        self._table[slot] = x0
        return slot

    def _launch(self, items: list) -> tuple:
        """Queue one UNet batch and its loss on the device; nothing waits for the result here (on a
        GPU). Returns what `_collect` reads back: the errors, and last whether every one is finite,
        in one host tensor (a pinned buffer filled by an asynchronous copy on CUDA)."""
        n = len(items)
        size = self._padded_size(n)
        padded = items + [items[0]] * (size - n)
        idx = torch.tensor(
            [[*it[0].where(it[1]), it[2] * self.schedule.n_trials + it[4], it[3]] for it in padded],
            dtype=torch.int64,
        ).to(self.device, non_blocking=True)
        slots, prompts, noise_idx, ts = idx.unbind(1)
        x0 = self._table.index_select(0, slots)  # (B, C, h, w)
        eps = self.bank.index_select(0, noise_idx)  # (B, C, h, w)
        # --- noising, UNet, loss against the target (epsilon prediction: the noise itself) -------
        a, s, p, q = (c.index_select(0, ts).view(-1, 1, 1, 1) for c in (self.a, self.s, self.p, self.q))
        x_t = a * x0 + s * eps
        feed = {
            "sample": x_t.to(self.unet.dtype),
            "timestep": self.model_t.index_select(0, ts),
            self.condition: self.emb.index_select(0, prompts),
        }
        start = time.perf_counter()
        pred = self.unet(feed)["out_sample"]
        target = p * eps + q * x0
        err = per_sample_loss(target, pred, self.schedule.loss)  # (size,)
        if self.weights is not None:  # the timestep weighting (schedule.weighting)
            err = err * self.weights.index_select(0, ts)
        err = err[:n]
        # -----------------------------------------------------------------------------------------
        host = torch.cat([err, torch.isfinite(err).all().to(err.dtype).view(1)])
        done = None
        if host.device.type == "cuda":  # copied back through a pinned buffer, without waiting
            buffer = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
            host = buffer.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        return items, host, done, time.perf_counter() - start

    def _collect(self, launched: tuple) -> tuple[list[float], float]:
        """Wait for a launched batch (the only host sync) and return its errors and seconds."""
        items, host, done, seconds = launched
        start = time.perf_counter()
        if done is not None:
            done.synchronize()
        values = host.tolist()
        elapsed = seconds + time.perf_counter() - start
        n = len(items)
        size = self._padded_size(n)
        self.stats.unet_calls += 1
        self.stats.unet_evals += n
        self.stats.padded += size - n
        self.stats.unet_seconds.append(elapsed)
        if values[n] != 1.0:
            bad = next(i for i, e in enumerate(values[:n]) if not math.isfinite(e))
            image, c, _k, t, _j = items[bad]
            raise NonFiniteError(image.key, c, t)
        return values[:n], elapsed

    def _padded_size(self, n: int) -> int:
        sizes = self.unet.batch_sizes
        if sizes is None:
            return n if n < self.batch_size else self.batch_size
        fits = [b for b in sizes if b >= n and b <= self.batch_size]
        return min(fits) if fits else self.batch_size

    def run(self, latents: Iterable[tuple[Hashable, torch.Tensor]]) -> Iterator[tuple[Hashable, ImageScore]]:
        """Yield (key, ImageScore) per image, in the order the images finish.

        `latents` yields (key, x0 of shape (C, h, w)); it is pulled lazily, one image at a time,
        only when the queue cannot fill the next batch.
        """
        source = iter(latents)
        queue: deque = deque()
        B = self.batch_size
        inflight = None  # the launched batch whose errors are not read back yet
        while True:
            source = self._admit(source, queue)
            if inflight is None:
                if not queue:
                    return
                inflight = self._launch([queue.popleft() for _ in range(min(B, len(queue)))])
                source = self._admit(source, queue)
            # one batch of lookahead: queued items never wait on the batch in flight, so a full
            # next batch is launched before this one's errors are read back (on a GPU the host
            # then feeds the policies while the device works); a partial one waits for the
            # follow-ups this batch brings, so only the run's last batch is padded
            ahead = None
            if self.lookahead and len(queue) >= B:
                ahead = self._launch([queue.popleft() for _ in range(B)])
                self.stats.launched_ahead += 1
            yield from self._finish(inflight, queue)
            inflight = ahead

    def _admit(self, source, queue: deque):
        """Start new images (their policies, their latents' slots) while the queue cannot fill a
        batch; returns the source, or None once it is exhausted."""
        while len(queue) < self.batch_size and source is not None:
            try:
                key, x0 = next(source)
            except StopIteration:
                return None
            if self.policy_factory is not None:
                policy = self.policy_factory(key, x0)
            else:
                policy = make_policy(self.schedule, self.n_prompts, self.num_train_timesteps, self._offset(key, x0))
            latents = x0 if getattr(policy, "arms", None) is not None else x0.unsqueeze(0)
            image = _Image(key, [self._store(x) for x in latents], policy)
            queue.extend(image.next_items())
        return source

    def _finish(self, launched: tuple, queue: deque) -> Iterator[tuple[Hashable, ImageScore]]:
        """Read a batch's errors back, feed each image's share to its policy in one block, queue
        the follow-ups, and yield the images that are done."""
        batch = launched[0]
        errors, elapsed = self._collect(launched)
        per_round = self.stats.round_seconds
        for image, *_ in batch:
            per_round[image.phase] = per_round.get(image.phase, 0.0) + elapsed / len(batch)
        by_image: dict[int, tuple] = {}  # the batch's items and errors per image, in batch order
        for it, err in zip(batch, errors):
            entry = by_image.get(id(it[0]))
            if entry is None:
                entry = by_image[id(it[0])] = (it[0], [], [])
            entry[1].append(it)
            entry[2].append(err)
        for image, its, errs in by_image.values():
            image.record(its, errs)
        done_block = {id(it[0]): it[0] for it in batch if it[0].pending == 0}
        for image in done_block.values():
            items = image.next_items()
            if items:
                queue.extend(items)
            else:
                self._free.extend(image.slots)
                yield image.key, image.result()
