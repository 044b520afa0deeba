"""scikit-learn's bundled handwritten digits: the data the demo model is trained and measured on.

`load_digits()` ships 1,797 8x8 greyscale digits (ink 0..16) inside scikit-learn, so nothing is
downloaded. This module fixes, once, how they become images and how they are split:

- `render_digit`: ink 0..16 -> 8-bit grey, dark ink on white paper, upscaled 4x to 32x32 with
  bicubic resampling (a smooth pen stroke, not blocky pixels). The PNGs written by
  `write_digits` (and `diffcls digits`) are exactly these images, and the demo model was trained
  on `preprocess_image(render_digit(d), 32)`, i.e. what `diffcls classify` computes from them.
- the split: per class, a fixed permutation (numpy's legacy `RandomState(0)`, whose stream never
  changes) holds out 20% of the digits (360 of 1,797); training never sees them.
- order: a split is listed class-interleaved (the first image of every class, then the second,
  ...), so its first N images are class-balanced and `limit=N` gives a fair small subset.
- corruption (`corrupt_digit`, `write_digits(..., severity=S)`): a harder version of the same
  images for measuring accuracy away from saturation. Severity S (1..5) rotates the rendered
  digit by a random angle within +-5*S degrees and shifts it by a random whole-pixel offset
  within +-ceil(S/2) px (both with white paper filled in), then adds Gaussian pixel noise of
  standard deviation 20*S grey levels (of 255). The randomness of one image depends only on
  (CORRUPT_SEED, the digit's index in `load_digits()`, S), so a digit is corrupted the same way
  whatever `limit` or split order is used. Severity 0 (or None) is the clean image.

scikit-learn is optional (extra `train`) and imported only when the data is needed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffcls.errors import DiffclsError, install_hint

IMAGE_SIZE = 32  # pixels; 8x8 digits upscaled 4x
CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0
CORRUPT_SEED = 10
MAX_SEVERITY = 5


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DiffclsError(
            "scikit-learn is not installed and the digits data ships with it; "
            f"install it with: {install_hint('train', 'scikit-learn')}"
        ) from e
    data = load_digits()
    images = np.clip(np.rint(data.images), 0, 16).astype(np.uint8)  # (1797, 8, 8), ink 0..16
    return images, data.target.astype(np.int64)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DiffclsError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")


def split_indices(split: str, labels: np.ndarray | None = None) -> np.ndarray:
    """Indices into `load_digits()` of one split, class-interleaved (see module docstring)."""
    _check_split(split)
    if labels is None:
        labels = _load_digits()[1]
    rng = np.random.RandomState(SPLIT_SEED)
    per_class = []
    for c in range(len(CLASSNAMES)):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_held = int(round(len(idx) * HELDOUT_FRACTION))
        chosen = idx[:n_held] if split == "heldout" else idx[n_held:]
        per_class.append(np.sort(chosen))
    # interleave: rank r of every class, for r = 0, 1, ...
    order = sorted(
        ((r, c, int(i)) for c, idx in enumerate(per_class) for r, i in enumerate(idx)),
    )
    return np.array([i for _, _, i in order], dtype=np.int64)


def load_split(split: str = "heldout") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 8, 8) uint8 with ink 0..16, labels (N,) int64) of one split."""
    _check_split(split)
    images, labels = _load_digits()
    idx = split_indices(split, labels)
    return images[idx], labels[idx]


def render_digit(arr8x8: np.ndarray, size: int = IMAGE_SIZE) -> Image.Image:
    """One 8x8 digit (ink 0..16) -> the greyscale PIL image saved as PNG (dark ink on white)."""
    arr = np.asarray(arr8x8, dtype=np.float64)
    if arr.shape != (8, 8):
        raise ValueError(f"expected an 8x8 digit, got shape {arr.shape}")
    grey = np.clip(np.rint(255.0 - arr * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((size, size), resample=Image.Resampling.BICUBIC)


def _check_severity(severity: int | None) -> int:
    s = 0 if severity is None else int(severity)
    if not 0 <= s <= MAX_SEVERITY:
        raise DiffclsError(f"--corrupt {severity} is out of range; use a severity from 1 (mild) to {MAX_SEVERITY} (hardest), or 0 for clean images")
    return s


def corrupt_digit(image: Image.Image, severity: int, index: int) -> Image.Image:
    """The rendered digit `image` (greyscale) corrupted at `severity` (see module docstring).

    `index` (the digit's index in `load_digits()`) seeds the randomness; severity 0 returns the
    image unchanged.
    """
    s = _check_severity(severity)
    if s == 0:
        return image
    rng = np.random.default_rng([CORRUPT_SEED, int(index), s])
    angle = float(rng.uniform(-5.0 * s, 5.0 * s))
    reach = -(-s // 2)  # ceil(s / 2) pixels
    dx, dy = (int(v) for v in rng.integers(-reach, reach + 1, size=2))
    moved = image.rotate(
        angle, resample=Image.Resampling.BICUBIC, translate=(dx, dy), fillcolor=255
    )
    grey = np.asarray(moved, dtype=np.float64) + rng.normal(0.0, 20.0 * s, size=(image.height, image.width))
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")


def written_line(paths: list[Path], split: str, severity: int, out_dir: str | Path) -> str:
    """What `write_digits` wrote (the paths it returned), in a line."""
    kind = f"{split} digits (corruption severity {severity})" if severity else f"{split} digits"
    return f"wrote {len(paths)} {kind} in {len({p.parent.name for p in paths})} class folders under {out_dir}"


def write_digits(
    out_dir: str | Path, split: str = "heldout", limit: int | None = None, severity: int | None = None
) -> list[Path]:
    """Write a split as PNGs, one subfolder per class: `out_dir/three/heldout_0042.png`; `out_dir`
    must be new or empty.

    The number in the file name is the digit's index in `load_digits()`. `limit` keeps the
    first N images of the class-interleaved order (a class-balanced subset). `severity` 1..5
    writes corrupted images (`corrupt_digit`); 0 or None the clean ones.
    """
    _check_split(split)
    if limit is not None and limit < 1:
        raise DiffclsError(f"--limit must be at least 1, got {limit}")
    severity = _check_severity(severity)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DiffclsError(f"{out} exists and is not a folder; pass a folder to write the digits into")
    held = sorted(out.iterdir()) if out.is_dir() else []
    if held:  # mixing two writes would leave images of another split, limit or severity behind
        n_images = sum(1 for p in out.rglob("*.png"))
        raise DiffclsError(
            f"{out} is not empty ({len(held)} entries, {n_images} PNG images, e.g. {held[0].name}); "
            "the digits go into a new or empty folder: pass another one, or delete it first"
        )
    images, labels = _load_digits()
    idx = split_indices(split, labels)
    if limit is not None:
        idx = idx[:limit]
    paths = []
    try:
        for i in idx:
            folder = out / CLASSNAMES[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{split}_{int(i):04d}.png"
            corrupt_digit(render_digit(images[i]), severity, int(i)).save(path, format="PNG")
            paths.append(path)
    except OSError as e:
        raise DiffclsError(f"cannot write digits into {out}: {e}; pass a writable folder") from e
    return paths
