"""Hash big files once: sha256s and model fingerprints remembered by file size + mtime.

Opening an engine directory checks every file against the sha256 in its manifest, and a model's
fingerprint hashes all of its weights; for SD-2.1 that is gigabytes read on every run (36 s of a
40 s startup). Both are remembered here, in one small JSON file under the cache directory
(`diffcls.config.default_cache_dir()/file-hashes.json`):

    {"format": 1,
     "files":  {"/abs/engines/unet.onnx": {"size": 1234, "mtime_ns": 1700..., "sha256": "..."}},
     "models": {"/abs/models/sd21": {"files": {"unet/config.json": [size, mtime_ns], ...},
                                     "versions": {...}, "fingerprint": "..."}}}

A record is used only while the file (or every file of a model directory) has the size and
mtime it had when it was hashed; anything else is hashed again. The store is an optimization:
an unreadable store is ignored and an unwritable one is skipped (logged at debug level), and
two processes writing at once lose at most an entry (the next run hashes that file again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from diffcls.config import default_cache_dir

log = logging.getLogger(__name__)

STORE = "file-hashes.json"
FORMAT = 1
MAX_ENTRIES = 4096  # per section; the oldest are dropped first
_lock = threading.Lock()


def store_path() -> Path:
    return default_cache_dir() / STORE


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of the file's bytes, read in full (what the cache saves)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read() -> dict:
    try:
        data = json.loads(store_path().read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"format": FORMAT, "files": {}, "models": {}}
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {"format": FORMAT, "files": {}, "models": {}}
    for section in ("files", "models"):
        if not isinstance(data.get(section), dict):
            data[section] = {}
    return data


def _update(section: str, key: str, record: dict) -> None:
    """Read-modify-write one record, atomically (temp file + rename)."""
    path = store_path()
    with _lock:
        data = _read()
        entries = data[section]
        entries.pop(key, None)
        entries[key] = record  # dicts keep insertion order: newest last
        while len(entries) > MAX_ENTRIES:
            entries.pop(next(iter(entries)))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".file-hashes-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError as e:
            log.debug("cannot remember hashes in %s: %s", path, e)
            try:
                os.unlink(tmp)
            except (OSError, UnboundLocalError):
                pass


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def file_sha256(path: str | Path) -> str:
    """sha256 of `path`, read from the store while the file's size and mtime are unchanged."""
    path = Path(path)
    st = path.stat()
    key = _key(path)
    rec = _read()["files"].get(key)
    if isinstance(rec, dict) and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        return str(rec["sha256"])
    digest = sha256_file(path)
    _update("files", key, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return digest


def directory_state(root: str | Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every file under `root` (symlinks followed)."""
    root = Path(root)
    state = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # e.g. .cache/ written by huggingface_hub beside a download
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file():
            state[rel.as_posix()] = [st.st_size, st.st_mtime_ns]
    return state


def lookup_fingerprint(root: str | Path, versions: dict, state: dict | None = None) -> str | None:
    """The fingerprint remembered for the model directory `root`, if none of its files changed."""
    rec = _read()["models"].get(_key(Path(root)))
    if not isinstance(rec, dict) or rec.get("versions") != versions:
        return None
    state = directory_state(root) if state is None else state
    if rec.get("files") != state:
        return None
    return rec.get("fingerprint")


def remember_fingerprint(root: str | Path, versions: dict, state: dict, fingerprint: str) -> None:
    _update("models", _key(Path(root)), {"files": state, "versions": versions, "fingerprint": fingerprint})
