"""The adaptive evaluation schedule of Diffusion Classifier (Li et al., 2023, Sec. 3.3).

`n_samples = [n_1..n_R]` timesteps per round (cumulative), `to_keep = [k_1..k_R]` prompts kept
after each round, `n_trials` noise draws per timestep, and the loss. Validation happens before
any work, with one-line errors that say what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffcls.config import Loss
from diffcls.errors import DiffclsError

LOSSES = tuple(loss.value for loss in Loss)


@dataclass(frozen=True)
class Schedule:
    n_samples: tuple[int, ...] = (50, 500)  # timesteps per round (the paper's CIFAR-10 setting)
    to_keep: tuple[int, ...] = (5, 1)  # prompts kept after each round; the last must be 1
    n_trials: int = 1  # noise draws per timestep
    loss: str = "l2"  # l2 (the paper's), l1 or huber

    def __post_init__(self):
        object.__setattr__(self, "n_samples", tuple(int(n) for n in self.n_samples))
        object.__setattr__(self, "to_keep", tuple(int(k) for k in self.to_keep))
        if isinstance(self.loss, Loss):  # plain strings in describe(), results and caches
            object.__setattr__(self, "loss", self.loss.value)

    @property
    def max_samples(self) -> int:
        """M = max(n_samples): the size of the timestep grid."""
        return max(self.n_samples)

    def noise_bank_size(self) -> int:
        return self.max_samples * self.n_trials

    def validate(self, n_prompts: int, num_train_timesteps: int = 1000) -> "Schedule":
        """Refuse an impossible schedule with a one-line error; checked once per (prompts, T)."""
        if getattr(self, "_valid_for", None) == (n_prompts, num_train_timesteps):
            return self
        ns, ks, T = self.n_samples, self.to_keep, num_train_timesteps
        if not ns or not ks:
            raise DiffclsError("the schedule is empty; give --n-samples and --to-keep, e.g. --n-samples 50 500 --to-keep 5 1")
        if len(ns) != len(ks):
            raise DiffclsError(
                f"--n-samples has {len(ns)} rounds but --to-keep has {len(ks)}; give one value per round to each"
            )
        if any(n < 1 for n in ns) or any(k < 1 for k in ks):
            raise DiffclsError("--n-samples and --to-keep values must be >= 1")
        if ks[-1] != 1:
            raise DiffclsError(f"the last --to-keep value is {ks[-1]}; it must be 1 so that one prompt remains")
        if any(b > a for a, b in zip(ks, ks[1:])):
            raise DiffclsError(f"--to-keep {' '.join(map(str, ks))} increases; it must be non-increasing")
        if ks[0] > n_prompts:
            raise DiffclsError(
                f"--to-keep {ks[0]} is more than the {n_prompts} prompts given; keep at most {n_prompts}"
            )
        if any(b < a for a, b in zip(ns, ns[1:])):
            raise DiffclsError(f"--n-samples {' '.join(map(str, ns))} decreases; it must be non-decreasing")
        if max(ns) > T:
            raise DiffclsError(
                f"--n-samples {max(ns)} exceeds the model's {T} training timesteps; use at most {T}"
            )
        if self.n_trials < 1:
            raise DiffclsError(f"--n-trials {self.n_trials} must be >= 1")
        if self.loss not in LOSSES:
            raise DiffclsError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        object.__setattr__(self, "_valid_for", (n_prompts, num_train_timesteps))
        return self

    def grid(self, num_train_timesteps: int = 1000) -> list[int]:
        """The M evenly spaced timesteps every round draws from."""
        T, M = num_train_timesteps, self.max_samples
        return list(range(T // M // 2, T, T // M))[:M]

    def rounds(self, num_train_timesteps: int = 1000) -> list[list[tuple[int, int]]]:
        """Per round, the new (k, t) pairs: t a timestep, k its index in overall evaluation order.

        Noise for trial j of the k-th timestep is bank[k * n_trials + j].
        """
        grid = self.grid(num_train_timesteps)
        seen: set[int] = set()
        out: list[list[tuple[int, int]]] = []
        k = 0
        for n in self.n_samples:
            step = len(grid) // n
            ts = [t for t in grid[step // 2 :: step][:n] if t not in seen]
            new = []
            for t in ts:
                new.append((k, t))
                k += 1
            seen.update(ts)
            out.append(new)
        return out

    def evals_upper_bound(self, n_prompts: int, num_train_timesteps: int = 1000) -> int:
        """UNet evaluations per image (exact: pruning is by count, not by threshold)."""
        total, alive = 0, n_prompts
        for new, keep in zip(self.rounds(num_train_timesteps), self.to_keep):
            total += alive * len(new) * self.n_trials
            alive = keep
        return total

    def describe(self) -> str:
        return (
            f"n_samples={list(self.n_samples)} to_keep={list(self.to_keep)} "
            f"n_trials={self.n_trials} loss={self.loss}"
        )


def default_schedule(n_prompts: int, n_samples=(50, 500), to_keep=(5, 1), **kw) -> Schedule:
    """The default (paper's CIFAR-10) schedule with the first round's keep capped at n_prompts."""
    ks = tuple(min(k, n_prompts) for k in to_keep)
    return Schedule(n_samples=tuple(n_samples), to_keep=ks, **kw)
