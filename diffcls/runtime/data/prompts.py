"""Class prompts: the reference CSV format (`prompt,classname,classidx`) or a class list + template.

Several prompts may share a classidx (prompt ensembles); scoring runs over prompts, and the
prediction is the class of the winning prompt. A prompt's index is its row in the file (0-based,
header excluded).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from diffcls.errors import DiffclsError

DEFAULT_TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    classnames: tuple[str, ...]  # per prompt
    classidx: tuple[int, ...]  # per prompt

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def classes(self) -> dict[int, str]:
        """classidx -> classname, in first-seen order."""
        out: dict[int, str] = {}
        for name, idx in zip(self.classnames, self.classidx):
            out.setdefault(idx, name)
        return out

    def to_dict(self) -> dict:
        return {"prompts": list(self.prompts), "classnames": list(self.classnames), "classidx": list(self.classidx)}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptSet":
        return cls(tuple(d["prompts"]), tuple(d["classnames"]), tuple(int(i) for i in d["classidx"]))

    def digest(self) -> str:
        h = hashlib.sha256()
        for row in zip(self.prompts, self.classnames, self.classidx):
            h.update(repr(row).encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_classes(cls, classes: list[str] | str, template: str = DEFAULT_TEMPLATE) -> "PromptSet":
        if isinstance(classes, str):
            classes = classes.split(",")
        names = [c.strip() for c in classes]
        if not names or any(not n for n in names):
            raise DiffclsError('--classes has an empty name; give comma-separated names, e.g. --classes "cat,dog"')
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise DiffclsError(f"--classes names {', '.join(dupes)} more than once; give each class once")
        if "{}" not in template:
            raise DiffclsError(f'--template {template!r} has no {{}} for the class name, e.g. "a photo of a {{}}."')
        try:
            texts = tuple(template.format(n) for n in names)
        except (KeyError, IndexError, ValueError) as e:
            raise DiffclsError(
                f"--template {template!r} has a field other than {{}} ({type(e).__name__}: {e}); "
                'use {} for the class name and double any other brace, e.g. "a photo of a {}."'
            ) from None
        return cls(texts, tuple(names), tuple(range(len(names))))

    @classmethod
    def from_labels(cls, id2label: dict[int, str], classes: list[str] | str | None = None) -> "PromptSet":
        """A class-conditional model's classes: the prompt is the class id ("207"), the class name
        its label's first synonym ("tench" of "tench, Tinca tinca"). `classes` picks a subset by
        id or by name (any synonym), in the order given; default: every class, by id."""
        labels = {int(k): str(v) for k, v in sorted(id2label.items())}
        short = {i: v.split(",")[0].strip() or str(i) for i, v in labels.items()}
        if classes is None:
            chosen = list(labels)
        else:
            items = [c.strip() for c in (classes.split(",") if isinstance(classes, str) else classes)]
            if not items or any(not c for c in items):
                raise DiffclsError('--classes has an empty entry; give comma-separated class ids or names, e.g. --classes "3,seven"')
            by_name: dict[str, int] = {}
            for i, text in labels.items():
                for name in [text, *text.split(",")]:
                    by_name.setdefault(name.strip(), i)
            chosen = []
            for c in items:
                i = int(c) if c.isdigit() and int(c) in labels else by_name.get(c)
                if i is None:
                    examples = ", ".join(f"{k} ({short[k]})" for k in list(labels)[:3])
                    raise DiffclsError(
                        f"--classes: {c!r} is not a class of this model; use ids 0..{max(labels)} or names, e.g. {examples}"
                    )
                if i in chosen:
                    raise DiffclsError(f"--classes names class {i} ({short[i]}) more than once; give each class once")
                chosen.append(i)
        return cls(tuple(str(i) for i in chosen), tuple(short[i] for i in chosen), tuple(chosen))

    @classmethod
    def from_csv(cls, path: str | Path) -> "PromptSet":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise DiffclsError(f"prompts file {path} does not exist; pass a CSV with columns prompt,classname,classidx") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DiffclsError(f"cannot read prompts file {path} ({e}); it must be a UTF-8 CSV") from None
        rows = list(csv.reader(text.splitlines()))
        rows = [r for r in rows if any(c.strip() for c in r)]
        if not rows:
            raise DiffclsError(f"prompts file {path} is empty; it needs a header prompt,classname,classidx and one row per prompt")
        header = [c.strip().lower() for c in rows[0]]
        need = ("prompt", "classname", "classidx")
        if not all(n in header for n in need):
            raise DiffclsError(
                f"prompts file {path} has header {','.join(rows[0])}; it must have the columns prompt,classname,classidx"
            )
        col = {n: header.index(n) for n in need}
        prompts, names, idxs = [], [], []
        name_of: dict[int, str] = {}
        idx_of: dict[str, int] = {}
        seen_prompt: dict[str, int] = {}
        for line, row in enumerate(rows[1:], start=2):
            if len(row) != len(header):
                raise DiffclsError(
                    f"{path} line {line} has {len(row)} fields, the header has {len(header)}; quote prompts that contain commas"
                )
            prompt, name, raw = (row[col[n]].strip() for n in need)
            if not prompt or not name:
                raise DiffclsError(f"{path} line {line} has an empty prompt or classname; fill it in or remove the line")
            try:
                idx = int(raw)
            except ValueError:
                raise DiffclsError(f"{path} line {line}: classidx {raw!r} is not an integer") from None
            if name_of.setdefault(idx, name) != name:
                raise DiffclsError(
                    f"{path} line {line}: classidx {idx} is named both {name_of[idx]!r} and {name!r}; use one name per classidx"
                )
            if idx_of.setdefault(name, idx) != idx:
                raise DiffclsError(
                    f"{path} line {line}: class name {name!r} has classidx {idx_of[name]} and {idx}; class names must be unique"
                )
            if prompt in seen_prompt:
                raise DiffclsError(f"{path} line {line} repeats the prompt of line {seen_prompt[prompt]}; remove the duplicate")
            seen_prompt[prompt] = line
            prompts.append(prompt)
            names.append(name)
            idxs.append(idx)
        if not prompts:
            raise DiffclsError(f"prompts file {path} has a header but no prompts; add one row per prompt")
        return cls(tuple(prompts), tuple(names), tuple(idxs))
