"""On-disk caches for text embeddings and image latents.

Keys are complete: a text embedding is keyed by (model fingerprint, backend, precision, exact
prompt text); a latent by (model fingerprint, backend, precision, VAE dtype, image content
sha256, image size, interpolation). Each entry is one safetensors file at
`<kind>/<sha[:2]>/<sha>.safetensors`, `sha` = sha256 of the canonical key; its metadata repeats
the full key and holds the sha256 of the tensor's bytes. Writes go to a temporary file and are
renamed into place, so a killed run leaves no torn entry. On read the key, the checksum, the
expected shape and finiteness are checked: a corrupt or mismatched entry is deleted and
recomputed (and the fresh value replaces it), never trusted.

`clear` deletes only what diffcls wrote: files at entry paths whose metadata key hashes to the
file name (plus its own leftover temporary files), and the directories it created once they are
empty. Anything else under the cache directory is left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

from diffcls.config import default_cache_dir
from diffcls.errors import DiffclsWarning

FORMAT = "1"  # metadata "format"; entries without it (older diffcls) are recomputed
_ENTRY = re.compile(r"[0-9a-f]{64}\.safetensors")
_TMP = re.compile(r"tmp[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp(suffix=".tmp") names


class CacheWriteWarning(DiffclsWarning):
    """The cache could not be written; the run goes on without caching."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes (CPU, contiguous)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class DiskCache:
    """`get(kind, key_fields, shape) -> tensor | None`, `put(kind, key_fields, tensor)`."""

    KINDS = ("text", "latent")

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.rejected = 0  # corrupt or mismatched entries that were recomputed
        self.write_error: str | None = None  # why writing stopped (see put)

    @staticmethod
    def _canonical(fields: dict) -> str:
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    def _path(self, kind: str, canonical: str) -> Path:
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        return self.root / kind / digest[:2] / f"{digest}.safetensors"

    def get(self, kind: str, fields: dict, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """The cached tensor, or None (a miss; a bad entry is deleted and counted in `rejected`).

        `shape`: the shape the caller needs; an entry of any other shape is a bad entry.
        """
        from safetensors import safe_open

        canonical = self._canonical(fields)
        path = self._path(kind, canonical)
        if not path.exists():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != canonical or meta.get("format") != FORMAT:
                    raise ValueError("key mismatch")
                tensor = f.get_tensor("value")
            if shape is not None and tuple(tensor.shape) != tuple(shape):
                raise ValueError("wrong shape")
            if meta.get("sha256") != tensor_digest(tensor):
                raise ValueError("checksum mismatch")
            if not torch.isfinite(tensor).all():
                raise ValueError("non-finite values")
        except Exception:  # noqa: BLE001 - any unreadable entry is recomputed
            self.rejected += 1
            self.misses += 1
            try:
                path.unlink(missing_ok=True)
            except OSError:  # a read-only cache, or a folder where the entry should be: still a miss
                pass
            return None
        self.hits += 1
        return tensor

    def put(self, kind: str, fields: dict, tensor: torch.Tensor) -> None:
        """Store an entry. A cache that cannot be written (full disk, read-only, a folder in the
        way) does not stop the run: writing stops, `write_error` says why (the CLI says so once)."""
        from safetensors.torch import save_file

        if self.write_error is not None:
            return
        canonical = self._canonical(fields)
        path = self._path(kind, canonical)
        value = tensor.detach().to("cpu").contiguous()
        meta = {"key": canonical, "format": FORMAT, "sha256": tensor_digest(value)}
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            save_file({"value": value}, tmp, metadata=meta)
            os.replace(tmp, path)
        except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error for a full disk
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            self.write_error = f"cannot write to the cache directory {self.root} ({reason}); carrying on without caching (pass --cache-dir elsewhere or --no-cache)"
            warnings.warn(self.write_error, CacheWriteWarning, stacklevel=2)

    # --- what diffcls wrote, and only that ---------------------------------------------------
    def _candidates(self, kind: str):
        """Files at diffcls entry paths `<kind>/<xx>/<name>` (name pattern only, not yet checked)."""
        top = self.root / kind
        if not top.is_dir() or top.is_symlink():
            return
        for sub in sorted(top.iterdir()):
            if sub.is_symlink() or not sub.is_dir() or not re.fullmatch(r"[0-9a-f]{2}", sub.name):
                continue
            for p in sorted(sub.iterdir()):
                if p.is_file() and not p.is_symlink() and (
                    (_ENTRY.fullmatch(p.name) and p.name.startswith(sub.name)) or _TMP.fullmatch(p.name)
                ):
                    yield p

    @staticmethod
    def _is_own_entry(path: Path) -> bool:
        """True for a diffcls entry: a safetensors file whose metadata key hashes to its name.

        Reads only the header (8-byte length + JSON), never the tensor data.
        """
        try:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= 1 << 20:
                    return False
                header = json.loads(f.read(n))
            key = header["__metadata__"]["key"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return isinstance(key, str) and hashlib.sha256(key.encode()).hexdigest() + ".safetensors" == path.name

    def entries(self) -> list[Path]:
        """Every entry file diffcls wrote under the cache directory."""
        return [p for k in self.KINDS for p in self._candidates(k) if _ENTRY.fullmatch(p.name) and self._is_own_entry(p)]

    def clear(self) -> int:
        """Delete every diffcls entry (and leftover temp file); returns how many entries were removed.

        Directories are removed only when empty afterwards; other files are never touched.
        """
        n = 0
        for kind in self.KINDS:
            for p in list(self._candidates(kind)):
                if _TMP.fullmatch(p.name):
                    p.unlink(missing_ok=True)
                elif self._is_own_entry(p):
                    p.unlink(missing_ok=True)
                    n += 1
            top = self.root / kind
            if top.is_dir() and not top.is_symlink():
                for sub in top.iterdir():
                    if re.fullmatch(r"[0-9a-f]{2}", sub.name) and sub.is_dir() and not sub.is_symlink():
                        _rmdir_if_empty(sub)
                _rmdir_if_empty(top)
        return n

    def size(self) -> tuple[int, int]:
        files = self.entries() if self.root.exists() else []
        return len(files), sum(p.stat().st_size for p in files)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (or not ours to remove): leave it
