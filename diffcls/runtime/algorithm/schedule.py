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


def _kept_intervals(band_weights, T: int) -> list[tuple[int, int]]:
    """[lo, hi) of the timestep bands with a positive weight (nb equal bands of [0, T))."""
    nb = len(band_weights)
    return [(b * T // nb, (b + 1) * T // nb) for b, w in enumerate(band_weights) if w > 0]


def _to_kept(x: int, intervals: list[tuple[int, int]]) -> int:
    """The x-th timestep (0-based) of the kept bands, in increasing order."""
    for lo, hi in intervals:
        if x < hi - lo:
            return lo + x
        x -= hi - lo
    raise ValueError(x)


class _BandWeights:
    """Timestep weights by band (`band_weights`: nb weights for nb equal bands of [0, T), from a
    calibration file; None: every timestep weight 1). A timestep's sample is its error times its
    band's weight; bands of weight 0 are dropped from the grid. Fixed before any image is seen."""

    def weight(self, t: int, num_train_timesteps: int = 1000) -> float:
        w = self.band_weights
        return 1.0 if w is None else float(w[int(t) * len(w) // num_train_timesteps])

    def _span(self, num_train_timesteps: int) -> tuple[int, list[tuple[int, int]] | None]:
        """(the length of the kept timesteps, their intervals or None when all are kept)."""
        if self.band_weights is None:
            return num_train_timesteps, None
        kept = _kept_intervals(self.band_weights, num_train_timesteps)
        return sum(hi - lo for lo, hi in kept), kept

    def _check_weights(self, grid_size: int, num_train_timesteps: int) -> None:
        w = self.band_weights
        if w is None:
            return
        if not w or any(not (v >= 0.0 and v < float("inf")) for v in w) or not any(v > 0 for v in w):
            raise DiffclsError(f"timestep band weights {list(w)} must be finite, >= 0 and not all 0; refit them with diffcls calibrate --timestep-weights")
        span, _ = self._span(num_train_timesteps)
        if span < grid_size:
            raise DiffclsError(f"the timestep weights keep {span} timesteps, fewer than the {grid_size} the schedule needs; use fewer timesteps")


def _norm_weights(obj) -> None:
    if obj.band_weights is not None:
        object.__setattr__(obj, "band_weights", tuple(float(v) for v in obj.band_weights))


@dataclass(frozen=True)
class Schedule(_BandWeights):
    n_samples: tuple[int, ...] = (50, 500)  # timesteps per round (the paper's CIFAR-10 setting)
    to_keep: tuple[int, ...] = (5, 1)  # prompts kept after each round; the last must be 1
    n_trials: int = 1  # noise draws per timestep
    loss: str = "l2"  # l2 (the paper's), l1 or huber
    band_weights: tuple[float, ...] | None = None  # timestep weights by band (a calibration file's); None: uniform
    weighting: str = "none"  # each error times w_t (models.noising.timestep_weights): none or logit-normal

    def __post_init__(self):
        _norm_weights(self)
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
        self._check_weights(max(ns), T)
        object.__setattr__(self, "_valid_for", (n_prompts, num_train_timesteps))
        return self

    def grid(self, num_train_timesteps: int = 1000) -> list[int]:
        """The M evenly spaced timesteps every round draws from (over the kept bands, if weighted)."""
        span, kept = self._span(num_train_timesteps)
        M = self.max_samples
        grid = list(range(span // M // 2, span, span // M))[:M]
        return grid if kept is None else [_to_kept(x, kept) for x in grid]

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
        if self.band_weights is not None:  # only then: unweighted results files stay comparable
            d["band_weights"] = list(self.band_weights)
        return with_weighting(d, self.weighting)

    def describe(self) -> str:
        """For people (logs, --json); never compared: `to_dict` is what is stored and compared."""
        return (
            f"n_samples={list(self.n_samples)} to_keep={list(self.to_keep)} "
            f"n_trials={self.n_trials} loss={self.loss}" + (" timestep-weighted" if self.band_weights is not None else "")
            + weighting_words(self.weighting)
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


# The user-facing knob `error_rate` -> the test's constant `alpha`, measured by replay on the
# digits `train` split (never the evaluation set; 150 corrupted (severity 4) + 540 clean digits,
# noise seed 0, 4 grid rotations each = 2,760 runs, the demo model with its timestep weights, which
# were fitted on the same split): for each knob value, the largest alpha tried (0.05, 0.2, 0.5,
# 0.9, 1.2, 1.5, 1.9) whose 95% upper bound on P(answer differs from the full-budget answer) is at
# most the knob on *each* table (corrupted and clean apart), at the default n0, M, F. Corrupted
# digits, the worse table: alpha 1.2: 1 of 600 differ (<= 0.94%); 1.5: 2 of 600 (<= 1.21%); 1.9:
# 9 of 600 (<= 2.83%); clean digits: at most 1 of 2,160 at any alpha (BENCHMARKS.md, "Round 6";
# bench/adaptive_replay.py knob). A knob between two rows gets the lower row's alpha; below the
# first row nothing was measured finely enough (600 runs cannot show a rate under ~0.6%).
KNOB_TO_ALPHA = ((0.01, 1.2), (0.02, 1.5), (0.05, 1.9))


def alpha_for_error_rate(error_rate: float) -> float:
    """The alpha the measured table gives `error_rate` (the row at or below it)."""
    rows = [alpha for knob, alpha in KNOB_TO_ALPHA if knob <= error_rate + 1e-12]
    if not rows:
        raise DiffclsError(
            f"--error-rate {error_rate:g} is below the smallest measured setting {KNOB_TO_ALPHA[0][0]:g}; "
            f"use --error-rate {KNOB_TO_ALPHA[0][0]:g} or set the test's constant directly with --alpha"
        )
    return rows[-1]


@dataclass(frozen=True)
class AdaptiveSchedule(_BandWeights):
    """Sequential evaluation: each image stops once its answer is statistically settled.

    Timesteps come from a grid of `max_samples + final_samples` points in van der Corput order
    (the k-th timestep evaluated uses noise bank[k * n_trials + j], as in the fixed schedule);
    every prompt still alive is evaluated at every timestep taken (paired samples). Stages of
    one-sided sequential tests eliminate prompts (`diffcls.runtime.algorithm.policy`, docs/adaptive.md):

    - `alpha` is the test's own bound: P(a test eliminates the best prompt) <= alpha, under the
      assumptions docs/adaptive.md states;
    - `error_rate` is the user's knob: the probability that the answer differs from the
      full-budget answer (every prompt at every grid timestep), as measured by replay on a
      calibration split; it picks `alpha` from `KNOB_TO_ALPHA` when `alpha` is not given.
    """

    # defaults chosen on replays of digits `train`-split tables only (BENCHMARKS.md, "Round 4" to "Round 6")
    error_rate: float = 0.02  # knob: P(answer differs from the full-budget answer), measured meaning
    alpha: float | None = None  # the test's bound on P(a test eliminates the best); None: from error_rate
    min_samples: int = 8  # n0: the samples each stage estimates its pair variances from
    max_samples: int = 20  # M: first-stage timesteps per prompt at most; then the final stage
    rule: str = "mixture"  # "mixture" (indifference-zone-free, one-sided) or "kim-nelson"
    rel_delta: float = 0.05  # kim-nelson only: delta = rel_delta * mean error of the first stage
    n_trials: int = 1  # noise draws per timestep (one sample = their mean error)
    loss: str = "l2"
    # the final stage: the prompts a test has not eliminated by max_samples go on for up to
    # `final_samples` more timesteps under a fresh test (sums restarted, own variances)
    final_samples: int = 100  # 0: no final stage (the lowest mean at max_samples wins)
    final_keep: int = 0  # 0: every survivor goes on; k > 0: only the k lowest means (a bare cut, outside the bound)
    final_error_rate: float | None = None  # the final stage's share of alpha (None: half)
    look_every: int = 1  # g: each stage tests at its n0-th sample and every g samples after (and at its end)
    band_weights: tuple[float, ...] | None = None  # timestep weights by band (a calibration file's); None: uniform
    weighting: str = "none"  # each error times w_t (models.noising.timestep_weights)

    def __post_init__(self):
        object.__setattr__(self, "weighting", str(getattr(self.weighting, "value", self.weighting)))
        object.__setattr__(self, "final_samples", int(self.final_samples))
        object.__setattr__(self, "final_keep", int(self.final_keep))
        object.__setattr__(self, "error_rate", float(self.error_rate))
        if self.alpha is not None:
            object.__setattr__(self, "alpha", float(self.alpha))
        if self.final_error_rate is not None:
            object.__setattr__(self, "final_error_rate", float(self.final_error_rate))
        object.__setattr__(self, "look_every", int(self.look_every))
        _norm_weights(self)
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

    def validate(self, n_prompts: int | None, num_train_timesteps: int = 1000) -> "AdaptiveSchedule":
        """One-line errors for impossible settings; n_prompts None: only the checks that do not
        depend on the prompt count (before the prompts are known)."""
        T = num_train_timesteps
        if not 0.0 < self.error_rate < 1.0:
            raise DiffclsError(f"--error-rate {self.error_rate:g} must be between 0 and 1 (exclusive), e.g. --error-rate 0.02")
        if self.alpha is not None and not 0.0 < self.alpha:
            raise DiffclsError(f"--alpha {self.alpha:g} must be > 0, e.g. --alpha 0.05")
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
        alpha = self.resolved_alpha
        if self.final_error_rate is not None and not 0.0 < self.final_error_rate < alpha:
            raise DiffclsError(
                f"--final-error-rate {self.final_error_rate:g} must be between 0 and the test's alpha {alpha:g} "
                f"(it is the final stage's share of it), e.g. --final-error-rate {alpha / 2:g}"
            )
        # each stage tests pairs at level alpha_s / (k - 1) <= alpha_s: a level must be below 1
        # (alpha >= 1 is allowed: the union bound over the pairs then says nothing, docs/adaptive.md)
        if any(a >= 1.0 for a in self.stage_alphas):
            a1, a2 = self.stage_alphas
            if self.final_samples:
                raise DiffclsError(
                    f"--alpha {alpha:g} gives the stages the levels {a1:g} and {a2:g}; each must be below 1 "
                    f"(a stage's pair test at level >= 1 eliminates at once), e.g. --alpha {min(alpha, 1.9):g} with the final stage's default half"
                )
            if self.alpha is not None:
                raise DiffclsError(f"--alpha {alpha:g} must be below 1 without a final stage, e.g. --alpha 0.9")
            raise DiffclsError(
                f"--error-rate {self.error_rate:g} picks --alpha {alpha:g}, measured with a final stage; "
                "with --final-samples 0 give the test's constant below 1, e.g. --alpha 0.9"
            )
        if self.rule == "kim-nelson" and n_prompts is not None and n_prompts > 1 and 2.0 * self.stage_alphas[0] / (n_prompts - 1) >= 1.0:
            raise DiffclsError(
                f"--rule kim-nelson needs 2 x alpha_1 / (K - 1) below 1 (alpha_1 {self.stage_alphas[0]:g}, K {n_prompts}); "
                "use a smaller --alpha"
            )
        if self.final_keep == 1 or self.final_keep < 0:
            raise DiffclsError(f"--final-keep {self.final_keep} must be 0 (every survivor) or >= 2 (the final stage compares prompts)")
        if self.look_every < 1:
            raise DiffclsError(f"--look-every {self.look_every} must be >= 1 (test every that many timesteps)")
        self._check_weights(self.grid_size, T)
        if self.n_trials < 1:
            raise DiffclsError(f"--n-trials {self.n_trials} must be >= 1")
        check_loss_and_weighting(self)
        if n_prompts is not None and n_prompts < 1:
            raise DiffclsError("no prompts to score; give at least one")
        return self

    @property
    def resolved_alpha(self) -> float:
        """The test's bound: `alpha` if given, else the measured table's alpha for `error_rate`."""
        return self.alpha if self.alpha is not None else alpha_for_error_rate(self.error_rate)

    @property
    def stage_alphas(self) -> tuple[float, float]:
        """(alpha_1, alpha_2): the first and the final stage's shares of the bound (sum: alpha)."""
        alpha = self.resolved_alpha
        if not self.final_samples:
            return alpha, 0.0
        final = alpha / 2.0 if self.final_error_rate is None else self.final_error_rate
        return alpha - final, final

    def grid(self, num_train_timesteps: int = 1000, offset: int | None = None) -> list[int]:
        """The G = grid_size timesteps t_i = floor((i + u) T / G), i < G, sorted: one in each of G
        equal strata of [0, T). offset None: u = 1/2 (the fixed schedule's grid where G divides
        T); an image's `offset`: u = its bits above the index rotation / 2^32 (a random start
        in every stratum, the same for all strata: a randomly shifted stratified sample)."""
        T, G = num_train_timesteps, self.grid_size
        span, kept = self._span(T)  # weighted: the grid covers the kept bands only
        if offset is None:
            grid = [(2 * i + 1) * span // (2 * G) for i in range(G)]
        else:
            u = (int(offset) // G) % (1 << 32)  # u / 2^32 in [0, 1)
            grid = [((i << 32) + u) * span // (G << 32) for i in range(G)]
        return grid if kept is None else [_to_kept(x, kept) for x in grid]

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
        final = min(self.final_keep or n_prompts, n_prompts) * self.final_samples if n_prompts > 1 else 0
        return (n_prompts * self.max_samples + final) * self.n_trials

    def to_dict(self) -> dict:
        """The schedule as plain values (what a results file is bound to; `schedule_from_dict`)."""
        d = {"kind": "adaptive", **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "weighting"}}
        return with_weighting(d, self.weighting)

    def describe(self) -> str:
        """For people (logs, --json); never compared: `to_dict` is what is stored and compared."""
        delta = f" rel_delta={self.rel_delta:g}" if self.rule == "kim-nelson" else ""
        a1, a2 = self.stage_alphas
        final = f" final_samples={self.final_samples} final_alpha={a2:g}" if self.final_samples else ""
        final += f" final_keep={self.final_keep}" if self.final_samples and self.final_keep else ""
        look = f" look_every={self.look_every}" if self.look_every != 1 else ""
        knob = f"error_rate={self.error_rate:g} " if self.alpha is None else ""
        look += " timestep-weighted" if self.band_weights is not None else ""
        return (
            f"adaptive rule={self.rule} {knob}alpha={self.resolved_alpha:g} min_samples={self.min_samples} "
            f"max_samples={self.max_samples}{delta}{final}{look} n_trials={self.n_trials} loss={self.loss}"
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
