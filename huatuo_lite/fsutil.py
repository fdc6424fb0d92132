"""Nothing half-written: outputs go to a temporary name and are renamed when complete."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import HuatuoError


@contextlib.contextmanager
def atomic_path(final: Path | str):
    """Yield a temporary path beside `final`; rename it onto `final` only if the
    block succeeds, delete it otherwise. Works for files and folders."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if final.is_dir() and tmp.is_dir():
            _remove(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def staging_dir(out_dir: Path | str):
    """A temporary folder whose files are moved into `out_dir` when the block succeeds.

    Files already in `out_dir` that are not rewritten are kept; each moved file
    replaces its old copy in one rename."""
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        yield tmp
        for item in sorted(tmp.rglob("*")):
            if item.is_file():
                dest = out_dir / item.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, dest)
    finally:
        _remove(tmp)


def ensure_writable_dir(path: Path) -> None:
    """Create `path` if needed; one sentence if it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HuatuoError(f"Cannot create the output folder {path}: {exc.strerror}; choose another folder.") from None
    if not os.access(path, os.W_OK):
        raise HuatuoError(f"The output folder {path} is not writable; choose another folder or fix its permissions.")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
