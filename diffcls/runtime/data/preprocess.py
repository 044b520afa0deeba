"""Image discovery and preprocessing, as in the paper's reference code.

Resize the shorter side to S (bicubic by default), center-crop S x S, RGB, scale to [-1, 1]
(torchvision's Resize -> CenterCrop -> ToTensor -> Normalize(0.5, 0.5), done with PIL so that
torchvision is not needed). Odd inputs are made RGB first: palette and grey images are
expanded, transparency is composited onto white, CMYK is converted, 16-bit and float images are
scaled to 8 bits, and EXIF orientation is applied.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from diffcls.config import Interpolation
from diffcls.errors import DiffclsError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
MAX_PIXELS = 16384 * 16384  # refuse larger images (about 800 MB decoded) instead of swapping


PIL_FILTERS = {
    Interpolation.bicubic: Image.Resampling.BICUBIC,
    Interpolation.bilinear: Image.Resampling.BILINEAR,
    Interpolation.lanczos: Image.Resampling.LANCZOS,
}


class BadImage(DiffclsError):
    """One image could not be used; a folder run reports it and goes on."""


def find_images(path: str | Path, on_problem: Callable[[str, str], None] | None = None) -> list[Path]:
    """Every image under `path` (recursive, sorted), or `[path]` for a single image file.

    Hidden files and folders are left out and symlinked folders are not followed. A folder that
    cannot be listed or entered is skipped: `on_problem(folder, message)` hears of it (the
    message names the folder and the reason). The top folder itself must be readable.
    """
    path = Path(path)
    if not path.exists():
        raise DiffclsError(f"{path} does not exist; pass an image file or a folder of images")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DiffclsError(
                f"{path} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}); pass an image or a folder"
            )
        return [path]
    found: list[Path] = []
    problems: list[tuple[str, str]] = []
    _walk(path, found, problems, top=True)
    for folder, msg in problems:
        if on_problem is not None:
            on_problem(folder, msg)
    if not found:
        hint = f"; {len(problems)} folder(s) could not be read: {problems[0][1]}" if problems else ""
        raise DiffclsError(
            f"no images found in {path} (looked recursively for {', '.join(sorted(IMAGE_SUFFIXES))}){hint}"
        )
    return sorted(found)


def _walk(folder: Path, found: list[Path], problems: list[tuple[str, str]], top: bool = False) -> None:
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError as e:
        if top:
            raise DiffclsError(f"cannot list the folder {folder} ({e.strerror or e}); check its permissions") from None
        problems.append((str(folder), f"{folder}: cannot list this folder ({e.strerror or e}); its images are skipped"))
        return
    subdirs = []
    for entry in sorted(entries, key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            # stat (not the listing's d_type): it fails in a folder that can be listed but not entered
            is_file = not is_dir and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES and stat.S_ISREG(entry.stat().st_mode)
        except OSError as e:  # e.g. a folder that can be listed but not entered (no x bit)
            if _is_link(entry.path):  # a dangling or looping symlink: only this entry is skipped
                problems.append((entry.path, f"{entry.path}: a symbolic link that leads nowhere ({e.strerror or e}); skipped"))
                continue
            if top:
                raise DiffclsError(f"cannot enter the folder {folder} ({e.strerror or e}); check its permissions") from None
            problems.append((str(folder), f"{folder}: cannot enter this folder ({e.strerror or e}); its images are skipped"))
            return
        if is_dir:
            subdirs.append(Path(entry.path))
        elif is_file:
            found.append(Path(entry.path))
    for sub in subdirs:
        _walk(sub, found, problems)


def _is_link(path: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:  # the folder cannot be entered: not the entry's fault
        return False


def file_digest(path: str | Path) -> str:
    """sha256 of the file's bytes (the latent cache key's image part)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; a float image with NaN or infinite pixels is refused (BadImage)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:  # NaN would make the scaling NaN and the image black: classified as something else
            raise BadImage(f"{bad} of {arr.size} pixels are NaN or infinite; fix the image or remove it")
        if img.mode == "F":
            hi = 1.0 if arr.max(initial=0.0) <= 1.0 else max(arr.max(initial=1.0), 1.0)
        else:
            hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def open_image(path, name: str | None = None) -> Image.Image:
    """Decode one image (a path or a binary file object) to RGB, or raise `BadImage` naming it."""
    if name is None:
        name = str(path) if isinstance(path, (str, Path)) else "<image>"
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadImage(
                    f"{name}: {im.width}x{im.height} is larger than {MAX_PIXELS} pixels; downscale it first"
                )
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except BadImage as e:
        msg = str(e)
        raise BadImage(msg if msg.startswith(f"{name}:") else f"{name}: {msg}") from None
    except UnidentifiedImageError as e:
        raise BadImage(f"{name}: not a readable image (unknown format or corrupt data); re-save it as PNG or JPEG or remove it") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{name}: cannot decode image ({e}); re-save it as PNG or JPEG or remove it") from e


def resize_center_crop(img: Image.Image, size: int, interpolation: Interpolation = Interpolation.bicubic) -> Image.Image:
    """torchvision Resize(size) (shorter side, truncating the longer) + CenterCrop(size).

    `Interpolation.adm` is the other center crop the paper's code uses (for DiT): see `adm_center_crop`.
    """
    if Interpolation(interpolation) is Interpolation.adm:
        return adm_center_crop(img, size)
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    _check_resize(img.size, (new_w, new_h), size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=PIL_FILTERS[Interpolation(interpolation)])
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _check_resize(source: tuple[int, int], target: tuple[int, int], size: int) -> None:
    """Refuse a resize whose result is larger than MAX_PIXELS (a very elongated image, or a huge
    size): one image skipped with a message, not the run killed by a MemoryError."""
    if target[0] * target[1] > MAX_PIXELS:
        raise BadImage(
            f"{source[0]}x{source[1]} would be resized to {target[0]}x{target[1]} (shorter side {size}), more than "
            f"{MAX_PIXELS} pixels; crop it to a less elongated shape first"
        )


def adm_center_crop(img: Image.Image, size: int) -> Image.Image:
    """ADM's center crop (guided-diffusion's `center_crop_arr`, used by DiT and `eval_prob_dit.py`).

    Halve with a box filter while the shorter side is at least 2 * size, resize bicubic so the
    shorter side is `size` (the longer one rounded), then crop the center (offsets rounded down).
    """
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.Resampling.BOX)
    scale = size / min(img.size)
    _check_resize(img.size, tuple(round(x * scale) for x in img.size), size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, S, S) float32 in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32) / 255.0
    return t * 2.0 - 1.0


def preprocess_image(
    img: Image.Image, size: int, interpolation: Interpolation | str = Interpolation.bicubic
) -> torch.Tensor:
    """PIL image (any mode) -> (3, size, size) float32 in [-1, 1]."""
    return image_to_tensor(resize_center_crop(to_rgb(img), size, Interpolation(interpolation)))


def load_and_preprocess(
    path: str | Path, size: int, interpolation: Interpolation | str = Interpolation.bicubic
) -> torch.Tensor:
    return image_to_tensor(resize_center_crop(open_image(path), size, Interpolation(interpolation)))
