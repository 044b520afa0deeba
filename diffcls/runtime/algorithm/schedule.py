"""The adaptive evaluation schedule of Diffusion Classifier (Li et al., 2023, Sec. 3.3).

`n_samples = [n_1..n_R]` timesteps per round (cumulative), `to_keep = [k_1..k_R]` prompts kept
after each round, `n_trials` noise draws per timestep, and the loss. Validation happens before
any work, with one-line errors that say what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from diffcls.config import Loss
from diffcls.errors import DiffclsError
from diffcls.models.noising import WEIGHTINGS

LOSSES = tuple(loss.value for loss in Loss)


@dataclass(frozen=True)
class Schedule:
    n_samples: tuple[int, ...] = (50, 500)  # timesteps per round (the paper's CIFAR-10 setting)
    to_keep: tuple[int, ...] = (5, 1)  # prompts kept after each round; the last must be 1
    n_trials: int = 1  # noise draws per timestep
    loss: str = "l2"  # l2 (the paper's), l1 or huber
    weighting: str = "none"  # each error times w_t (models.noising.timestep_weights): none or logit-normal

    def __post_init__(self):
        object.__setattr__(self, "weighting", str(getattr(self.weighting, "value", self.weighting)))
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
        check_loss_and_weighting(self)
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

    def to_dict(self) -> dict:
        """The schedule as plain values (what a results file is bound to; `schedule_from_dict`)."""
        d = {"kind": "fixed", "n_samples": list(self.n_samples), "to_keep": list(self.to_keep), "n_trials": self.n_trials, "loss": self.loss}
        return with_weighting(d, self.weighting)

    def describe(self) -> str:
        """For people (logs, --json); never compared: `to_dict` is what is stored and compared."""
        return (
            f"n_samples={list(self.n_samples)} to_keep={list(self.to_keep)} "
            f"n_trials={self.n_trials} loss={self.loss}" + weighting_words(self.weighting)
        )


def check_loss_and_weighting(schedule) -> None:
    if schedule.loss not in LOSSES:
        raise DiffclsError(f"unknown --loss {schedule.loss!r}; choose one of {', '.join(LOSSES)}")
    if schedule.weighting not in WEIGHTINGS:
        raise DiffclsError(f"unknown --weighting {schedule.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def with_weighting(d: dict, weighting: str) -> dict:
    """A schedule's plain values with its weighting, which is left out when it is "none" (so the
    results files written before weightings existed stay bound to the same values)."""
    return d if weighting == "none" else {**d, "weighting": weighting}


def weighting_words(weighting: str) -> str:
    return "" if weighting == "none" else f" weighting={weighting}"


def default_schedule(n_prompts: int, n_samples=(50, 500), to_keep=(5, 1), **kw) -> Schedule:
    """The default (paper's CIFAR-10) schedule with the first round's keep capped at n_prompts."""
    ks = tuple(min(k, n_prompts) for k in to_keep)
    return Schedule(n_samples=tuple(n_samples), to_keep=ks, **kw)


RULES = ("mixture", "kim-nelson")


def van_der_corput_order(m: int) -> list[int]:
    """0..m-1 in bit-reversal order: every prefix is spread evenly over the range.

    The bit-reversed counter over the next power of two, skipping values >= m (so for m = 2^b
    every prefix of length 2^j is exactly every 2^(b-j)-th point).
    """
    if m <= 1:
        return list(range(m))
    bits = (m - 1).bit_length()
    order = []
    for i in range(1 << bits):
        r = int(format(i, f"0{bits}b")[::-1], 2)
        if r < m:
            order.append(r)
    return order


@dataclass(frozen=True)
class AdaptiveSchedule:
    """Sequential evaluation: each image stops once its answer is statistically settled.

    Timesteps come from the fine grid of `max_samples` points in van der Corput order (the k-th
    timestep evaluated uses noise bank[k * n_trials + j], as in the fixed schedule); every
    prompt still alive is evaluated at every timestep taken (paired samples). After the first
    `min_samples` timesteps, prompts are eliminated by paired sequential tests with overall
    error probability <= `error_rate` (see docs/adaptive.md and `diffcls.runtime.algorithm.policy`).
    """

    # defaults chosen with bench/policy_replay.py on 500-timestep tables and run live
    # (BENCHMARKS.md, "Round 3"): the paper schedule's accuracy on clean and corrupted digits at
    # 1/16 and 1/8 of its evaluations
    error_rate: float = 0.9  # alpha: P(the best prompt is eliminated) <= alpha (a loose bound; measured far lower)
    min_samples: int = 6  # n0: first-stage timesteps for every prompt (variance estimates)
    max_samples: int = 30  # first-stage budget: timesteps per prompt; then the final stage or the lowest mean
    rule: str = "mixture"  # "mixture" (indifference-zone-free) or "kim-nelson"
    rel_delta: float = 0.05  # kim-nelson only: delta = rel_delta * mean error of the first stage
    n_trials: int = 1  # noise draws per timestep (one sample = their mean error)
    loss: str = "l2"
    # the final stage: an image still undecided at max_samples gives its best `final_keep`
    # prompts up to `final_samples` more timesteps each, eliminating by its own test (mixture
    # rule, alpha final_error_rate) until one is left or the timesteps run out
    final_samples: int = 220  # 0: no final stage (the lowest mean at max_samples wins)
    final_keep: int = 3
    final_error_rate: float | None = None  # alpha of the final stage's own test (None: error_rate)
    weighting: str = "none"  # each error times w_t (models.noising.timestep_weights)

    def __post_init__(self):
        object.__setattr__(self, "weighting", str(getattr(self.weighting, "value", self.weighting)))
        object.__setattr__(self, "final_samples", int(self.final_samples))
        object.__setattr__(self, "final_keep", int(self.final_keep))
        object.__setattr__(self, "error_rate", float(self.error_rate))
        fer = self.error_rate if self.final_error_rate is None else self.final_error_rate
        object.__setattr__(self, "final_error_rate", float(fer))
        object.__setattr__(self, "rel_delta", float(self.rel_delta))
        object.__setattr__(self, "min_samples", int(self.min_samples))
        object.__setattr__(self, "max_samples", int(self.max_samples))
        object.__setattr__(self, "n_trials", int(self.n_trials))
        if isinstance(self.loss, Loss):
            object.__setattr__(self, "loss", self.loss.value)

    @property
    def grid_size(self) -> int:
        """Timesteps in the grid: the budget of the first stage plus the final stage's."""
        return self.max_samples + self.final_samples

    def noise_bank_size(self) -> int:
        return self.grid_size * self.n_trials

    def validate(self, n_prompts: int, num_train_timesteps: int = 1000) -> "AdaptiveSchedule":
        T = num_train_timesteps
        if not 0.0 < self.error_rate < 1.0:
            raise DiffclsError(f"--error-rate {self.error_rate:g} must be between 0 and 1 (exclusive), e.g. --error-rate 0.05")
        if self.max_samples < 2:
            raise DiffclsError(f"--max-samples {self.max_samples} must be >= 2")
        if self.max_samples > T:
            raise DiffclsError(f"--max-samples {self.max_samples} exceeds the model's {T} training timesteps; use at most {T}")
        if not 2 <= self.min_samples <= self.max_samples:
            raise DiffclsError(
                f"--min-samples {self.min_samples} must be between 2 and --max-samples {self.max_samples} (a variance needs 2 samples)"
            )
        if self.rule not in RULES:
            raise DiffclsError(f"unknown adaptive rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if not self.rel_delta > 0.0:
            raise DiffclsError(f"--rel-delta {self.rel_delta:g} must be > 0, e.g. --rel-delta 0.05")
        if self.final_samples < 0:
            raise DiffclsError(f"--final-samples {self.final_samples} must be >= 0 (0: no final stage)")
        if self.grid_size > T:
            raise DiffclsError(
                f"--max-samples {self.max_samples} + --final-samples {self.final_samples} exceed the model's {T} "
                f"training timesteps; use at most {T} together"
            )
        if not 0.0 < self.final_error_rate < 1.0:
            raise DiffclsError(
                f"--final-error-rate {self.final_error_rate:g} must be between 0 and 1 (exclusive), e.g. --final-error-rate 0.5"
            )
        if self.final_samples and self.final_keep < 2:
            raise DiffclsError(f"--final-keep {self.final_keep} must be >= 2 (the final stage compares the best few prompts)")
        if self.n_trials < 1:
            raise DiffclsError(f"--n-trials {self.n_trials} must be >= 1")
        check_loss_and_weighting(self)
        if n_prompts < 1:
            raise DiffclsError("no prompts to score; give at least one")
        return self

    def grid(self, num_train_timesteps: int = 1000, offset: int | None = None) -> list[int]:
        """The G = grid_size timesteps t_i = floor((i + u) T / G), i < G, sorted: one in each of G
        equal strata of [0, T). offset None: u = 1/2 (the fixed schedule's grid where G divides
        T); an image's `offset`: u = its bits above the index rotation / 2^32 (a random start
        in every stratum, the same for all strata: a randomly shifted stratified sample)."""
        T, G = num_train_timesteps, self.grid_size
        if offset is None:
            return [(2 * i + 1) * T // (2 * G) for i in range(G)]
        u = (int(offset) // G) % (1 << 32)  # u / 2^32 in [0, 1)
        return [((i << 32) + u) * T // (G << 32) for i in range(G)]

    def timestep_order(self, num_train_timesteps: int = 1000, offset: int | None = None) -> list[int]:
        """The grid's timesteps in evaluation order: position k uses noise bank[k * n_trials + j].

        The van der Corput order over the grid indices; with an image's `offset`, on that image's
        grid (`grid(T, offset)`) and rotated (index i -> (i + offset) mod G). Every prefix stays
        spread evenly over [0, T). The Scorer gives each image its own offset (from the image's
        content), so that no one set of timesteps is shared by every image."""
        grid = self.grid(num_train_timesteps, offset)
        G = len(grid)
        rot = 0 if offset is None else int(offset) % G
        return [grid[(i + rot) % G] for i in van_der_corput_order(G)]

    def evals_upper_bound(self, n_prompts: int, num_train_timesteps: int = 1000) -> int:
        """The most UNet evaluations one image can take: every prompt to the budget, then the
        final stage for the best final_keep."""
        final = min(self.final_keep, n_prompts) * self.final_samples if n_prompts > 1 else 0
        return (n_prompts * self.max_samples + final) * self.n_trials

    def to_dict(self) -> dict:
        """The schedule as plain values (what a results file is bound to; `schedule_from_dict`)."""
        d = {"kind": "adaptive", **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "weighting"}}
        return with_weighting(d, self.weighting)

    def describe(self) -> str:
        """For people (logs, --json); never compared: `to_dict` is what is stored and compared."""
        delta = f" rel_delta={self.rel_delta:g}" if self.rule == "kim-nelson" else ""
        final = (
            f" final_samples={self.final_samples} final_keep={self.final_keep} final_error_rate={self.final_error_rate:g}"
            if self.final_samples
            else ""
        )
        return (
            f"adaptive rule={self.rule} error_rate={self.error_rate:g} min_samples={self.min_samples} "
            f"max_samples={self.max_samples}{delta}{final} n_trials={self.n_trials} loss={self.loss}"
            + weighting_words(self.weighting)
        )


def schedule_from_dict(d: dict) -> Schedule | AdaptiveSchedule:
    """The schedule `to_dict` described (a one-line error for anything else)."""
    d = dict(d)
    kind = d.pop("kind", None)
    try:
        if kind == "fixed":
            return Schedule(**d)
        if kind == "adaptive":
            return AdaptiveSchedule(**d)
    except TypeError as e:
        raise DiffclsError(f"not a schedule description ({e}): {d}") from None
    raise DiffclsError(f"unknown schedule kind {kind!r}; expected fixed or adaptive")
