"""Image-feature cache: the same image asked about twice is encoded once.

Keyed by the digest of the preprocessed pixels (so two files with the same
content share an entry, and a changed image never hits), bounded by bytes,
least recently used evicted first. One cache per loaded model: features depend
on the model's vision tower and projector.

Behind the in-process entries sits the persistent cache on disk (prefix_cache.py),
used when the engine says what determines its numbers (`engine.cache_identity()`:
GGUF and ONNX; the torch reference has none, so it never touches the disk): image
features ([T, H] float32, .npy) survive the process, and so does the KV state of
the prompt prefix that holds the images (`restore_prefix` / `save_prefix`)."""
from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np

from . import prefix_cache
from .backends.base import ImageEmbeds

_AUTO = object()

DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024   # ~32 images of the 7B ([576, 3584] float32 = 8.3 MB)


class FeatureCache:
    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES, disk=_AUTO):
        """disk: a prefix_cache.DiskCache, None for none, or (default) the one the
        environment names, opened at first use ($HUATUO_LITE_NO_CACHE turns it off)."""
        self.budget_bytes = budget_bytes
        self._disk = disk
        self._identity: tuple | None = None     # (engine id, its cache_identity())
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            features = self._items.get(key)
            if features is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: np.ndarray) -> None:
        if features.nbytes > self.budget_bytes:
            return
        with self._lock:
            if key in self._items:
                self._bytes -= self._items.pop(key).nbytes
            self._items[key] = features
            self._bytes += features.nbytes
            while self._bytes > self.budget_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    # ------------------------------------------------------- on disk too ----
    @property
    def disk(self):
        if self._disk is _AUTO:
            self._disk = None if prefix_cache.disabled() else prefix_cache.DiskCache()
        return self._disk

    @disk.setter
    def disk(self, value) -> None:
        self._disk = value

    def identity(self, engine) -> dict | None:
        """The engine's cache identity (computed once per engine), or None: no disk cache."""
        if self.disk is None:
            return None
        make = getattr(engine, "cache_identity", None)
        if make is None:
            return None
        if self._identity is None or self._identity[0] != id(engine):
            self._identity = (id(engine), make())
        return self._identity[1]

    def lookup(self, engine, key: str) -> np.ndarray | None:
        """Features of the image `key`: from memory, else from disk (then kept in memory)."""
        features = self.get(key)
        identity = self.identity(engine)
        if features is not None or identity is None:
            return features
        entry = prefix_cache.entry_key("features", identity["features"], key)
        payload = self.disk.get(entry, "features")
        if payload is None:
            return None
        features = _load_npy(payload, engine.hidden_size)
        if features is None:                   # intact file, wrong content: refuse it, recompute
            prefix_cache._unlink(self.disk.path(entry))
            return None
        self.put(key, features)
        return features

    def store(self, engine, key: str, features: np.ndarray) -> None:
        self.put(key, features)
        identity = self.identity(engine)
        if identity is not None:
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
            self.disk.put(prefix_cache.entry_key("features", identity["features"], key), "features",
                          buf.getvalue(), {"shape": list(features.shape)})

    def restore_prefix(self, engine, head: list) -> bool:
        """Load the KV state of the prompt prefix `head` (segments) into the engine, if on disk."""
        identity = self.identity(engine)
        if identity is None:
            return False
        entry = prefix_cache.entry_key("prefix", identity["prefix"], prefix_content(head))
        payload = self.disk.get(entry, "prefix")
        if payload is None:
            return False
        if engine.import_prefix(payload, head):
            return True
        prefix_cache._unlink(self.disk.path(entry))     # the engine refused it: written again below
        self.disk.refused += 1
        return False

    def save_prefix(self, engine, head: list) -> None:
        """Write the engine's KV state, which holds exactly the prefix `head`, to disk."""
        identity = self.identity(engine)
        if identity is None:
            return
        content = prefix_content(head)
        payload = engine.export_prefix(head)
        if payload is not None:
            self.disk.put(prefix_cache.entry_key("prefix", identity["prefix"], content), "prefix", payload,
                          {"positions": sum(_length(s) for s in head)})


def prefix_content(segments) -> list:
    """What a prefix is, as JSON-able content: token ids, and (image digest, rows) per image."""
    return [["image", s.content_key(), len(s.features)] if isinstance(s, ImageEmbeds) else [int(t) for t in s]
            for s in segments]


def prefix_segments(segments) -> list:
    """The prompt's segments up to and including its last image ([] when it has none):
    the part that a later question about the same image(s) shares."""
    last = max((i for i, s in enumerate(segments) if isinstance(s, ImageEmbeds)), default=-1)
    return list(segments[:last + 1])


def _length(segment) -> int:
    return len(segment.features) if isinstance(segment, ImageEmbeds) else len(segment)


def _load_npy(payload: bytes, width: int) -> np.ndarray | None:
    try:
        features = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
    if features.dtype != np.float32 or features.ndim != 2 or features.shape[1] != width:
        return None
    return features
