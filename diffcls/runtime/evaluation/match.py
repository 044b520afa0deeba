"""Image-text matching (Winoground protocol): items, scoring, text/image/group scores.

An item is two images and two captions, (i0, c0) and (i1, c1) the true pairs. Each of its six
arms, (c0, i0), (c1, i0), (empty, i0), (c0, i1), (c1, i1), (empty, i1), is scored at the same
timesteps t = interval // 2, interval // 2 + interval, ... < T with the same noise (bank[k *
n_trials + j] at the k-th timestep of that grid), so every comparison below is paired. An arm's
error is its mean UNet error (lower fits better). Six comparisons decide an item; each says which
side fits better (0: the first, 1: the second, -1: a tie):

    text_0:  (c0, i0) vs (c1, i0)        text_1:  (c1, i1) vs (c0, i1)
    image_0: (c0, i0) vs (c0, i1)        image_1: (c1, i1) vs (c1, i0)
    image_normalised_k: the image_k comparison with each side's error minus its image's error
        under the empty prompt (some images are a priori likelier; DiffusionITM's correction)

text = text_0 and text_1 won by the true pair; image = image_0 and image_1; group = text and
image. An item whose two captions are identical has tied text comparisons (text and group not
correct); two identical images tie the image comparisons. Chance: text 1/4, image 1/4, group 1/6.

With an `AdaptiveSchedule` each comparison is its own two-prompt sequential test
(`policy.SequentialPolicy`, the rule `classify --adaptive` uses) over the same grid in van der
Corput order: it stops once the test settles it, else at max_samples timesteps (the whole grid by
default, where it is the full-grid decision); arms shared by comparisons are evaluated once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from diffcls.errors import DiffclsError, missing_extra
from diffcls.runtime.algorithm.policy import PolicyResult, SequentialPolicy
from diffcls.runtime.results.writer import ResultsWriter
from diffcls.runtime.algorithm.schedule import LOSSES, AdaptiveSchedule, van_der_corput_order

REQUIRED = ("image_0", "image_1", "caption_0", "caption_1")
COMPARISONS = ("text_0", "text_1", "image_0", "image_1", "image_normalised_0", "image_normalised_1")
# arms: (image index, caption index; 2 = the empty prompt)
ARMS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2))
# comparison -> (side 0, side 1), each {arm: coefficient}
_SIDES = {
    "text_0": ({0: 1.0}, {1: 1.0}),
    "text_1": ({4: 1.0}, {3: 1.0}),
    "image_0": ({0: 1.0}, {3: 1.0}),
    "image_1": ({4: 1.0}, {1: 1.0}),
    "image_normalised_0": ({0: 1.0, 2: -1.0}, {3: 1.0, 5: -1.0}),
    "image_normalised_1": ({4: 1.0, 5: -1.0}, {1: 1.0, 2: -1.0}),
}
CHANCE = {"text": 0.25, "image": 0.25, "image_normalised": 0.25, "group": 1 / 6}
SCORES = ("text", "image", "image_normalised", "group")
Z95 = 1.959963984540054


# --- items ------------------------------------------------------------------------------------
@dataclass
class MatchItem:
    key: str  # the item's id: an `id` column, else its 0-based row number
    image_0: object  # a path, or a PIL image (a Hugging Face data set)
    image_1: object
    caption_0: str
    caption_1: str
    tag: str = ""
    digests: tuple[str, str] = ("", "")  # sha256 of each image's bytes

    @property
    def sha256(self) -> str:
        """What a results row was computed from: both images' bytes, the captions and the tag."""
        data = json.dumps([*self.digests, self.caption_0, self.caption_1, self.tag])
        return hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest()

    @property
    def text_tie(self) -> bool:
        return self.caption_0 == self.caption_1

    @property
    def image_tie(self) -> bool:
        return self.digests[0] == self.digests[1]


def _image_digest(image) -> str:
    if isinstance(image, Path):
        from diffcls.runtime.data.preprocess import file_digest

        return file_digest(image)
    h = hashlib.sha256(f"{image.mode} {image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def read_items(path: str | Path) -> list[MatchItem]:
    """Items from a CSV or JSONL file (image paths relative to it), or a local Hugging Face data
    set in Winoground's layout (a `save_to_disk` folder, or parquet files). One-line errors."""
    path = Path(path)
    if not path.exists():
        raise DiffclsError(f"{path} does not exist; pass a CSV or JSONL file with {','.join(REQUIRED)}[,tag]")
    if path.is_dir() or path.suffix == ".parquet":
        return _hf_items(path)
    rows = _jsonl_rows(path) if path.suffix in (".jsonl", ".json") else _csv_rows(path)
    if not rows:
        raise DiffclsError(f"{path} has no items; add rows with {','.join(REQUIRED)}[,tag]")
    items = []
    for n, row in enumerate(rows):
        where = f"{path} item {n + 1}"
        for col in REQUIRED:
            if not isinstance(row.get(col), str) or (col.startswith("image") and not row[col].strip()):
                raise DiffclsError(f"{where}: {col} is empty or not text; give an image path or caption in every row")
        images = []
        for col in ("image_0", "image_1"):
            p = (path.parent / row[col]).resolve() if not Path(row[col]).is_absolute() else Path(row[col])
            if not p.is_file():
                raise DiffclsError(f"{where}: {col} {row[col]} is not a file (paths are relative to {path.parent}); fix the path")
            images.append(p)
        key = str(row["id"]) if row.get("id") not in (None, "") else str(n)
        items.append(MatchItem(key, images[0], images[1], row["caption_0"], row["caption_1"], str(row.get("tag") or "")))
    _check_keys(items, path)
    for it in items:
        it.digests = (_image_digest(it.image_0), _image_digest(it.image_1))
    return items


def _csv_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DiffclsError(f"cannot read {path} ({e}); pass a UTF-8 CSV file") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
    if missing:
        raise DiffclsError(
            f"{path} has no column {', '.join(missing)}; a match file needs the columns {','.join(REQUIRED)} (and optionally tag)"
        )
    return list(reader)


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DiffclsError(f"cannot read {path} ({e}); pass a UTF-8 JSONL file") from None
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DiffclsError(f"{path} line {n + 1} is not JSON ({e.msg}); one object per line") from None
        if not isinstance(row, dict):
            raise DiffclsError(f"{path} line {n + 1} is not a JSON object; one object per line")
        missing = [c for c in REQUIRED if c not in row]
        if missing:
            raise DiffclsError(
                f"{path} line {n + 1} has no {', '.join(missing)}; every line needs {','.join(REQUIRED)} (and optionally tag)"
            )
        rows.append(row)
    return rows


def _check_keys(items: list[MatchItem], path) -> None:
    seen: set[str] = set()
    for it in items:
        if it.key in seen:
            raise DiffclsError(f"{path}: id {it.key} appears twice; give every item its own id")
        seen.add(it.key)


def _hf_items(path: Path) -> list[MatchItem]:
    """A local Winoground-format data set: `load_from_disk` folder or parquet file(s); no download.
    Parquet files are converted in a temporary cache (the user's data set cache is left alone)."""
    import tempfile

    try:
        import datasets
    except ImportError:
        raise missing_extra("datasets", "datasets") from None
    with tempfile.TemporaryDirectory(prefix="diffcls-parquet-") as cache:
        try:
            if path.is_dir() and not any(path.rglob("*.parquet")):
                ds = datasets.load_from_disk(str(path))
            else:
                files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
                ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
        except Exception as e:  # noqa: BLE001 - the library's many error types
            raise DiffclsError(f"cannot read the data set {path} ({type(e).__name__}: {e}); pass a save_to_disk folder or parquet files") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["test" if "test" in ds else next(iter(ds))]
        return _hf_rows(ds, path)


def _hf_rows(ds, path: Path) -> list[MatchItem]:
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise DiffclsError(f"the data set {path} has no column {', '.join(missing)}; Winoground's layout has {','.join(REQUIRED)}")
    tag_col = "collapsed_tag" if "collapsed_tag" in ds.column_names else ("tag" if "tag" in ds.column_names else None)
    items = []
    for n, row in enumerate(ds):
        images = [row["image_0"], row["image_1"]]
        if not all(hasattr(im, "tobytes") for im in images):
            raise DiffclsError(f"the data set {path} item {n + 1}: image_0/image_1 are not images; Winoground's layout stores images")
        for im in images:
            im.load()  # decoded now, while the data set's files exist
        key = str(row["id"]) if row.get("id") is not None else str(n)
        tag = str(row[tag_col]) if tag_col else ""
        it = MatchItem(key, images[0], images[1], str(row["caption_0"]), str(row["caption_1"]), tag)
        it.digests = (_image_digest(images[0]), _image_digest(images[1]))
        items.append(it)
    _check_keys(items, path)
    return items


# --- the schedule -----------------------------------------------------------------------------
@dataclass(frozen=True)
class MatchSchedule:
    """The timestep grid t = interval // 2 + k * interval < T (the reference's), noise draws per
    timestep, the loss, and (optionally) the sequential test that stops each comparison early."""

    t_interval: int = 5
    n_trials: int = 1
    loss: str = "l2"
    num_train_timesteps: int = 1000
    adaptive: AdaptiveSchedule | None = None

    def grid(self) -> list[int]:
        return list(range(self.t_interval // 2, self.num_train_timesteps, self.t_interval))

    def noise_bank_size(self) -> int:
        return len(self.grid()) * self.n_trials

    def validate(self, n_prompts: int = 1, num_train_timesteps: int | None = None) -> "MatchSchedule":
        T = self.num_train_timesteps
        if num_train_timesteps is not None and num_train_timesteps != T:
            raise DiffclsError(f"the schedule was made for {T} training timesteps, the model has {num_train_timesteps}")
        if not 1 <= self.t_interval <= T:
            raise DiffclsError(f"--t-interval {self.t_interval} must be between 1 and the model's {T} timesteps")
        if self.n_trials < 1:
            raise DiffclsError(f"--n-trials {self.n_trials} must be >= 1")
        if self.loss not in LOSSES:
            raise DiffclsError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.adaptive is not None:
            G = len(self.grid())
            if self.adaptive.max_samples > G:
                raise DiffclsError(
                    f"--max-samples {self.adaptive.max_samples} exceeds the {G} timesteps of --t-interval {self.t_interval}; use at most {G}"
                )
            self.adaptive.validate(2, T)
        return self

    def to_dict(self) -> dict:
        """The schedule as plain values: what a results file is bound to (`describe` is for people)."""
        plain = {name: getattr(self, name) for name in ("t_interval", "n_trials", "loss", "num_train_timesteps")}
        return {"kind": "match", **plain, "adaptive": None if self.adaptive is None else self.adaptive.to_dict()}

    def describe(self) -> str:
        text = f"match t_interval={self.t_interval} ({len(self.grid())} timesteps) n_trials={self.n_trials} loss={self.loss}"
        return text + (f" {self.adaptive.describe()}" if self.adaptive is not None else "")


# match --adaptive's test constants, chosen by `bench/match_replay.py` on 300 `train`-split
# quadruples of demo-shapes' world (never the reported heldout/novel items): alpha 0.5, n0 6 kept
# 99.39% of the comparisons equal to the full grid's at 22.3% of its UNet evaluations.
MATCH_ALPHA, MATCH_N0 = 0.5, 6


def adaptive_for_match(grid_size: int, **given) -> AdaptiveSchedule:
    """The sequential test of `match --adaptive`: `given` flags over match's defaults (at most the
    whole grid, no final stage: a comparison undecided at the end is the full-grid decision)."""
    given = dict(given)
    if "error_rate" in given:  # match's --error-rate is the comparison's test level: the test's alpha
        given["alpha"] = given.pop("error_rate")
    params = {"alpha": MATCH_ALPHA, "min_samples": MATCH_N0, "max_samples": grid_size, "final_samples": 0, **given}
    return AdaptiveSchedule(**params)


# --- the per-item policy (the Scorer's interface: done, phase, timesteps, next_block, feed, result)
class ItemPolicy:
    """All six arms of one item on one timestep grid; full grid, or a sequential test per comparison.

    `arms[a]` = (latent index, prompt row) for the Scorer. `order` lists the arms in evaluation
    order (canonical: by image digest and caption, so that a swapped item runs the same batches).
    """

    def __init__(self, arms, order: list[int], schedule: MatchSchedule, skip: set[str], offset: int = 0):
        self.arms = arms
        self.timesteps = schedule.grid()
        self.n_trials = schedule.n_trials
        self.order = order
        self.skip = skip  # comparisons decided without evaluation (ties)
        self.known: dict[tuple[int, int, int], float] = {}  # (arm, k, trial) -> error
        self.done = False
        self.phase = 0
        self.n_evals = 0
        self.tests: dict[str, SequentialPolicy] = {}
        self._blocks: dict[str, list] = {}
        self._handed: list = []
        params = schedule.adaptive
        if params is not None:
            G = len(self.timesteps)
            rot = offset % G
            self.positions = [(i + rot) % G for i in van_der_corput_order(G)]  # test position -> grid index k
            for name in COMPARISONS:
                if name not in skip:
                    self.tests[name] = SequentialPolicy(2, params, schedule.num_train_timesteps)

    def _arms_needed(self) -> set[int]:
        need = set()
        for name in COMPARISONS:
            if name not in self.skip:
                for side in _SIDES[name]:
                    need.update(side)
        return need

    def next_block(self) -> list[tuple[int, int, int]]:
        if self.done:
            return []
        if not self.tests:  # the full grid: one block of every needed arm at every (k, trial)
            if self._handed:
                self.done = True
                return []
            arms = [a for a in self.order if a in self._arms_needed()]
            block = [(a, k, j) for a in arms for k in range(len(self.timesteps)) for j in range(self.n_trials)]
            self._handed = block
            self.n_evals += len(block)
            if not block:
                self.done = True
            return block
        block = self._advance()
        self.n_evals += len(block)
        return block

    def _advance(self) -> list[tuple[int, int, int]]:
        """Feed every test whose current block is known; return the (arm, k, trial) still needed."""
        while True:
            need: dict[tuple[int, int, int], None] = {}
            progressed = False
            for name, test in self.tests.items():
                if test.done:
                    continue
                if name not in self._blocks:
                    self._blocks[name] = test.next_block()
                missing = [x for x in self._needs(name) if x not in self.known]
                if missing:
                    need.update(dict.fromkeys(missing))
                    continue
                block = self._blocks.pop(name)
                for side, pos, j in block:
                    k = self.positions[pos]
                    value = sum(c * self.known[(a, k, j)] for a, c in _SIDES[name][side].items())
                    test.feed(side, pos, j, value)
                progressed = True
            if need and not progressed:
                self.phase = 0 if min(t.r for t in self.tests.values() if not t.done) < self.params_n0() else 1
                rank = {a: i for i, a in enumerate(self.order)}
                return sorted(need, key=lambda x: (rank[x[0]], x[1], x[2]))
            if not need and not progressed:
                self.done = True
                return []

    def params_n0(self) -> int:
        return next(iter(self.tests.values())).n0

    def _needs(self, name: str) -> list[tuple[int, int, int]]:
        return [(a, self.positions[pos], j) for side, pos, j in self._blocks[name] for a in _SIDES[name][side]]

    def feed(self, arm: int, k: int, trial: int, error: float) -> None:
        self.known[(arm, k, trial)] = error

    def result(self) -> PolicyResult:  # the Scorer asks; an item has no single prediction
        return PolicyResult(0, list(range(len(ARMS))))

    # --- the item's outcome ------------------------------------------------------------------
    def arm_means(self) -> list[float | None]:
        sums, counts = [0.0] * len(ARMS), [0] * len(ARMS)
        for (a, _k, _j), e in self.known.items():
            sums[a] += e
            counts[a] += 1
        return [s / c if c else None for s, c in zip(sums, counts)]

    def decisions(self) -> dict[str, int]:
        """comparison -> 0 (the first side fits better), 1 (the second), -1 (a tie)."""
        out = {}
        for name in COMPARISONS:
            if name in self.skip:
                out[name] = -1
                continue
            if name in self.tests:
                test = self.tests[name]
                a, b = float(test.sums[0]), float(test.sums[1])
            else:  # the full grid: sums over the same (k, trial) samples
                a, b = (
                    sum(sum(c * self.known[(arm, k, j)] for arm, c in side.items()) for k in range(len(self.timesteps)) for j in range(self.n_trials))
                    for side in _SIDES[name]
                )
            out[name] = 0 if a < b else (1 if b < a else -1)
        return out


# --- results ----------------------------------------------------------------------------------
@dataclass
class ItemResult:
    key: str
    tag: str
    decisions: dict[str, int]  # comparison -> 0 / 1 / -1
    errors: list[float | None]  # mean error per arm (ARMS order)
    n_evals: int
    text_tie: bool = False
    image_tie: bool = False
    sha256: str = ""
    samples: list[tuple[int, int, int, float]] = field(default_factory=list)  # (arm, t, trial, error)
    offset: int = 0  # the rotation of the adaptive test's timestep order (`_item_offset`)

    @property
    def scores(self) -> dict[str, bool]:
        d = self.decisions
        text = d["text_0"] == 0 and d["text_1"] == 0
        image = d["image_0"] == 0 and d["image_1"] == 0
        norm = d["image_normalised_0"] == 0 and d["image_normalised_1"] == 0
        return {"text": text, "image": image, "image_normalised": norm, "group": text and image}

    def row(self) -> dict[str, str]:
        s = self.scores
        row = {"item": self.key, "tag": self.tag}
        row.update({f"error_{n}": "" if e is None else f"{e:.9g}" for n, e in zip(ARM_NAMES, self.errors)})
        row.update({k: str(int(v)) for k, v in s.items()})
        row.update({k: str(self.decisions[k]) for k in COMPARISONS})
        row["tie"] = ",".join(w for w, f in (("text", self.text_tie), ("image", self.image_tie)) if f)
        row["n_evals"] = str(self.n_evals)
        row["sha256"] = self.sha256
        return row

    @classmethod
    def from_row(cls, row: dict) -> "ItemResult":
        ties = set(filter(None, row["tie"].split(",")))
        errors = [float(row[f"error_{n}"]) if row[f"error_{n}"] else None for n in ARM_NAMES]
        return cls(
            key=row["item"],
            tag=row["tag"],
            decisions={k: int(row[k]) for k in COMPARISONS},
            errors=errors,
            n_evals=int(row["n_evals"]),
            text_tie="text" in ties,
            image_tie="image" in ties,
            sha256=row["sha256"],
        )


ARM_NAMES = ("c0_i0", "c1_i0", "empty_i0", "c0_i1", "c1_i1", "empty_i1")
MATCH_COLUMNS = (
    ["item", "tag"] + [f"error_{n}" for n in ARM_NAMES] + list(SCORES) + list(COMPARISONS) + ["tie", "n_evals", "sha256"]
)


class MatchResultsWriter(ResultsWriter):
    """`ResultsWriter` (lock, resume, one row per item, atomic appends) with one row per item."""

    base_columns = MATCH_COLUMNS

    @staticmethod
    def valid_row(row: dict) -> bool:
        try:
            ItemResult.from_row(row)
        except (KeyError, TypeError, ValueError, AttributeError):
            return False
        return bool(row.get("item")) and len(row.get("sha256") or "") == 64 and all(row[k] in ("0", "1", "-1") for k in COMPARISONS)

    def write_item(self, result: ItemResult) -> None:
        """One row; with --save-errors also the item's every (arm, t, trial, error) as a JSONL
        record (arms in ARM_NAMES order), e.g. to replay the adaptive test offline."""
        row = result.row()
        record = None
        if self.errors_path is not None:
            record = {"path": result.key, "item": result.key, "tag": result.tag, "tie": row["tie"], "sha256": result.sha256, "offset": result.offset, "arms": list(ARM_NAMES),
                      "errors": [[a, t, j, e] for a, t, j, e in result.samples]}
        self.commit(result.key, row, record)


# --- scoring ----------------------------------------------------------------------------------
def _chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _item_offset(item: MatchItem) -> int:
    """The item's rotation of the adaptive order: the same for a swapped item."""
    data = json.dumps([sorted(item.digests), sorted([item.caption_0, item.caption_1])])
    return int(hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest()[:16], 16)


def iter_match(
    clf,
    items: list[MatchItem],
    schedule: MatchSchedule,
    *,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    batch_size: int = 32,
    interpolation: str = "bicubic",
    workers: int = 2,
    chunk_size: int = 16,
    on_skip: Callable[[MatchItem, str], None] | None = None,
) -> Iterator[ItemResult]:
    """Score `items` with `clf` (a runtime.execution.classifier.Classifier); one ItemResult per item, in the
    order they finish. Items whose image cannot be read go to `on_skip(item, message)`."""
    from diffcls.runtime.algorithm.scoring import NonFiniteError, Scorer

    e = clf.engines
    schedule.validate(1, e.num_train_timesteps)
    bank = clf.noise_bank(schedule, seed, noise)
    for chunk in _chunks(items, chunk_size):
        latents = _chunk_latents(clf, chunk, interpolation, workers, on_skip)
        good = [it for it in chunk if (it.key, 0) in latents and (it.key, 1) in latents]
        if not good:
            continue
        texts = sorted({c for it in good for c in (it.caption_0, it.caption_1)} | {""})
        row = {t: i for i, t in enumerate(texts)}
        emb = clf.encode_prompts(texts)
        by_key = {it.key: it for it in good}
        policies: dict[str, ItemPolicy] = {}

        def factory(key, x0):
            it = by_key[key]
            caps = (it.caption_0, it.caption_1, "")
            arms = [(i, row[caps[c]]) for i, c in ARMS]
            order = sorted(range(len(ARMS)), key=lambda a: (it.digests[ARMS[a][0]], caps[ARMS[a][1]], ARMS[a][1] == 2))
            skip = set()
            if it.text_tie:
                skip |= {"text_0", "text_1"}
            if it.image_tie:
                skip |= {n for n in COMPARISONS if n.startswith("image")}
            policies[key] = ItemPolicy(arms, order, schedule, skip, _item_offset(it))
            return policies[key]

        scorer = Scorer(e.unet, emb, e.alphas_cumprod, schedule, bank, batch_size, prediction_type=e.prediction_type, sigmas=e.sigmas, policy_factory=factory)
        units = ((it.key, torch.stack([latents[(it.key, 0)], latents[(it.key, 1)]])) for it in good)
        try:
            for key, score in scorer.run(units):
                it, pol = by_key[key], policies.pop(key)
                yield ItemResult(
                    key=key, tag=it.tag, decisions=pol.decisions(), errors=pol.arm_means(), n_evals=score.n_evals,
                    text_tie=it.text_tie, image_tie=it.image_tie, sha256=it.sha256, samples=score.errors, offset=_item_offset(it),
                )
        except NonFiniteError as err:
            raise DiffclsError(err.message(f"item {err.key}")) from None
        clf.last_stats = scorer.stats


def _chunk_latents(clf, chunk: list[MatchItem], interpolation, workers, on_skip) -> dict[tuple[str, int], torch.Tensor]:
    """(item key, image index) -> latent for the chunk's images (each distinct image encoded once)."""
    sources, where = [], []
    for it in chunk:
        for i, im in enumerate((it.image_0, it.image_1)):
            sources.append(str(im) if isinstance(im, Path) else im)
            where.append((it.key, i))
    bad: dict[int, str] = {}

    def skipped(source, msg):
        for idx, s in enumerate(sources):
            if isinstance(s, str) and s == source:
                bad[idx] = msg

    out = {}
    for idx, _src, _digest, x0 in clf.iter_latents(sources, interpolation=interpolation, workers=workers, on_skip=skipped):
        out[where[idx]] = x0
    by_key = {it.key: it for it in chunk}
    reported = set()
    for idx, msg in bad.items():
        key = where[idx][0]
        out.pop((key, 0), None), out.pop((key, 1), None)
        if key not in reported:
            reported.add(key)
            if on_skip is None:
                raise DiffclsError(msg)
            on_skip(by_key[key], msg)
    return out


# --- metrics ----------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # the exact bounds hold p (0 at k = 0, 1 at k = n); rounding must not move them past it
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def _summary(results: list[ItemResult]) -> dict:
    n = len(results)
    out: dict = {"n": n}
    for name in SCORES:
        k = sum(r.scores[name] for r in results)
        out[name] = k / n if n else None
        out[f"{name}_correct"] = k
        out[f"{name}_ci95"] = list(wilson(k, n))
    out["text_ties"] = sum(r.text_tie for r in results)
    out["image_ties"] = sum(r.image_tie for r in results)
    out["evals_per_item"] = sum(r.n_evals for r in results) / n if n else None
    return out


def summarize(results: list[ItemResult]) -> dict:
    """{'overall': ..., 'by_tag': {tag: ...}}: n, each score as a fraction with its count and
    95% Wilson interval, the ties, UNet evaluations per item; and the chance levels."""
    tags = sorted({r.tag for r in results})
    return {
        "overall": _summary(results),
        "by_tag": {t: _summary([r for r in results if r.tag == t]) for t in tags},
        "chance": dict(CHANCE),
    }


def agreement(results: Iterable[ItemResult], reference: dict[str, ItemResult]) -> dict:
    """How often each comparison's decision equals the reference run's (e.g. the full grid) on
    the items both have: per comparison and over all, with the evaluations each spent."""
    pairs = [(r, reference[r.key]) for r in results if r.key in reference]
    per = {}
    for name in COMPARISONS:
        same = sum(a.decisions[name] == b.decisions[name] for a, b in pairs)
        per[name] = same / len(pairs) if pairs else None
    total = len(pairs) * len(COMPARISONS)
    same = sum(a.decisions[n] == b.decisions[n] for a, b in pairs for n in COMPARISONS)
    scores = {s: (sum(a.scores[s] == b.scores[s] for a, b in pairs) / len(pairs) if pairs else None) for s in SCORES}
    ev_a = sum(a.n_evals for a, _ in pairs)
    ev_b = sum(b.n_evals for _, b in pairs)
    return {
        "n_items": len(pairs),
        "comparisons": total,
        "agreement": same / total if total else None,
        "by_comparison": per,
        "score_agreement": scores,
        "evals_per_item": ev_a / len(pairs) if pairs else None,
        "reference_evals_per_item": ev_b / len(pairs) if pairs else None,
        "evals_fraction": ev_a / ev_b if ev_b else None,
    }


def summary_notes(summary: dict) -> list[str]:
    """The ties (counted as not correct) and the chance levels, a line each."""
    o = summary["overall"]
    ties = [f"ties (counted as not correct): {o['text_ties']} item(s) with identical captions, {o['image_ties']} with identical images"]
    return (ties if o["text_ties"] or o["image_ties"] else []) + [
        f"chance: text {100 * CHANCE['text']:.0f}%, image {100 * CHANCE['image']:.0f}%, group {100 * CHANCE['group']:.1f}%"]


def _pct(summary: dict, name: str) -> str:
    v = summary[name]
    if v is None:
        return "-"
    lo, hi = summary[f"{name}_ci95"]
    return f"{100 * v:.1f}\n({100 * lo:.0f}-{100 * hi:.0f})"  # two lines: 7 columns fit 80


def summary_view(summary: dict, schedule):
    """`summarize`'s scores as rich renderables (`rich.print(summary_view(summary, job.schedule))`):
    the schedule, a table per tag and overall with 95% intervals, what the columns mean, `summary_notes`."""
    from diffcls.render import lines, table

    rows = list(summary["by_tag"].items()) if len(summary["by_tag"]) > 1 else []
    cells = [(tag or "(no tag)", str(s["n"]), *(_pct(s, k) for k in ("text", "image", "image_normalised", "group")), f"{s['evals_per_item']:.0f}")
             for tag, s in rows + [("overall", summary["overall"])]]
    scores = table(("tag", "n", "text", "image", "img norm", "group", "evals"), cells, left=("tag",),
                   title="% of items correct (95% Wilson interval)", show_lines=True)
    return lines(schedule.describe(), scores, "img norm: the image score with each image's error under the empty prompt subtracted; evals: UNet evaluations per item",
                 *summary_notes(summary))


def agreement_line(a: dict, reference) -> str:
    """`agreement`'s numbers with the `reference` results file in a line."""
    if not a["n_items"]:
        return f"--compare {reference}: no item in common"
    return (f"agreement with {reference}: {100 * a['agreement']:.2f}% of {a['comparisons']} comparisons on {a['n_items']} items, "
            f"at {a['evals_per_item']:.0f} vs {a['reference_evals_per_item']:.0f} UNet evals/item ({100 * a['evals_fraction']:.1f}%)")


def plot_scores(summary: dict, path: str | Path, title: str = "") -> None:
    """Bar chart of the text, image (raw, normalised) and group scores per tag (and overall),
    with their 95% Wilson intervals and the chance levels (needs matplotlib: the plot extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_extra("matplotlib", "plot") from None
    groups = [(t, s) for t, s in summary["by_tag"].items()] + [("overall", summary["overall"])]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups)), 4))
    width = 0.8 / len(SCORES)
    for i, name in enumerate(SCORES):
        xs = [g + (i - (len(SCORES) - 1) / 2) * width for g in range(len(groups))]
        vals = [s[name] or 0.0 for _, s in groups]
        lo = [max(0.0, v - s[f"{name}_ci95"][0]) for v, (_, s) in zip(vals, groups)]  # rounding: never below 0
        hi = [max(0.0, s[f"{name}_ci95"][1] - v) for v, (_, s) in zip(vals, groups)]
        ax.bar(xs, vals, width, yerr=[lo, hi], capsize=3, label=name.replace("_", " "))
    for name, style in (("text", ":"), ("group", "--")):
        ax.axhline(CHANCE[name], color="grey", linestyle=style, linewidth=0.8, label=f"chance ({name})")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{t or '(none)'}\nn={s['n']}" for t, s in groups])
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of items correct")
    ax.set_title(title)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    from diffcls.runtime.results.outputs import save_figure

    try:
        save_figure(fig, path)  # in one piece: a full disk leaves no empty PNG
    finally:
        plt.close(fig)


def read_results(path: Path) -> dict:
    """{item: ItemResult} of a match results CSV (`match --compare`)."""
    import csv

    try:
        rows = list(csv.DictReader(path.open(encoding="utf-8", errors="surrogateescape", newline="")))
    except OSError as e:
        raise DiffclsError(f"--compare {path} cannot be read ({e.strerror or e}); pass a match --out file") from None
    if rows and list(rows[0])[: len(MATCH_COLUMNS)] != list(MATCH_COLUMNS):
        raise DiffclsError(f"--compare {path} is not a match results file (unexpected columns); pass a match --out file")
    return {r["item"]: ItemResult.from_row(r) for r in rows if MatchResultsWriter.valid_row(r)}
