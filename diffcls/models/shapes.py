"""A procedural compositional world: coloured shapes and their relations, drawn exactly from a seed.

The `demo-shapes` model is trained on it and `diffcls shapes` writes it to disk. A scene holds one
or two objects on a plain dark background, 32x32 RGB:

- shapes: circle, square, triangle, diamond, cross; colours: red, green, blue, yellow, purple,
  cyan (saturated and far apart); sizes: small (11 px across) and large (18 px). A single
  object sits anywhere it fits; its captions are "a small red circle" and "a red circle".
- two objects are both small, have different shapes and colours, and stand side by side
  (`left of` / `right of`) or one over the other (`above` / `below`), offset at most 3 px across
  the relation's axis so the relation is unambiguous. A scene lists its objects in caption order
  with the relation of the first to the second: "a red circle left of a blue square"; the
  converse "a blue square right of a red circle" describes the same image.

Splits, fixed by the generator (the seed draws scenes, it never moves the splits):

- `novel`: every scene holding one of `NOVEL_PAIRS` (a colour-shape pair: "yellow circle" ...)
  or one of `NOVEL_ARRANGEMENTS` (two shapes side by side, or one over the other, in either
  order: a circle beside a square ...). Training never shows one.
- every other scene is `heldout` when a hash of its exact content (shapes, colours, sizes,
  pixel positions; the same for both captions of an image) falls in 1 of `HELDOUT_MODULUS`
  buckets, else `train`. So train and heldout share every composition but never an image.

Drawing is pure numpy: each object's coverage of a pixel is measured on a 4x4 sub-pixel grid
(anti-aliased edges), then colours are mixed over the background and rounded to 8 bits. No
font, no random state outside the per-scene generator `numpy.random.default_rng([seed, split,
stream, index])`, so a scene depends only on (seed, split, kind, index), never on `limit`.

`write_shapes(DIR, split)` writes `DIR/classes/<colour>_<shape>/` (single-object scenes, one
folder per class: the 24 seen colour-shape pairs for train/heldout, the 6 novel ones for
novel), `DIR/quadruples.csv` with its images under `DIR/quadruples/` (Winoground-style items:
`image_0,image_1,caption_0,caption_1,tag` with tag attribute / object / relation, both images
of an item in the split), `DIR/scenes.csv` (every written image: its objects, relation and
captions) and `DIR/shapes.json` (what was written, so a later run may overwrite it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffcls.errors import DiffclsError

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {  # name -> RGB
    "red": (225, 35, 35),
    "green": (40, 175, 55),
    "blue": (45, 85, 240),
    "yellow": (240, 220, 35),
    "purple": (160, 55, 205),
    "cyan": (40, 210, 220),
}
BACKGROUND = (40, 40, 40)
SIZES = {"small": 5.5, "large": 9.0}  # half-extent in pixels
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SPLITS = ("train", "heldout", "novel")
TAGS = ("attribute", "object", "relation")
HELDOUT_MODULUS = 8  # 1 in 8 seen scenes is heldout
SUPERSAMPLE = 4
MAX_OFFSET = 3  # px across the relation's axis
GAP = 3  # px at least between two objects' extents along the relation's axis

# never in training: colour-shape pairs (each colour once, each shape at least once) ...
NOVEL_PAIRS = frozenset({
    ("red", "triangle"), ("green", "diamond"), ("blue", "cross"),
    ("yellow", "circle"), ("purple", "square"), ("cyan", "triangle"),
})
# ... and two shapes side by side ("h") or one over the other ("v"), in either order
NOVEL_ARRANGEMENTS = frozenset({
    (frozenset({"circle", "square"}), "h"), (frozenset({"triangle", "cross"}), "h"),
    (frozenset({"circle", "diamond"}), "v"), (frozenset({"square", "triangle"}), "v"),
})
SEEN_CLASSES = tuple(f"{c}_{s}" for c in COLOURS for s in SHAPES if (c, s) not in NOVEL_PAIRS)
NOVEL_CLASSES = tuple(f"{c}_{s}" for c in COLOURS for s in SHAPES if (c, s) in NOVEL_PAIRS)
ALL_CLASSES = tuple(f"{c}_{s}" for c in COLOURS for s in SHAPES)
CAPTION_WORDS = ("a", *SIZES, *COLOURS, *SHAPES, "left", "right", "of", "above", "below")
_SPLIT_CODE = {"train": 0, "heldout": 1, "novel": 2}
_STREAM = {"single": 0, "pair": 1, "attribute": 2, "object": 3, "relation": 4}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: int  # centre pixel (column), 0..31
    y: int  # centre pixel (row)

    def words(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in caption order
    relation: str | None = None  # of objects[0] to objects[1]

    def caption(self) -> str:
        """The canonical caption: "a small red circle" / "a red circle left of a blue square"."""
        a = self.objects[0]
        if self.relation is None:
            return f"a {a.size} {a.words()}"
        return f"a {a.words()} {self.relation} a {self.objects[1].words()}"

    def captions(self) -> tuple[str, ...]:
        """Every caption this generator writes for the image, the canonical one first."""
        a = self.objects[0]
        if self.relation is None:
            return (self.caption(), f"a {a.words()}")
        return (self.caption(), f"a {self.objects[1].words()} {OPPOSITE[self.relation]} a {a.words()}")

    @property
    def classname(self) -> str:
        return f"{self.objects[0].colour}_{self.objects[0].shape}"

    def key(self) -> tuple:
        """The image's exact content, independent of caption order."""
        return tuple(sorted((o.shape, o.colour, o.size, o.x, o.y) for o in self.objects))

    def is_novel(self) -> bool:
        if any((o.colour, o.shape) in NOVEL_PAIRS for o in self.objects):
            return True
        if self.relation is None:
            return False
        axis = "h" if self.relation in ("left of", "right of") else "v"
        return (frozenset(o.shape for o in self.objects), axis) in NOVEL_ARRANGEMENTS

    def split(self) -> str:
        if self.is_novel():
            return "novel"
        digest = hashlib.sha256(repr(self.key()).encode()).digest()
        return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0 else "train"


# --- drawing ---------------------------------------------------------------------------------
def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of one shape of half-extent r at offsets (dx, dy) from its centre (y down)."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(ax, ay) <= 0.82 * r
    if shape == "diamond":
        return ax + ay <= 1.05 * r
    if shape == "triangle":  # apex up, base at 0.8 r below the centre
        return (dy <= 0.8 * r) & (ax <= (dy + r) / 1.8)
    if shape == "cross":
        arm = 0.34 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB PIL image (deterministic: numpy float64, rounded once)."""
    s = SUPERSAMPLE
    grid = (np.arange(size * s, dtype=np.float64) + 0.5) / s  # sub-pixel centres, in pixels
    img = np.empty((size, size, 3), dtype=np.float64)
    img[:] = BACKGROUND
    for o in scene.objects:
        cx, cy = o.x + 0.5, o.y + 0.5
        inside = _mask(o.shape, grid[None, :] - cx, grid[:, None] - cy, SIZES[o.size])
        cover = inside.reshape(size, s, size, s).mean(axis=(1, 3))[..., None]  # (H, W, 1)
        img = img * (1.0 - cover) + np.asarray(COLOURS[o.colour], dtype=np.float64) * cover
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


# --- sampling --------------------------------------------------------------------------------
def _rng(seed: int, split: str, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], _STREAM[stream], int(index)])


def _centre(rng: np.random.Generator, r: float, size: int = IMAGE_SIZE) -> int:
    lo = int(np.ceil(r))  # the object's extent stays inside the image with >= 0.5 px to spare
    return int(rng.integers(lo, size - lo))


def _single(rng: np.random.Generator, colour: str, shape: str) -> Scene:
    size = ("small", "large")[int(rng.integers(2))]
    r = SIZES[size]
    return Scene((Obj(shape, colour, size, _centre(rng, r), _centre(rng, r)),))


def _place_pair(rng: np.random.Generator, relation: str, size: int = IMAGE_SIZE) -> tuple[tuple[int, int], tuple[int, int]]:
    """Centres ((x0, y0), (x1, y1)) of two small objects with object 0 `relation` object 1."""
    r = SIZES["small"]
    lo, hi = int(np.ceil(r)), size - int(np.ceil(r))  # centres in [lo, hi)
    sep = int(np.ceil(2 * r + GAP))
    first = int(rng.integers(lo, hi - sep))  # the left (top) object
    second = int(rng.integers(first + sep, hi))
    a_across = int(rng.integers(lo + MAX_OFFSET, hi - MAX_OFFSET))
    b_across = a_across + int(rng.integers(-MAX_OFFSET, MAX_OFFSET + 1))
    a_along, b_along = (first, second) if relation in ("left of", "above") else (second, first)
    if relation in ("left of", "right of"):
        return (a_along, a_across), (b_along, b_across)
    return (a_across, a_along), (b_across, b_along)


def _pair(rng: np.random.Generator) -> Scene:
    s0, s1 = (SHAPES[i] for i in rng.choice(len(SHAPES), size=2, replace=False))
    c0, c1 = (list(COLOURS)[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    (x0, y0), (x1, y1) = _place_pair(rng, relation)
    return Scene((Obj(s0, c0, "small", x0, y0), Obj(s1, c1, "small", x1, y1)), relation)


def swap(scene: Scene, tag: str) -> Scene:
    """The scene with its two objects' colours (attribute), shapes (object) or places (relation)
    exchanged; the caption order stays, so the captions differ exactly by that swap."""
    a, b = scene.objects
    if tag == "attribute":
        return Scene((Obj(a.shape, b.colour, a.size, a.x, a.y), Obj(b.shape, a.colour, b.size, b.x, b.y)), scene.relation)
    if tag == "object":
        return Scene((Obj(b.shape, a.colour, a.size, a.x, a.y), Obj(a.shape, b.colour, b.size, b.x, b.y)), scene.relation)
    if tag == "relation":
        return Scene((Obj(a.shape, a.colour, a.size, b.x, b.y), Obj(b.shape, b.colour, b.size, a.x, a.y)), OPPOSITE[scene.relation])
    raise ValueError(f"unknown tag {tag!r}")


MAX_TRIES = 10_000


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DiffclsError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")


def split_classes(split: str) -> tuple[str, ...]:
    """The class folders a split has: the novel colour-shape pairs for novel, else the seen ones."""
    _check_split(split)
    return NOVEL_CLASSES if split == "novel" else SEEN_CLASSES


def single_scene(split: str, index: int, seed: int = 0) -> Scene:
    """Single-object scene `index` of a split; classes interleave (index % number of classes)."""
    classes = split_classes(split)
    colour, shape = classes[index % len(classes)].split("_")
    rng = _rng(seed, split, "single", index)
    for _ in range(MAX_TRIES):
        scene = _single(rng, colour, shape)
        if scene.split() == split:
            return scene
    raise RuntimeError(f"no {split} scene of {colour} {shape} after {MAX_TRIES} draws")


def pair_scene(split: str, index: int, seed: int = 0) -> Scene:
    """Two-object scene `index` of a split."""
    _check_split(split)
    rng = _rng(seed, split, "pair", index)
    for _ in range(MAX_TRIES):
        scene = _pair(rng)
        if scene.split() == split:
            return scene
    raise RuntimeError(f"no {split} two-object scene after {MAX_TRIES} draws")


def quadruple(split: str, index: int, seed: int = 0) -> tuple[Scene, Scene, str]:
    """(scene_0, scene_1, tag) of item `index`: tags cycle attribute, object, relation; both
    scenes lie in the split."""
    _check_split(split)
    tag = TAGS[index % len(TAGS)]
    rng = _rng(seed, split, tag, index)
    for _ in range(MAX_TRIES):
        s0 = _pair(rng)
        s1 = swap(s0, tag)
        if s0.split() == split and s1.split() == split:
            return s0, s1, tag
    raise RuntimeError(f"no {split} {tag} item after {MAX_TRIES} draws")


# --- writing ---------------------------------------------------------------------------------
MANIFEST = "shapes.json"
OWNED = ("classes", "quadruples", "scenes.csv", "quadruples.csv", MANIFEST)
PER_CLASS = 20  # single-object images per class by default
QUADRUPLES = 600  # items by default (200 per tag)
SCENE_COLUMNS = ["path", "split", "caption", "captions", "relation"] + [
    f"{f}_{i}" for i in range(2) for f in ("shape", "colour", "size", "x", "y")
]


def scene_row(path: str, scene: Scene) -> dict:
    row = {"path": path, "split": scene.split(), "caption": scene.caption(),
           "captions": "|".join(scene.captions()), "relation": scene.relation or ""}
    for i in range(2):
        o = scene.objects[i] if i < len(scene.objects) else None
        for f in ("shape", "colour", "size", "x", "y"):
            row[f"{f}_{i}"] = "" if o is None else getattr(o, f)
    return row


def _prepare_dir(out: Path) -> None:
    """Refuse a non-empty folder that is not an earlier shapes output; clear an earlier one."""
    if out.exists() and not out.is_dir():
        raise DiffclsError(f"{out} exists and is not a folder; pass a new or empty folder for the shapes data")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise DiffclsError(
                f"{out} is not empty and holds no earlier `diffcls shapes` output ({MANIFEST}); "
                "pass a new or empty folder"
            )
        for name in OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def image_count(split: str = "heldout", limit: int | None = None) -> int:
    """How many images `write_shapes` draws: the single-object ones and two per quadruple."""
    n_single = len(split_classes(split)) * PER_CLASS if limit is None else limit
    return n_single + 2 * (QUADRUPLES if limit is None else limit)


def written_line(manifest: dict, out_dir: str | Path) -> str:
    """What `write_shapes` wrote (its returned manifest), in a line."""
    m, out = manifest, Path(out_dir)
    return (f"wrote {m['classes']} {m['split']} single-object images in {min(len(split_classes(m['split'])), m['classes'])} class folders "
            f"under {out / 'classes'} and {m['quadruples']} quadruples in {out / 'quadruples.csv'}")


def write_shapes(out_dir: str | Path, split: str = "heldout", limit: int | None = None, seed: int = 0,
                 progress=None) -> dict:
    """Write a split (see module docstring); `limit` caps both the class images and the items.

    Returns the manifest: split, seed, counts. `progress(n)` is called after each image."""
    _check_split(split)
    if limit is not None and limit < 1:
        raise DiffclsError(f"--limit must be at least 1, got {limit}")
    out = Path(out_dir)
    try:
        _prepare_dir(out)
        n_single = len(split_classes(split)) * PER_CLASS if limit is None else limit
        n_quad = QUADRUPLES if limit is None else limit
        manifest = {"generator": "diffcls shapes", "version": 1, "split": split, "seed": seed,
                    "classes": n_single, "quadruples": n_quad, "image_size": IMAGE_SIZE}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # marks the folder as ours first
        rows, quads = [], []
        for i in range(n_single):
            scene = single_scene(split, i, seed)
            rel = f"classes/{scene.classname}/{split}_{i:05d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            render_scene(scene).save(out / rel, format="PNG")
            rows.append(scene_row(rel, scene))
            if progress:
                progress(1)
        (out / "quadruples").mkdir(exist_ok=True)
        for i in range(n_quad):
            s0, s1, tag = quadruple(split, i, seed)
            names = [f"quadruples/{split}_{i:05d}_{j}.png" for j in range(2)]
            for name, scene in zip(names, (s0, s1)):
                render_scene(scene).save(out / name, format="PNG")
                rows.append(scene_row(name, scene))
            quads.append({"image_0": names[0], "image_1": names[1], "caption_0": s0.caption(),
                          "caption_1": s1.caption(), "tag": tag})
            if progress:
                progress(2)
        _write_csv(out / "quadruples.csv", ["image_0", "image_1", "caption_0", "caption_1", "tag"], quads)
        _write_csv(out / "scenes.csv", SCENE_COLUMNS, rows)
    except OSError as e:
        raise DiffclsError(f"cannot write the shapes data into {out}: {e}; pass a writable folder") from e
    return manifest


def read_scenes(path: str | Path) -> list[Scene]:
    """The scenes of a `scenes.csv` (in row order), rebuilt from their columns."""
    scenes = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            objs = tuple(
                Obj(row[f"shape_{i}"], row[f"colour_{i}"], row[f"size_{i}"], int(row[f"x_{i}"]), int(row[f"y_{i}"]))
                for i in range(2) if row[f"shape_{i}"]
            )
            scenes.append(Scene(objs, row["relation"] or None))
    return scenes
