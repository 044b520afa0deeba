"""On-disk caches for text embeddings and image latents.

Keys are complete: a text embedding is keyed by (model fingerprint, backend, precision, exact
prompt text); a latent by (model fingerprint, backend, precision, image content sha256, image
size, interpolation). Each entry is one safetensors file whose metadata repeats the full key;
writes go to a temporary file and are renamed into place, so a killed run leaves no torn entry.
A corrupt or mismatched entry is deleted and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from diffcls.config import default_cache_dir
from diffcls.errors import DiffclsError


class DiskCache:
    """`get(kind, key_fields) -> tensor | None`, `put(kind, key_fields, tensor)`."""

    KINDS = ("text", "latent")

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0
        self.rejected = 0  # corrupt or mismatched entries that were recomputed

    @staticmethod
    def _canonical(fields: dict) -> str:
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    def _path(self, kind: str, canonical: str) -> Path:
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        return self.root / kind / digest[:2] / f"{digest}.safetensors"

    def get(self, kind: str, fields: dict) -> torch.Tensor | None:
        from safetensors import safe_open

        canonical = self._canonical(fields)
        path = self._path(kind, canonical)
        if not path.exists():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != canonical:
                    raise ValueError("key mismatch")
                tensor = f.get_tensor("value")
            if not torch.isfinite(tensor).all():
                raise ValueError("non-finite values")
        except Exception:  # noqa: BLE001 - any unreadable entry is recomputed
            self.rejected += 1
            self.misses += 1
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return tensor

    def put(self, kind: str, fields: dict, tensor: torch.Tensor) -> None:
        from safetensors.torch import save_file

        canonical = self._canonical(fields)
        path = self._path(kind, canonical)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            os.close(fd)
            save_file({"value": tensor.detach().to("cpu").contiguous()}, tmp, metadata={"key": canonical})
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass
            raise DiffclsError(f"cannot write to cache directory {self.root} ({e}); pass --cache-dir or --no-cache") from e

    def clear(self) -> int:
        """Delete every entry; returns how many files were removed."""
        n = 0
        for kind in self.KINDS:
            d = self.root / kind
            if d.exists():
                n += sum(1 for p in d.rglob("*.safetensors"))
                shutil.rmtree(d)
        return n

    def size(self) -> tuple[int, int]:
        files = [p for k in self.KINDS for p in (self.root / k).rglob("*.safetensors")] if self.root.exists() else []
        return len(files), sum(p.stat().st_size for p in files)
