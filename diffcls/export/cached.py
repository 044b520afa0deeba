"""The bundled models' ONNX Runtime engines, exported once into the cache directory.

    engine_dir = ensure_cached_engines("demo", cache_root / "engines", on_export=print)

The CPU fast path (`diffcls.engines.fastpath`) runs the bundled demo models through ONNX Runtime
without the user exporting anything. Their engines live at `<root>/<name>-<fingerprint>[-<S>px]`:
a retrained model has another fingerprint, so it gets its own directory and an old one is never
rewritten under a run that uses it. Each use verifies the directory as `classify --engines` does
(manifest, fingerprint, every file's sha256, image size) and that its copy of the model's
defaults (`diffcls.json`, its prompts file) is the model's current one; a missing, unfinished,
corrupt or stale one is rebuilt. Rebuilding is atomic and safe with concurrent runs: under an exclusive lock on
`<root>/.<name>.lock` the directory is checked again (another run may have just built it), then
exported into a temporary `.tmp-<name>.*` folder and renamed into place, so a reader sees a complete
directory or none. The exports are fp32 and record no batch sizes (ONNX graphs take any batch),
so every `--batch-size` runs.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from diffcls.engines import manifest as mf
from diffcls.errors import DiffclsError
from diffcls.export.pipeline import DEFAULTS_FILE, ExportConfig, export_model, prompts_file_named
from diffcls.models.loading import bundled_model_path, cached_fingerprint, load_model

# seconds an export of each bundled model took on the project's idle 2-core CPU (the message's estimate)
EXPORT_SECONDS = {"demo": 5, "demo-dit": 5}


def _defaults_current(engine_dir: Path, source: Path) -> bool:
    """Whether the engine directory's copy of the model's defaults (its diffcls.json and the
    prompts file it names) is the source's as it is now. The fingerprint covers the weights only,
    so a package upgrade that changes a bundled model's defaults (its timestep weights, prompts or
    schedule) keeps the fingerprint and must still refresh the copy."""
    def read(p: Path) -> bytes | None:
        try:
            return p.read_bytes()
        except OSError:
            return None

    if read(source / DEFAULTS_FILE) != read(engine_dir / DEFAULTS_FILE):
        return False
    prompts = prompts_file_named(source / DEFAULTS_FILE)
    return prompts is None or read(source / prompts) == read(engine_dir / prompts)


def _usable(engine_dir: Path, fingerprint: str, image_size: int | None, source: Path) -> bool:
    try:
        mf.verify_engine_dir(engine_dir, backend="onnxruntime", fingerprint=fingerprint, image_size=image_size)
    except DiffclsError:
        return False
    return not source.is_dir() or _defaults_current(engine_dir, source)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive advisory lock held for the block (no-op where fcntl does not exist)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one process at a time is the user's to ensure
        yield
        return
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_cached_engines(name: str, root: str | Path, *, source: str | Path | None = None, image_size: int | None = None,
                          on_export: Callable[[str], None] | None = None) -> Path:
    """The verified engine directory of bundled model `name` (or of the model directory `source`,
    cached under `name`) under `root`, exported first if missing or unusable. `on_export(message)`
    is called before an export starts."""
    root = Path(root)
    source = Path(source) if source is not None else bundled_model_path(name)
    fingerprint = cached_fingerprint(source)
    model = None
    if fingerprint is None:  # never loaded here before: load it once (the export needs it anyway)
        model = load_model(source)
        fingerprint = model.fingerprint()
    final = root / (f"{name}-{fingerprint}" + (f"-{int(image_size)}px" if image_size else ""))
    if _usable(final, fingerprint, image_size, source):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffclsError(f"cannot create {root} for the {name} model's engines ({e}); pass --cache-dir DIR or --backend torch") from e
    with _exclusive(root / f".{name}.lock"):
        if _usable(final, fingerprint, image_size, source):  # another run built it while we waited
            return final
        for old in root.glob(f".tmp-{name}.*"):  # what a killed export left (no other export runs: we hold the lock)
            shutil.rmtree(old, ignore_errors=True)
        if on_export is not None:
            on_export(f"exporting the {name} model to ONNX Runtime engines in {final} (once, ~{EXPORT_SECONDS.get(name, 10)} s)")
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}.", dir=root))
        try:
            cfg = ExportConfig(out=tmp, model=model if model is not None else source, backend="onnxruntime",
                               precision="fp32", device="cpu", image_size=image_size, any_batch=True)
            export_model(cfg)
            if final.exists():  # a broken directory: out of the way, then gone
                trash = root / f".tmp-{name}.old-{time.time_ns()}"
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_engine_dirs(root: str | Path) -> list[Path]:
    """The engine directories `ensure_cached_engines` wrote under `root` (by name and manifest),
    and its leftover temporary folders; nothing else."""
    import re

    from diffcls.models.loading import BUNDLED

    root = Path(root)
    if not root.is_dir() or root.is_symlink():
        return []
    names = "|".join(re.escape(n) for n in sorted(BUNDLED, key=len, reverse=True))
    own = re.compile(rf"(?:{names})-[0-9a-f]{{16}}(?:-\d+px)?")
    tmp = re.compile(rf"\.tmp-(?:{names})\..+")
    found = []
    for p in sorted(root.iterdir()):
        if p.is_symlink() or not p.is_dir():
            continue
        if tmp.fullmatch(p.name) or (own.fullmatch(p.name) and (p / mf.MANIFEST).is_file()):
            found.append(p)
    return found


def cached_engines_size(root: str | Path) -> tuple[int, int]:
    """(directories, bytes) of what `cached_engine_dirs` lists under `root`."""
    dirs = cached_engine_dirs(root)
    return len(dirs), sum(f.stat().st_size for d in dirs for f in d.rglob("*") if f.is_file())


def clear_cached_engines(root: str | Path) -> int:
    """Delete what `cached_engine_dirs` lists (and the lock files); returns how many directories."""
    dirs = cached_engine_dirs(root)
    for p in dirs:
        shutil.rmtree(p, ignore_errors=True)
    from diffcls.models.loading import BUNDLED

    for name in BUNDLED:
        (Path(root) / f".{name}.lock").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        Path(root).rmdir()  # only when empty
    return len(dirs)
