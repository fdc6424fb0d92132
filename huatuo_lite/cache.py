"""Image-feature cache: the same image asked about twice is encoded once.

Keyed by the digest of the preprocessed pixels (so two files with the same
content share an entry, and a changed image never hits), bounded by bytes,
least recently used evicted first. One cache per loaded model: features depend
on the model's vision tower and projector."""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

DEFAULT_BUDGET_BYTES = 256 * 1024 * 1024   # ~32 images of the 7B ([576, 3584] float32 = 8.3 MB)


class FeatureCache:
    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.budget_bytes = budget_bytes
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
