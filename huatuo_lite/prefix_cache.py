"""The persistent cache on disk: one file per entry, keyed by a digest of everything
that determines its bytes, bounded in size, least recently used evicted first.

Two kinds of entries live here (see cache.py for what goes in them):
- "features": the projected image features of one preprocessed image, float32 [T, H] (.npy bytes);
- "prefix": the KV state of a prompt prefix (system text + image(s)): llama.cpp's
  per-sequence state for GGUF, the present key/value arrays for ONNX (.npz bytes).

An entry file is  MAGIC | u64 header length | header JSON | payload, and the header holds
the entry's key, kind, payload length and payload sha256. A read checks all four: a
truncated, corrupted, renamed or foreign file is deleted and reported as a miss (the caller
recomputes and writes it again), never returned. Writes go through fsutil.atomic_path, so
a crash or a full disk leaves no half entry. Every failure of the cache is a miss: it only
ever costs time, never an answer or a traceback.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

from .errors import HuatuoError

ENV_DIR = "HUATUO_LITE_CACHE"                 # the folder (default: <store home>/cache)
ENV_MAX_BYTES = "HUATUO_LITE_CACHE_MAX_BYTES"   # the size cap
ENV_OFF = "HUATUO_LITE_NO_CACHE"              # any non-empty value but "0": no disk cache (`--no-cache`)
DEFAULT_MAX_BYTES = 2 * 1024 ** 3             # a laptop's 2 GB: ~60 entries of the 7B (34 MB each)
MAGIC = b"HLCACHE1"
SUFFIX = ".hlc"
_HEADER_LEN = struct.Struct("<Q")
_MAX_HEADER = 1 << 20

log = logging.getLogger("huatuo_lite.cache")


def cache_dir() -> Path:
    """$HUATUO_LITE_CACHE, else the store's home + /cache."""
    from . import store

    given = os.environ.get(ENV_DIR)
    return Path(given).expanduser() if given else store.home() / "cache"


def disabled() -> bool:
    return os.environ.get(ENV_OFF, "") not in ("", "0")


def max_bytes() -> int:
    """The cap from $HUATUO_LITE_CACHE_MAX_BYTES (plain bytes, or with a K/M/G suffix)."""
    text = os.environ.get(ENV_MAX_BYTES, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:].upper(), 1)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        value = -1
    if value < 0:
        raise HuatuoError(f"{ENV_MAX_BYTES}={text!r} is not a size: give bytes, e.g. 2000000000 or 2G "
                          "(0 keeps nothing).")
    return value


def entry_key(kind: str, identity: dict, content) -> str:
    """sha256 hex of (kind, identity, content) as canonical JSON: the entry's name and key."""
    blob = json.dumps([kind, identity, content], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class DiskCache:
    """Entries in one folder; `get` and `put` never raise for the cache's own faults."""

    def __init__(self, folder: Path | str | None = None, cap: int | None = None):
        self.folder = Path(folder) if folder is not None else cache_dir()
        self.cap = max_bytes() if cap is None else int(cap)
        self.hits = self.misses = self.refused = self.written = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    # -------------------------------------------------------------- reading
    def get(self, key: str, kind: str) -> bytes | None:
        """The payload stored under `key`, or None (absent, or refused and deleted)."""
        path = self.path(key)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            self.misses += 1
            return None
        payload = _unpack(data, key, kind)
        if payload is None:
            self.refused += 1
            self.misses += 1
            log.warning("cache entry %s is damaged or not ours: ignored, it will be written again", path.name)
            _unlink(path)
            return None
        try:
            os.utime(path)      # the recency that eviction reads
        except OSError:
            pass
        self.hits += 1
        return payload

    # -------------------------------------------------------------- writing
    def put(self, key: str, kind: str, payload: bytes, meta: dict | None = None) -> bool:
        """Store `payload` (atomically), then evict the least recently used entries
        beyond the cap. An entry larger than the cap is not written."""
        header = json.dumps({"key": key, "kind": kind, "length": len(payload),
                             "sha256": hashlib.sha256(payload).hexdigest(), **(meta or {})},
                            sort_keys=True).encode("utf-8")
        size = len(MAGIC) + _HEADER_LEN.size + len(header) + len(payload)
        if size > self.cap:
            return False
        from .fsutil import atomic_path

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path(key), needed=size) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(MAGIC + _HEADER_LEN.pack(len(header)) + header)
                    fh.write(payload)
        except (OSError, HuatuoError) as exc:          # full disk, read-only home: only a miss later
            # INFO (shown by -v), not a warning: it would print on every request, inside chat's screen
            log.info("could not write cache entry %s (%s)", key[:12], exc)
            return False
        self.written += 1
        self.evict(keep=key)
        return True

    def entries(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry, oldest first."""
        found = []
        try:
            listing = list(self.folder.glob(f"*{SUFFIX}"))
        except OSError:
            return []
        for path in listing:
            try:
                st = path.stat()
            except OSError:
                continue
            found.append((st.st_mtime_ns, st.st_size, path))
        return sorted(found)

    def evict(self, keep: str | None = None) -> int:
        """Delete least recently used entries until the total fits the cap (never `keep`)."""
        items = self.entries()
        total = sum(size for _, size, _ in items)
        removed = 0
        for _, size, path in items:
            if total <= self.cap:
                break
            if keep is not None and path.name == f"{keep}{SUFFIX}":
                continue
            _unlink(path)
            total -= size
            removed += 1
        return removed

    def info(self) -> dict:
        items = self.entries()
        return {"folder": str(self.folder), "entries": len(items), "bytes": sum(s for _, s, _ in items),
                "max_bytes": self.cap, "sizes": [s for _, s, _ in items]}

    def clear(self) -> int:
        items = self.entries()
        for _, _, path in items:
            _unlink(path)
        return len(items)


def _unpack(data: bytes, key: str, kind: str) -> bytes | None:
    """The payload if `data` is a whole, intact entry for (key, kind); else None."""
    start = len(MAGIC) + _HEADER_LEN.size
    if len(data) < start or not data.startswith(MAGIC):
        return None
    (n,) = _HEADER_LEN.unpack_from(data, len(MAGIC))
    if n > _MAX_HEADER or len(data) < start + n:
        return None
    try:
        header = json.loads(data[start:start + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    payload = data[start + n:]
    if (not isinstance(header, dict) or header.get("key") != key or header.get("kind") != kind
            or header.get("length") != len(payload)
            or header.get("sha256") != hashlib.sha256(payload).hexdigest()):
        return None
    return payload


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
