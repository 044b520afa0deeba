"""Which images a run classifies, the key each result is stored under, and each image's label.

Inputs are what the ecosystem passes around:

    diffcls classify photos/                      a folder (searched recursively) or one image
    diffcls classify a.png b/ 'c/*.jpg'           several paths; globs the shell did not expand
                                                  (`*`, `?`, `[..]`, `**`) are expanded here
    diffcls classify --list files.txt             one path per line (blank and # lines skipped)
    diffcls evaluate --list data.csv              a CSV with a `path` column and optional `label`
    diffcls evaluate --list data/metadata.csv     a Hugging Face `imagefolder` metadata file:
                                                  `file_name` (and optional `label`) columns

URLs are refused: diffcls reads local files only. `Inputs.select` takes the first N (`--limit`)
or a seeded random N (`--sample`) of the images, in run order.

Relative paths in a list file are read relative to the list file's folder, so a list works from
any working directory.

Result key (the CSV's `path` column, what a rerun resumes by): the image's path relative to
the *root*, with `/` separators. With one folder, the root is that folder (`cat/1.png`); with
one image, its folder (`1.png`); with several inputs or a list, the deepest folder that holds
them all (`a.png`, `b/x.png`, `c/y.jpg` for the example above). Keys are unique: an image named
twice is classified once.

Labels (for `evaluate`): an image under a folder argument is labeled by the subfolder of that
folder it lies in (`data/cat/1.png` under `data/` -> `cat`); a list CSV's `label` column labels
its rows. An image given directly (a file, a glob match) or lying directly in a folder argument
has no label.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from diffcls.errors import DiffclsError
from diffcls.runtime.data.preprocess import IMAGE_SUFFIXES, find_images

_GLOB_CHARS = set("*?[")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _refuse_url(value: str, where: str = "") -> None:
    if _URL.match(value):
        raise DiffclsError(f"{where}{value}: URLs are not supported; download the images and pass their folder or files")


@dataclass
class Inputs:
    images: list[Path]  # in run order (each argument's images sorted, arguments in the order given)
    keys: dict[Path, str]  # image -> result key, relative to `root`
    root: Path
    labels: dict[str, str] = field(default_factory=dict)  # key -> raw label text (folder name or CSV label)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (folder, message): unreadable subfolders, skipped
    args: list[str] = field(default_factory=list)  # the arguments, absolute (see `spec`)
    list_file: str | None = None  # --list, absolute
    selection: dict = field(default_factory=dict)  # --limit / --sample (and its seed), if given (see `select`)
    named: list[str] = field(default_factory=list)  # the inputs as given, for messages ("a/, --list b.txt")

    def __len__(self) -> int:
        return len(self.images)

    def select(self, limit: int | None = None, sample: int | None = None, seed: int = 0) -> "Inputs":
        """`sample` images drawn at random (seeded: `seed`; a larger sample of the same seed
        holds the smaller one, so a rerun with more resumes), then the first `limit`; both keep
        the run order. Keys and the root do not change, so results stay comparable."""
        images = list(self.images)
        if sample is not None and sample < len(images):
            order = list(range(len(images)))
            random.Random(seed).shuffle(order)
            images = [images[i] for i in sorted(order[:sample])]
        if limit is not None:
            images = images[:limit]
        keys = {p: self.keys[p] for p in images}
        kept = set(keys.values())
        labels = {k: v for k, v in self.labels.items() if k in kept}
        chosen = {"limit": limit, "sample": sample, "seed": seed if sample is not None else None}
        return replace(self, images=images, keys=keys, labels=labels, selection={k: v for k, v in chosen.items() if v is not None})

    def spec(self) -> dict:
        """What names this input set, independent of the working directory (a shard run records
        it, so that `merge` checks the shards against the same images)."""
        return {"paths": list(self.args), "list": self.list_file, **self.selection}


def inputs_of(spec: dict) -> "Inputs":
    """The Inputs a recorded `Inputs.spec()` names now."""
    inputs = collect_inputs(spec.get("paths") or [], Path(spec["list"]) if spec.get("list") else None)
    if spec.get("limit") is not None or spec.get("sample") is not None:
        inputs = inputs.select(spec.get("limit"), spec.get("sample"), spec.get("seed") or 0)
    return inputs


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()


def _expand(arg: str, problems: list) -> list[tuple[Path, Path | None]]:
    """(image, the folder argument it was found under or None) for one command-line argument;
    subfolders that cannot be read are added to `problems` and skipped."""

    def on_problem(folder, msg):
        problems.append((folder, msg))

    _refuse_url(arg)
    path = Path(arg)
    if not path.exists() and _GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        found: list[tuple[Path, Path | None]] = []
        for m in map(Path, matches):
            if m.is_dir():
                try:
                    found += [(p, m) for p in find_images(m, on_problem=on_problem)]
                except DiffclsError:
                    continue  # a matched folder without images: the pattern as a whole is judged
            elif _is_image(m):
                found.append((m, None))
        if not found:
            raise DiffclsError(f"{arg!r} matches no image ({', '.join(sorted(IMAGE_SUFFIXES))}); check the pattern")
        return found
    images = find_images(path, on_problem=on_problem)  # a one-line error for a missing path, a non-image, an empty folder
    return [(p, path if path.is_dir() else None) for p in images]


def read_list(list_file: Path) -> list[tuple[Path, str | None]]:
    """(path, label or None) per entry of a text list, a CSV with a `path` column, or a Hugging
    Face imagefolder `metadata.csv` (`file_name` column)."""
    try:
        text = Path(list_file).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DiffclsError(f"--list {list_file} does not exist; pass a text file of image paths or a CSV with a path column") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DiffclsError(f"cannot read --list {list_file} ({e}); pass a UTF-8 text file of image paths") from None
    base = Path(list_file).parent
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    header = [h.strip().lower() for h in next(csv.reader([first]), [])]
    entries: list[tuple[str, str | None, int]] = []
    column = "path" if "path" in header else "file_name" if "file_name" in header else None
    if column is not None:  # a CSV: path[,label][,...], or imagefolder's file_name[,label][,...]
        reader = csv.DictReader(io.StringIO(text))
        reader.fieldnames = [h.strip().lower() for h in reader.fieldnames or []]
        for row in reader:
            value = (row.get(column) or "").strip()
            if value:
                label = (row.get("label") or "").strip() if "label" in header else ""
                entries.append((value, label or None, reader.line_num))
    else:
        for n, line in enumerate(lines, 1):
            value = line.strip()
            if value and not value.startswith("#"):
                entries.append((value, None, n))
    if not entries:
        raise DiffclsError(f"--list {list_file} names no image; write one path per line, or a CSV with a path (or file_name) column")
    out, missing = [], []
    for value, label, n in entries:
        _refuse_url(value, f"--list {list_file} line {n}: ")
        p = Path(value).expanduser()
        p = p if p.is_absolute() else base / p
        if not _is_image(p):
            missing.append((n, value, p.exists()))
        out.append((p, label))
    if missing:
        n, value, exists = missing[0]
        why = "is not an image file" if exists else "does not exist"
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DiffclsError(
            f"--list {list_file} line {n}: {value} {why}{more}; relative paths are read from {base or '.'}/, fix or remove the entries"
        )
    return out


def collect_inputs(args: Sequence[str | Path] = (), list_file: Path | None = None, exclude: Sequence = ()) -> Inputs:
    """The images named by command-line arguments and/or a list file, with keys and labels.

    `exclude`: files the run itself writes (e.g. evaluate's --plot PNG inside the input folder),
    left out so that a rerun does not classify its own outputs."""
    own = {os.path.realpath(p) for p in exclude if p is not None}
    if not args and list_file is None:
        raise DiffclsError("no images given; pass image files, folders or globs, or --list FILE")
    found: list[tuple[Path, Path | None, str | None]] = []  # (image, folder argument, list label)
    problems: list[tuple[str, str]] = []
    for arg in args:
        found += [(p, under, None) for p, under in _expand(str(arg), problems)]
    if list_file is not None:
        found += [(p, None, label) for p, label in read_list(list_file)]

    arg = Path(args[0]) if len(args) == 1 and list_file is None else None
    if arg is not None and arg.exists():  # one folder or image: keys relative to it / its folder
        root = arg if arg.is_dir() else arg.parent
    else:
        tops = [os.path.abspath(under if under is not None else p.parent) for p, under, _ in found]
        root = Path(os.path.commonpath(tops))
    images, keys, labels, seen = [], {}, {}, set()
    for p, under, label in found:
        real = os.path.abspath(p)
        if real in seen or os.path.realpath(p) in own:
            continue  # named twice (two globs, a folder and a file in it): classified once
        seen.add(real)
        key = Path(os.path.relpath(real, os.path.abspath(root))).as_posix()
        images.append(p)
        keys[p] = key
        if label is not None:
            labels[key] = label
        elif under is not None:
            parts = Path(os.path.relpath(real, os.path.abspath(under))).parts
            if len(parts) > 1:
                labels[key] = parts[0]
    named = [str(a) for a in args] + ([f"--list {list_file}"] if list_file is not None else [])
    return Inputs(images=images, keys=keys, root=root, labels=labels, problems=problems, named=named,
                  args=[os.path.abspath(str(a)) for a in args], list_file=None if list_file is None else os.path.abspath(list_file))


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def check_run_numbers(seed: int, image_size: int | None) -> None:
    """Refuse, before any work, a seed the noise generator cannot take and an image size whose
    S x S image could not be held (the bound on decoded images, MAX_PIXELS)."""
    from diffcls.runtime.data.preprocess import MAX_PIXELS

    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise DiffclsError(f"--seed {seed} is out of range; pass an integer from 0 to {SEED_RANGE[1]}")
    if image_size is not None and image_size * image_size > MAX_PIXELS:
        side = int(MAX_PIXELS**0.5)
        raise DiffclsError(f"--image-size {image_size} is too large (at most {side}); the model's own size is the default: drop --image-size")

