"""Nothing half-written: outputs go to a temporary name and are renamed when complete.

Temporary names carry the writer's host and process id (`.staging-HOST-PID-xxxx`,
`.NAME.partial-HOST-PID`), so a later run into the same folder can remove what a
killed run (SIGKILL, power loss) left: any such name of this host whose process
is gone. The final renames run with SIGINT/SIGTERM/SIGHUP held (interrupt.deferred)
and put marker files (manifest.json, the shard index) in place last, so a folder
is the old output or the whole new one. A full disk (ENOSPC, EDQUOT) while
writing ends in one sentence naming the folder and the space written so far.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import HuatuoError
from .interrupt import deferred

# files that say "this folder is complete": moved into place after everything else
MARKERS = ("manifest.json", "model.safetensors.index.json")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded")   # errors that wrap the errno in text
NEARLY_FULL_BYTES = 1 << 20
STAGING_RE = re.compile(r"^\.staging-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")
PARTIAL_RE = re.compile(r"^\..+\.(?:partial|old)-(?P<host>.+)-(?P<pid>\d+)$")


def _owner() -> str:
    """HOST-PID of this process, as it appears in temporary names."""
    host = re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


@contextlib.contextmanager
def atomic_path(final: Path | str, needed: int | None = None):
    """Yield a temporary path beside `final`; rename it onto `final` only if the
    block succeeds, delete it otherwise. Works for files and folders. `needed`:
    the bytes the output will take, when known (said if the disk fills up)."""
    final = Path(final)
    ensure_writable_dir(final.parent)
    remove_stale(final.parent)
    tmp = final.with_name(f".{final.name}.partial-{_owner()}")
    old = final.with_name(f".{final.name}.old-{_owner()}")
    _remove(tmp)
    try:
        with _disk_full_sentence(final.parent, tmp, needed):
            yield tmp
            _sync(tmp)
        with deferred():
            if final.is_dir() and tmp.is_dir():
                os.replace(final, old)        # a folder cannot be renamed over a non-empty one
            os.replace(tmp, final)
            _sync_dir(final.parent)
    finally:
        _remove(tmp)
        _remove(old)


@contextlib.contextmanager
def staging_dir(out_dir: Path | str, needed: int | None = None):
    """A temporary folder whose files are moved into `out_dir` when the block succeeds.

    Files already in `out_dir` that are not rewritten are kept; each moved file
    replaces its old copy in one rename, marker files last."""
    out_dir = Path(out_dir)
    ensure_writable_dir(out_dir)
    remove_stale(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".staging-{_owner()}-", dir=out_dir))
    try:
        with _disk_full_sentence(out_dir, tmp, needed):
            yield tmp
            files = sorted((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: (p.name in MARKERS, p))
            for item in files:
                _sync(item)
        with deferred():
            for item in files:
                dest = out_dir / item.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(item, dest)
            _sync_dir(out_dir)
            _remove(tmp)
    finally:
        _remove(tmp)


def remove_stale(folder: Path) -> list[Path]:
    """Remove the staging folders and partial files in `folder` left by runs of
    this host whose process is gone; returns what was removed."""
    here, removed = _owner().rsplit("-", 1)[0], []
    try:
        names = [p for p in folder.iterdir() if p.name.startswith(".")]
    except OSError:
        return removed
    for path in names:
        match = STAGING_RE.match(path.name) or PARTIAL_RE.match(path.name)
        if match and match["host"] == here and not _alive(int(match["pid"])):
            _remove(path)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:            # another user's live process
        return True
    return True


# ---------------------------------------------------------------- full disk ----
def disk_full_error(exc: BaseException) -> bool:
    """True when `exc` (or what it wraps) is ENOSPC/EDQUOT; libraries such as
    safetensors and torch pass the OS error on as text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(exc) for text in DISK_FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextlib.contextmanager
def _disk_full_sentence(folder: Path, tmp: Path, needed: int | None):
    try:
        yield
    except Exception as exc:
        if not (disk_full_error(exc) or _nearly_full(folder)):
            raise
        written = _tree_size(tmp)
        try:
            free = f"{human_size(shutil.disk_usage(folder).free)} is free"
        except OSError:
            free = "its free space is unknown"
        need = (f"it needs about {human_size(needed)}" if needed
                else f"it needs more than the {human_size(written)} written before the disk filled")
        raise HuatuoError(f"The disk holding {folder} is full: {need} and {free}; free some space there "
                          "or choose another output folder (nothing was left half-written).") from None


def _nearly_full(folder: Path) -> bool:
    """A native writer (llama.cpp's quantizer) reports only that it failed: a
    folder with under 1 MB free explains it."""
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def human_size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for p in path.rglob("*") if path.is_dir() else ():
        with contextlib.suppress(OSError):
            total += p.stat().st_size if p.is_file() else 0
    return total


# ---------------------------------------------------------------- helpers ----
def ensure_writable_dir(path: Path) -> None:
    """Create `path` if needed; one sentence if it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HuatuoError(f"Cannot create the output folder {path}: {exc.strerror}; choose another folder.") from None
    if not os.access(path, os.W_OK):
        raise HuatuoError(f"The output folder {path} is not writable; choose another folder or fix its permissions.")


def require_regular_file(path: Path | str, what: str) -> Path:
    """`path` if it is a regular file (or a link to one); a FIFO, device or
    folder would block or mislead a reader, so it gets one sentence."""
    path = Path(path)
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a pipe, socket or device)"
        raise HuatuoError(f"{path} is {kind}; give the {what} as a regular file.")
    return path


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _sync(path: Path) -> None:
    """Flush a finished file to disk before it is renamed into place (power loss:
    a renamed file must not be empty)."""
    if path.is_file():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    elif path.is_dir():
        for p in path.rglob("*"):
            if p.is_file():
                _sync(p)


def _sync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
