"""Shards by hand: `classify --shard I/N` takes a share of a folder, `diffcls merge` joins them.

An image belongs to shard `sha256(path relative to the folder) mod N`, so the split depends on
nothing but the image's own name: adding files never moves the others, and every machine
computes the same split without talking to the others. This is the official code's
`--worker_idx I --n_workers N`, with a split that survives a changing folder and a merge that
checks coverage.

`diffcls merge OUT.csv SHARD.csv...` checks, before anything is written: every shard file was written with the same settings (model,
prompts, schedule, seed, ... as in `<csv>.settings.json`) and with `--shard I/N` for the same N;
each of the N shards is given once; every row belongs to the shard that wrote it; every image
appears exactly once; and, when the folder is known, every image in it has a row. The merged
file is what one process would have written (same columns, settings without the shard), so it
can be resumed with `classify FOLDER --out MERGED.csv`. `--save-errors` files merge the same way:
one record per merged row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from diffcls.errors import DiffclsError
from diffcls.runtime.results.writer import _csv_line, _valid_row, atomic_write_text, normalised_settings

ENCODING = {"encoding": "utf-8", "errors": "surrogateescape"}  # file names are arbitrary bytes
SHOW = 5  # names shown per problem


# --- the split ---------------------------------------------------------------------------------
def parse_shard(text: str) -> tuple[int, int]:
    """'1/4' -> (1, 4): shard index I (0-based) of N shards."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise DiffclsError(f"--shard {text!r} must be I/N, e.g. --shard 0/4 (shard I of N, counting from 0)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise DiffclsError(f"--shard {text}: I must be 0 to N-1 and N at least 1, e.g. --shard 0/{max(n, 2)}")
    return i, n


def shard_of(key: str, n: int) -> int:
    """The shard (0..n-1) of the image whose path relative to the folder is `key`."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % n


# --- merging --------------------------------------------------------------------------------
def settings_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.name + ".settings.json")


@dataclass
class Shard:
    path: Path
    settings: dict
    index: int
    count: int
    header: list[str]
    rows: list[tuple[str, list[str]]]  # (path key, fields) of the well-formed rows
    malformed: int = 0  # rows dropped: cut, edited, or not what classify writes


@dataclass
class MergeReport:
    """What `merge` found; `problems` empty means the shards cover the images exactly once."""

    n_rows: int = 0
    n_images: int | None = None  # images in the folder, when it was listed
    missing: dict[int, list[str]] = field(default_factory=dict)  # shard -> image keys without a row
    duplicated: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why classify skipped an image (it cannot be decoded)


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        text = path.read_bytes().decode(**ENCODING)
    except OSError as e:
        raise DiffclsError(f"cannot read {path} ({e.strerror or e}); pass the shard's --out file") from None
    if not text.endswith("\n"):  # a row cut short by a killed run: that image is not done
        text = text[: text.rfind("\n") + 1]
    records = list(csv.reader(io.StringIO(text, newline="")))
    if not records:
        raise DiffclsError(f"{path} is empty; pass the --out file of a `diffcls classify --shard` run")
    return records[0], [r for r in records[1:] if r]


def read_shard(path: Path) -> Shard:
    path = Path(path)
    sp = settings_path(path)
    try:
        settings = normalised_settings(json.loads(sp.read_text(**ENCODING)))
    except FileNotFoundError:
        raise DiffclsError(f"{path} has no {sp.name} beside it; pass the --out file of a `diffcls classify --shard` run") from None
    except (OSError, json.JSONDecodeError) as e:
        raise DiffclsError(f"cannot read {sp} ({e}); rerun that shard") from None
    if "shard" not in settings:
        raise DiffclsError(f"{path} was not written with --shard I/N; merge takes the results files of shard runs")
    index, count = parse_shard(settings["shard"])
    header, rows = _read_rows(path)
    if not header or header[0] != "path":
        raise DiffclsError(f"{path} is not a diffcls results file (unexpected header)")
    good = [r for r in rows if len(r) == len(header) and _valid_row(dict(zip(header, r)))]
    return Shard(path, settings, index, count, header, [(r[0], r) for r in good], malformed=len(rows) - len(good))


def _names(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:SHOW])
    return shown + (f" and {len(keys) - SHOW} more" if len(keys) > SHOW else "")


def expected_images(settings: dict, folder: Path | None = None) -> dict[str, Path] | None:
    """{key: image path} of the images the shards should cover: those under `folder` if given,
    else the run's own inputs (recorded by `classify --shard`), else those under its root; None
    when none of these is known."""
    from diffcls.runtime.data.inputs import collect_inputs, inputs_of

    if folder is None and isinstance(settings.get("inputs"), dict):
        try:
            inputs = inputs_of(settings["inputs"])
        except DiffclsError as e:
            raise DiffclsError(f"the shards' inputs cannot be listed here ({e}); pass --folder with the same images to check coverage") from None
        return {key: path for path, key in inputs.keys.items()}
    root = folder if folder is not None else settings.get("root")
    if root is None:
        return None
    root = Path(root)
    if not root.exists():
        raise DiffclsError(f"the shards classified {root}, which is not here; pass --folder with the same images to check coverage")
    inputs = collect_inputs([root])
    return {key: path for path, key in inputs.keys.items()}


def unreadable(path: Path) -> str | None:
    """Why `classify` skips this image (it cannot be read or decoded), else None."""
    from diffcls.runtime.data.preprocess import BadImage, open_image

    try:
        open_image(path)
    except BadImage as e:
        return str(e)
    except (OSError, MemoryError) as e:
        return f"{path}: {getattr(e, 'strerror', None) or type(e).__name__}"
    return None


def check_shards(shards: list[Shard], images: "dict[str, Path] | list[str] | None") -> MergeReport:
    """Refuse mixed settings (DiffclsError); report missing and duplicated images (`images`:
    the keys the shards should cover, with their paths when known: a missing image that cannot
    be decoded was skipped by classify, and is reported as such, not as work left to do)."""
    if not shards:
        raise DiffclsError("give the shard results files to merge, e.g. diffcls merge all.csv part0.csv part1.csv")
    first = shards[0]
    base = {k: v for k, v in first.settings.items() if k != "shard"}
    for s in shards[1:]:
        other = {k: v for k, v in s.settings.items() if k != "shard"}
        changed = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
        if changed:
            detail = "; ".join(f"{k}: {base.get(k)!r} vs {other.get(k)!r}" for k in changed[:3])
            raise DiffclsError(
                f"{s.path} was written with other settings than {first.path} ({detail}); "
                "rerun that shard with the same options"
            )
        if s.count != first.count:
            raise DiffclsError(f"{s.path} is shard {s.settings['shard']} but {first.path} is shard {first.settings['shard']}; all shards must split into the same N")
        if s.header != first.header:
            raise DiffclsError(f"{s.path} has other columns than {first.path} (another diffcls version?); rerun that shard")
    n = first.count
    report = MergeReport()
    by_index: dict[int, list[Shard]] = {}
    for s in shards:
        by_index.setdefault(s.index, []).append(s)
    for i, given in sorted(by_index.items()):
        if len(given) > 1:
            raise DiffclsError(f"shard {i}/{n} is given {len(given)} times ({', '.join(str(g.path) for g in given)}); pass each shard once")
    absent = [i for i in range(n) if i not in by_index]
    if absent:
        report.problems.append(
            f"shard{'s' if len(absent) > 1 else ''} {', '.join(f'{i}/{n}' for i in absent)} missing: run "
            f"`diffcls classify FOLDER --shard {absent[0]}/{n} --out ...` with the same options and pass its file"
        )
    for s in shards:
        if s.malformed:
            report.problems.append(
                f"{s.path} has {s.malformed} malformed row(s), left out; rerun its classify command to recompute them"
            )
    seen: dict[str, int] = {}
    for s in shards:
        for key, _ in s.rows:
            if shard_of(key, n) != s.index:
                raise DiffclsError(f"{s.path} has a row for {key!r}, which belongs to shard {shard_of(key, n)}/{n}, not {s.index}/{n}; was it edited?")
            seen[key] = seen.get(key, 0) + 1
    report.duplicated = sorted(k for k, c in seen.items() if c > 1)
    report.n_rows = len(seen)
    if report.duplicated:
        report.problems.append(f"{len(report.duplicated)} images have more than one row: {_names(report.duplicated)}")
    if images is not None:
        report.n_images = len(images)
        paths = images if isinstance(images, dict) else {}
        for key in images:
            if key not in seen:
                # decoded only for shards that ran (an absent shard's images are simply missing)
                why = unreadable(paths[key]) if key in paths and shard_of(key, n) in by_index else None
                if why is not None:
                    report.skipped.append(why)
                else:
                    report.missing.setdefault(shard_of(key, n), []).append(key)
        for i, keys in sorted(report.missing.items()):
            if i in by_index:
                report.problems.append(
                    f"shard {i}/{n} ({by_index[i][0].path}) lacks {len(keys)} images: {_names(keys)}; "
                    "rerun its classify command to resume it"
                )
        extra = sorted(set(seen) - set(images))
        if extra:
            report.problems.append(f"{len(extra)} rows are for images no longer in the folder: {_names(extra)}")
    return report


def merge_errors(shard_errors: list[Path], keys: dict[str, list[str]], header: list[str]) -> str:
    """The JSONL text with one record per merged row (in row order), from the shards' files."""
    sha_col = header.index("sha256") if "sha256" in header else None
    records: dict[str, str] = {}
    for path in shard_errors:
        try:
            text = Path(path).read_bytes().decode(**ENCODING)
        except OSError as e:
            raise DiffclsError(f"cannot read --errors {path} ({e.strerror or e})") from None
        for line in text.split("\n")[:-1] if text else []:  # a torn last line is dropped
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            key = rec.get("path") if isinstance(rec, dict) else None
            row = keys.get(key) if isinstance(key, str) else None
            if row is None:
                continue  # no row vouches for it (a run killed between the two writes)
            if sha_col is not None and rec.get("sha256") != row[sha_col]:
                continue
            records[key] = line
    missing = [k for k in keys if k not in records]
    if missing:
        raise DiffclsError(
            f"the --errors files have no record for {len(missing)} merged images ({_names(missing)}); "
            "pass every shard's --save-errors file"
        )
    return "".join(records[k] + "\n" for k in keys)


def write_merged(out: Path, shards: list[Shard], errors_out: Path | None = None, shard_errors: list[Path] | None = None) -> int:
    """Write OUT (rows sorted by path) and its settings; with errors_out, the merged JSONL too."""
    from diffcls.runtime.results.outputs import check_distinct, check_output

    inputs = {s.path.resolve() for s in shards} | {Path(p).resolve() for p in shard_errors or []}
    for target in (out, errors_out):
        if target is not None and Path(target).resolve() in inputs:
            raise DiffclsError(f"{target} is one of the files being merged; write the merged file to a new path")
    check_distinct(("OUT", out), ("its settings", settings_path(Path(out))), ("--save-errors", errors_out))
    check_output(out, "OUT", "results", stream=False)  # resumable: never a user's file, a device, a pipe
    check_output(errors_out, "--save-errors", "errors", stream=False)
    rows: dict[str, list[str]] = {}
    for s in shards:
        for key, fields in s.rows:
            rows.setdefault(key, fields)
    rows = dict(sorted(rows.items()))
    errors_text = None
    if errors_out is not None:
        errors_text = merge_errors(shard_errors or [], rows, shards[0].header)
    # the same writer as classify's (the path always quoted: a name may hold \r), so a resume reads every row back
    text = _csv_line(shards[0].header, quote_first=False) + "".join(_csv_line(f) for f in rows.values())
    settings = {k: v for k, v in shards[0].settings.items() if k not in ("shard", "inputs")}
    if errors_text is not None:
        atomic_write_text(errors_out, errors_text)
    atomic_write_text(settings_path(out), json.dumps(settings, indent=2, sort_keys=True))
    atomic_write_text(out, text)
    return len(rows)


def merge_shards(shards: list[Path], out: Path, *, folder: Path | None = None, errors_out: Path | None = None,
                 shard_errors: list[Path] | None = None, allow_missing: bool = False, say=None) -> tuple[int, MergeReport]:
    """`diffcls merge`: read the shards, check that they cover the images (of `folder`, default
    the one their settings name) exactly once, and write OUT (`write_merged`); returns (images
    written, the report). `say(kind, line)` hears each finding first ("skipped", "problem",
    "note"); duplicates, or gaps without `allow_missing`, are then refused and nothing is written."""
    say = say or (lambda kind, line: None)
    if (errors_out is None) != (not shard_errors):
        raise DiffclsError("--save-errors MERGED.jsonl and --errors SHARD.jsonl (once per shard) go together; give both or neither")
    parts = [read_shard(p) for p in shards]
    images = expected_images(parts[0].settings, folder)
    report = check_shards(parts, images)
    for line in report.skipped:
        say("skipped", line)
    for line in report.problems:
        say("problem", line)
    if report.duplicated:
        raise DiffclsError(f"{len(report.duplicated)} images have more than one row in the shard files (see above); pass each shard's file once; {out} was not written")
    if report.problems and not allow_missing:
        raise DiffclsError(f"the shards do not cover every image (see above); finish the missing shards, or pass --allow-missing; {out} was not written")
    if images is None:
        say("note", "the folder is unknown, so coverage was checked by shard only; pass --folder to check every image")
    return write_merged(out, parts, errors_out, shard_errors), report
